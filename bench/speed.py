"""Speed, measured: one table (markdown and JSON) of what a user compares, on this machine's CPU or on a GPU.

    python bench/speed.py --quick                  # a CPU, sized for <= 10 min on a quiet 2-core machine: smaller
                                                   # batches and steps (the table's notes say which)
    python bench/speed.py --quick --smoke          # seconds: tiny configs, every section once (the test runs it)
    python bench/speed.py --device cuda            # the GPU table: published configs, batch 1/4/16, every variant
    python bench/speed.py --sections arch,service --json runs/speed.json --markdown runs/speed.md

Sections (--sections, default all):
  arch      s/face of the served archs at their published configs (swinir_face, gfpgan_v1_4, codeformer; RANDOM
            weights: speed does not depend on them) and of the bundled default restorer (its trained weights), by batch
            and variant: fp32, bf16 (autocast), cl (channels_last), compile (torch.compile, with its compile time; a
            failure is a row saying why); peak memory (GPU: max allocated; CPU: resident-set growth).
  service   one aligned 512 face through POST /v1/restore over real HTTP (uvicorn subprocess on 127.0.0.1) vs the same
            decode-restore-encode in this process: p50/p99; throughput at 1/4/8 concurrent clients with and without
            micro-batching (bench/speed_service.py).
  pseudo    s/image of a pseudo target with the iDDPM-512 prior config (random weights): the paper's ancestral
            schedule (150 network calls) and DDIM (15 calls), batched; and the bundled small prior at its defaults.
  finetune  fine-tune steps/s: SwinIR (published config) batch 16, CodeFormer batch 4, the bundled restorer batch 16.
  targets   the target stage of one job (the bundled models, N faces): 1 worker vs 2 workers on its 2 shards,
            separate processes with their own torch thread counts, wall clock from a common start once the workers
            are warm (imported), and each worker's CPU seconds.
Figures and how to read them: docs/PERFORMANCE.md.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from restoration import Zoo, build
from restoration.adaptation import default_config, generate_targets, prepare
from restoration.diffusion import IDDPMPrior, SamplingCancelled, create_gaussian_diffusion
from restoration.models import CODEFORMER_CONFIG, KNOWN_CHECKPOINTS, SWINIR_FACE_CONFIG, model_value_range, run_restorer
from restoration.runtime import resolve_device, to_channels_last, to_contiguous
from restoration.training import CodeFormerFinetuneConfig, FinetuneConfig, finetune, finetune_codeformer
from speed_service import section_service
from timing import PeakMemory, markdown, median, row, stopwatch, time_calls

REPO = Path(__file__).resolve().parents[1]
FACES = Path(os.environ.get("FACEADAPT_SHARED", REPO.parent / "shared")) / "data" / "faces-utk200"
DEFAULT_RESTORER, DEFAULT_PRIOR = "faceadapt-swinir-small", "faceadapt-iddpm-small"
SECTIONS = ("arch", "service", "pseudo", "finetune", "targets")

# the smoke run's tiny stand-ins (the tests' configs): same code paths, seconds on a CPU
TINY = {
    "swinir_face": dict(img_size=64, patch_size=1, in_chans=3, embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                        window_size=8, mlp_ratio=2, sf=8, img_range=1.0, upsampler="nearest+conv",
                        resi_connection="1conv", unshuffle=True, unshuffle_scale=8),
    "gfpgan_v1_4": dict(out_size=64, num_style_feat=32, channel_multiplier=2, decoder_load_path=None, fix_decoder=False,
                        num_mlp=8, input_is_latent=True, different_w=True, narrow=0.0625, sft_half=True),
    "codeformer": dict(dim_embd=64, n_head=4, n_layers=2, codebook_size=64, latent_size=64, connect_list=["16", "32"],
                       img_size=64, nf=32, ch_mult=[1, 1, 2, 2], res_blocks=1, attn_resolutions=[8], emb_dim=32),
    "iddpm_unet": dict(image_size=32, in_channels=3, model_channels=32, out_channels=6, attention_resolutions=[8],
                       dropout=0, channel_mult=[1, 2], num_res_blocks=[1, 1], conv_resample=True, dims=2,
                       use_fp16=False, num_head_channels=32, use_scale_shift_norm=True, resblock_updown=False,
                       use_new_attention_order=False),
}
PUBLISHED = {"swinir_face": SWINIR_FACE_CONFIG, "gfpgan_v1_4": KNOWN_CHECKPOINTS["gfpgan-v1.4"].config,
             "codeformer": CODEFORMER_CONFIG, "iddpm_unet": KNOWN_CHECKPOINTS["difface-iddpm-ffhq512"].config}


class Plan:
    """What one run measures: sizes, batches, variants and repeats per mode (full, --quick, --smoke) and device."""

    def __init__(self, mode: str, device: torch.device):
        gpu = device.type == "cuda"
        self.mode, self.device = mode, device
        self.smoke, self.quick = mode == "smoke", mode == "quick"
        self.size = 64 if self.smoke else 512
        self.batches = [1] if self.smoke else [1, 4, 16]
        self.variants = (["fp32", "cl"] if self.smoke else
                         ["fp32", "bf16", "bf16+cl", "bf16+cl+compile"] if gpu else
                         ["fp32", "bf16", "cl", "compile"])
        self.repeats = 1 if self.smoke else 2 if self.quick and not gpu else 5
        self.big_repeats = 1 if self.smoke or (self.quick and not gpu) else self.repeats  # 512 px archs
        self.clients = [1, 2] if self.smoke else [1, 4, 8]
        self.requests = 4 if self.smoke else 30 if self.quick else 100  # sequential requests for p50/p99
        self.per_client = 3 if self.smoke else 8 if self.quick else 24  # requests per client for throughput
        self.pseudo_batch = 2 if self.smoke else 16 if gpu else 1 if self.quick else 4
        # the 150-call schedule on this CPU at 512 px takes minutes a face: --quick times a few calls and scales
        self.truncate_calls = 2 if self.smoke else 3 if (self.quick and not gpu) else None
        self.ft_steps = 3 if self.smoke or (self.quick and not gpu) else 12  # 3: one timed step (first warms up)
        self.target_faces = 4 if self.smoke else 32 if self.quick else 96

    @property
    def cpu_quick(self) -> bool:
        return self.quick and self.device.type != "cuda"

    def arch_cases(self) -> list[tuple[int, list[str]]]:
        """(batch, variants) to run for a served arch at 512 px."""
        if not self.cpu_quick:
            return [(b, self.variants) for b in self.batches]
        # --quick on a CPU (seconds per face at 512 px): batch 1, every variant but compile (batches 4 and 16, and
        # compile: the full run)
        return [(1, [v for v in self.variants if v != "compile"])]

    def default_cases(self) -> list[tuple[int, list[str]]]:
        """(batch, variants) for the bundled default restorer (64 px: cheap): every batch and variant; --quick on a
        CPU compiles at batch 1 only (a compile per batch shape)."""
        if self.smoke:
            return [(1, self.variants)]
        if not self.cpu_quick:
            return [(b, self.variants) for b in self.batches]
        return [(b, self.variants if b == 1 else [v for v in self.variants if v != "compile"]) for b in self.batches]


def failed(exc: BaseException) -> str:
    return f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"


def autocast(device: torch.device, on: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if on else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------- arch
def bench_model(plan: Plan, name: str, model: torch.nn.Module, size: int, cases, note: str) -> list[dict]:
    device = plan.device
    model = model.to(device).eval()
    value_range, kwargs = model_value_range(model), dict(getattr(model, "inference_kwargs", {}))
    rows = []
    for batch, variants in cases:
        for variant in variants:
            try:
                rows.append(_bench_variant(plan, name, model, size, batch, variant, value_range, kwargs, note))
            except Exception as exc:  # a failed variant is a row saying why (compile on a machine without a compiler)
                rows.append(row("arch", name, batch, variant, float("nan"), "s/face", note=failed(exc)))
            finally:
                to_contiguous(model)
                if "compile" in variant:
                    torch._dynamo.reset()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            print(f"  arch {name} batch {batch} {variant}: {rows[-1]['value']:.4g} s/face {rows[-1]['note']}",
                  file=sys.stderr, flush=True)
    return rows


def _bench_variant(plan, name, model, size, batch, variant, value_range, kwargs, note) -> dict:
    device = plan.device
    x = torch.rand(batch, 3, size, size, device=device)
    if "cl" in variant.split("+"):
        to_channels_last(model)
        x = x.contiguous(memory_format=torch.channels_last)
    fn = torch.compile(model, dynamic=False) if "compile" in variant else model
    bf16 = "bf16" in variant

    def call():
        with torch.no_grad(), autocast(device, bf16):
            return run_restorer(fn, x, value_range, **kwargs)

    with PeakMemory(device) as mem:
        times, first = time_calls(call, plan.repeats if size < 512 else plan.big_repeats, warmup=1, device=device)
    extra = {"s_per_batch": median(times)}
    if "compile" in variant:
        extra["compile_s"] = first - median(times)
    return row("arch", name, batch, variant, median(times) / batch, "s/face", mem.mib, note, **extra)


def section_arch(plan: Plan) -> list[dict]:
    rows = []
    for arch in ("swinir_face", "gfpgan_v1_4", "codeformer"):
        torch.manual_seed(0)
        cfg = TINY[arch] if plan.smoke else PUBLISHED[arch]
        model = build(arch, cfg)
        label = f"{arch} ({'tiny stand-in' if plan.smoke else 'published config'}, random weights)"
        rows += bench_model(plan, label, model, plan.size, plan.arch_cases(), f"{plan.size} px")
        del model
    zoo = Zoo()
    card = zoo.get(DEFAULT_RESTORER)
    rows += bench_model(plan, f"{DEFAULT_RESTORER} (bundled, trained)", zoo.load(DEFAULT_RESTORER), card.restore_size,
                        plan.default_cases(), f"{card.restore_size} px")  # the size it restores at
    return rows


# ---------------------------------------------------------------------------------------------------- pseudo
class _Counted:
    """A prior's network with a call counter; past `limit` calls the next step stops the sampler."""

    def __init__(self, prior, limit: int | None = None):
        self.prior, self.calls, self.limit, self.fn = prior, 0, limit, prior.model_fn

    def __call__(self, x, t):
        self.calls += 1
        return self.fn(x, t)

    def stop(self) -> bool:
        return self.limit is not None and self.calls >= self.limit


class _Zeros(IDDPMPrior):
    """A 6-channel zero network: counts the calls a schedule makes without any network cost."""

    def __init__(self):
        super().__init__(torch.nn.Identity(), create_gaussian_diffusion(), image_size=16)

    def model_fn(self, x, t):
        return torch.zeros(x.shape[0], 6, *x.shape[2:])


def schedule_calls(**kw) -> int:
    counted = _Counted(_Zeros())
    counted.prior.model_fn = counted
    counted.prior.pseudo_targets(torch.rand(1, 3, 16, 16), **kw)
    return counted.calls


def bench_pseudo(plan: Plan, label: str, prior: IDDPMPrior, batch: int, schedule: dict, truncate: int | None,
                 note: str) -> dict:
    device = plan.device
    total = schedule_calls(**schedule)
    counted = _Counted(prior, truncate)
    prior.model_fn = counted
    x = torch.rand(batch, 3, prior.image_size, prior.image_size, device=device)
    gens = [torch.Generator().manual_seed(i) for i in range(batch)]
    with PeakMemory(device) as mem, stopwatch() as t:
        try:
            prior.pseudo_targets(x, generator=gens, should_cancel=counted.stop, **schedule)
        except SamplingCancelled:
            pass
    del prior.model_fn
    per_call = t[0] / max(1, counted.calls)
    if counted.calls < total:
        note = f"{note}; extrapolated: {counted.calls} of {total} calls timed"
    sched = schedule.get("schedule", "ancestral")
    return row("pseudo", label, batch, sched, per_call * total / batch, "s/image", mem.mib, note,
               calls=total, s_per_call=per_call)


def section_pseudo(plan: Plan) -> list[dict]:
    torch.manual_seed(0)
    cfg = TINY["iddpm_unet"] if plan.smoke else PUBLISHED["iddpm_unet"]
    unet = build("iddpm_unet", cfg).to(plan.device).eval()
    prior = IDDPMPrior(unet)  # the DT-BFR process: 1000 linear steps respaced to 250
    label = f"iDDPM-{cfg['image_size']} ({'tiny stand-in' if plan.smoke else 'FFHQ-512 config'}, random weights)"
    paper = dict(start=150, constrain_until=90, down_N=16)
    rows = [bench_pseudo(plan, label, prior, plan.pseudo_batch, {**paper, "schedule": "ancestral"},
                         plan.truncate_calls, "the paper's schedule"),
            bench_pseudo(plan, label, prior, plan.pseudo_batch, {**paper, "schedule": "ddim", "steps": 15},
                         plan.truncate_calls if plan.smoke else None, "DDIM, eta 0")]
    del unet, prior
    zoo = Zoo()
    small = IDDPMPrior.from_zoo(DEFAULT_PRIOR, zoo, device=plan.device)
    d = zoo.get(DEFAULT_PRIOR).extra["pseudo_target_defaults"]
    sched = dict(start=d["start"], constrain_until=d["constrain_until"], down_N=d["down_N"],
                 schedule=d.get("schedule", "ancestral"), steps=d.get("fast_steps", 25))
    rows.append(bench_pseudo(plan, f"{DEFAULT_PRIOR} (bundled, its card's defaults)", small, 2 if plan.smoke else 8,
                             sched, plan.truncate_calls if plan.smoke else None, f"{small.image_size} px"))
    return rows


# ---------------------------------------------------------------------------------------------------- finetune
def bench_finetune(plan: Plan, label: str, model, size: int, batch: int, codeformer: bool, note: str) -> dict:
    rng = np.random.default_rng(0)
    n = max(batch, 2)
    pairs = [(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), rng.integers(0, 256, (size, size, 3),
                                                                                   dtype=np.uint8)) for _ in range(n)]
    stamps: list[float] = []
    steps = plan.ft_steps
    dev = str(plan.device)
    with tempfile.TemporaryDirectory() as ckpt, PeakMemory(plan.device) as mem:
        if codeformer:
            cfg = CodeFormerFinetuneConfig(steps=steps, batch_size=batch, ckpt_every=10**6, log_every=10**6, device=dev)
            res = finetune_codeformer(model, pairs, (), cfg, ckpt, progress=lambda *_: stamps.append(time.perf_counter()))
        else:
            hq = [p[1] for p in pairs]
            light = dict(gan=0.0, lpips=0.0, d_channels=16) if plan.smoke else {}  # smoke: the L1 step only
            cfg = FinetuneConfig(steps=steps, batch_size=batch, ckpt_every=10**6, log_every=10**6, device=dev, **light)
            res = finetune(model, pairs, hq, cfg, ckpt, progress=lambda *_: stamps.append(time.perf_counter()))
    # steps 2 .. n-1: the first step warms up, the last one also writes the checkpoint
    timed = stamps[1:-1] if len(stamps) >= 3 else stamps
    rate = (len(timed) - 1) / (timed[-1] - timed[0]) if len(timed) >= 2 else float("nan")
    losses = res.losses if isinstance(res.losses, dict) else {}
    return row("finetune", label, batch, "fp32", rate, "steps/s", mem.mib, note, timed_steps=len(timed) - 1,
               s_per_step=1 / rate if rate == rate and rate else float("nan"),
               perceptual=str(losses.get("perceptual", "none")).split(" (")[0])


def section_finetune(plan: Plan) -> list[dict]:
    rows = []
    small_cpu = plan.cpu_quick
    # (arch, the batch, --quick on a CPU, a full CPU run: SwinIR-512 training at batch 2 peaked at 11 GB RSS)
    for arch, batch, quick_batch, cpu_batch in (("swinir_face", 16, 1, 4), ("codeformer", 4, 1, 4)):
        torch.manual_seed(0)
        cfg = TINY[arch] if plan.smoke else PUBLISHED[arch]
        b = 2 if plan.smoke else quick_batch if small_cpu else cpu_batch if plan.device.type != "cuda" else batch
        why = "--quick" if small_cpu else "CPU memory"
        note = f"{plan.size} px" + (f"; {why}: batch {b} for {batch}" if b != batch and not plan.smoke else "")
        try:
            rows.append(bench_finetune(plan, f"{arch} ({'tiny' if plan.smoke else 'published config'}, random weights)",
                                       build(arch, cfg), plan.size, b, arch == "codeformer", note))
        except Exception as exc:  # out of memory on a smaller card: a row saying so
            rows.append(row("finetune", arch, b, "fp32", float("nan"), "steps/s", note=failed(exc)))
        finally:
            if plan.device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"  finetune {arch} batch {b}: {rows[-1]['value']:.4g} steps/s {rows[-1]['note']}", file=sys.stderr,
              flush=True)
    zoo = Zoo()
    card = zoo.get(DEFAULT_RESTORER)
    rows.append(bench_finetune(plan, f"{DEFAULT_RESTORER} (bundled)", zoo.load(DEFAULT_RESTORER), card.input_size,
                               4 if plan.smoke else 16, False, f"{card.input_size} px"))
    return rows


# ---------------------------------------------------------------------------------------------------- targets
def run_target_shard(args) -> None:
    """One worker of the target stage (a subprocess of section_targets): the stage's shard i of n, as the worker runs
    it (`generate_targets` on a prepared work dir), with its own torch thread count. With --target-go, it waits
    (imports done: a warm worker) until that file exists, as a worker waits for its task."""
    torch.set_num_threads(args.threads)
    if args.target_go:
        Path(f"{args.target_go}.ready{args.target_shard}").touch()
        while not Path(args.target_go).exists():
            time.sleep(0.01)
    t0, c0 = time.perf_counter(), time.process_time()
    res = generate_targets(args.target_workdir, args.target_shard, args.target_shards, device=args.device)
    print(json.dumps({"stage_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "end": time.time(),
                      "generated": res["generated"], "total": res["total"]}))


def _workers(workdir: Path, n: int, threads: int, device: torch.device) -> tuple[float, float, list[dict]]:
    """`n` worker processes on the n shards of `workdir`, started together once all of them are warm (imports
    done); returns (seconds from the start signal to the last shard done, seconds from process spawn, their reports)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    go = workdir.parent / f"go-{workdir.name}"
    t_spawn = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, __file__, "--target-shard", str(i), "--target-shards", str(n),
                               "--threads", str(threads), "--target-workdir", str(workdir), "--device", str(device),
                               "--target-go", str(go)], stdout=subprocess.PIPE, env=env, cwd=REPO) for i in range(n)]
    while not all(Path(f"{go}.ready{i}").exists() for i in range(n)):
        if any(p.poll() not in (None, 0) for p in procs):
            break
        time.sleep(0.01)
    t_go = time.time()
    go.touch()
    outs = [p.communicate()[0] for p in procs]
    spawn_wall = time.perf_counter() - t_spawn
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a target worker failed (exit {[p.returncode for p in procs]})")
    reports = [json.loads(o.decode().strip().splitlines()[-1]) for o in outs]
    return max(r["end"] for r in reports) - t_go, spawn_wall, reports


def section_targets(plan: Plan) -> list[dict]:
    gpu = plan.device.type == "cuda"
    cores = os.cpu_count() or 1
    rows, runs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        zoo = Zoo()
        cfg = default_config(zoo, DEFAULT_RESTORER, DEFAULT_PRIOR, device=str(plan.device))
        files = sorted(FACES.iterdir())[: plan.target_faces]
        prepared = Path(tmp) / "prepared"
        prepare(prepared, files, aligned=True, size=zoo.get(DEFAULT_RESTORER).input_size, config=cfg,
                base=DEFAULT_RESTORER, prior=DEFAULT_PRIOR, name="speed", zoo=zoo)
        # on a GPU both workers share the one card (torch threads matter little there)
        configs = [(1, 1), (2, 1)] if plan.smoke or gpu else [(1, cores), (1, 1), (2, max(1, cores // 2))]
        for n, threads in configs:
            workdir = Path(tmp) / f"{n}x{threads}"
            shutil.copytree(prepared, workdir)
            wall, spawn_wall, outs = _workers(workdir, n, threads, plan.device)
            runs[(n, threads)] = wall
            faces = sum(o["total"] for o in outs)
            rows.append(row("targets", f"target stage of one job, {faces} training faces, bundled models", faces,
                            f"{n} worker(s) x {threads} thread(s)", wall, "s wall",
                            note="warm workers (imports done): from the start signal to the last shard done, "
                            "model loads included; from_spawn_s: from process start; cpu_s: each worker's CPU "
                            "seconds in the stage", from_spawn_s=spawn_wall,
                            cpu_s="/".join(f"{o['cpu_s']:.1f}" for o in outs)))
            print(f"  targets {n} worker(s) x {threads} thread(s): {wall:.1f} s", file=sys.stderr, flush=True)
    two = runs[configs[-1]]
    for n, threads in configs[:-1]:
        rows.append(row("targets", "speed-up of 2 workers", faces, f"vs 1 worker x {threads} thread(s)",
                        runs[(n, threads)] / two, "x", note=f"2 workers x {configs[-1][1]} thread(s); target >= 1.8x"))
    return rows


# ---------------------------------------------------------------------------------------------------- main
def machine(device: torch.device) -> dict:
    info = {"cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "device": str(device), "load_avg_start": os.getloadavg()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="sized for <= 10 min on a quiet 2-core CPU: smaller batches "
                    "and steps")
    ap.add_argument("--smoke", action="store_true", help="seconds: tiny configs and counts (structure check only)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, all cores)")
    ap.add_argument("--json", type=Path, default=None, help="write the rows and the machine here (JSON)")
    ap.add_argument("--markdown", type=Path, default=None, help="write the markdown table here")
    for hidden in ("--target-shard", "--target-shards"):
        ap.add_argument(hidden, type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--target-workdir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--target-go", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads or args.smoke:  # smoke: one thread, the quickest on a busy machine (no threads spin-waiting)
        torch.set_num_threads(args.threads or 1)
    if args.target_shard is not None:
        run_target_shard(args)
        return 0
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        ap.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    device = resolve_device(args.device)
    plan = Plan("smoke" if args.smoke else "quick" if args.quick else "full", device)
    t0 = time.perf_counter()
    rows: list[dict] = []
    seconds = {}
    for s in sections:
        print(f"[{s}] ...", file=sys.stderr, flush=True)
        ts = time.perf_counter()
        rows += globals()[f"section_{s}"](plan)
        seconds[s] = round(time.perf_counter() - ts, 1)
    report = {"mode": plan.mode, "machine": machine(device), "seconds": seconds,
              "total_seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    table = markdown(rows)
    print(table)
    print(f"\n{plan.mode} run on {device} ({report['machine']['cpu_cores']} CPU cores): "
          f"{report['total_seconds']:.0f} s; per section {seconds}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=float))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
