"""bench/speed.py stays runnable: `--quick --smoke` (tiny configs, seconds of work) produces the one table with every
section, in markdown and JSON. Only the table's structure is checked: the figures live in docs/PERFORMANCE.md."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("arch", "service", "pseudo", "finetune", "targets")


def test_quick_smoke_run_gives_the_whole_table(tmp_path):
    out_json, out_md = tmp_path / "speed.json", tmp_path / "speed.md"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "speed.py"), "--quick", "--smoke", "--json",
                           str(out_json), "--markdown", str(out_md)], cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out_json.read_text())
    assert report["mode"] == "smoke" and report["machine"]["cpu_cores"] >= 1
    rows = report["rows"]
    assert {r["section"] for r in rows} == set(SECTIONS)
    for r in rows:
        assert set(r) == {"section", "case", "batch", "variant", "value", "unit", "peak_mib", "extra", "note"}, r
        # a number, or a row that says why it has none (a failed variant)
        assert isinstance(r["value"], float) and (math.isfinite(r["value"]) or r["note"].startswith("failed")), r

    def where(section, **kw):
        return [r for r in rows if r["section"] == section and all(r[k] == v for k, v in kw.items())]

    # every served arch and the bundled default, in fp32 and channels_last, measured
    for arch in ("swinir_face", "gfpgan_v1_4", "codeformer", "faceadapt-swinir-small"):
        got = {r["variant"] for r in where("arch") if r["case"].startswith(arch) and math.isfinite(r["value"])}
        assert got == {"fp32", "cl"}, (arch, got)
    assert all(r["unit"] == "s/face" and r["value"] > 0 for r in where("arch"))
    # the service path: in process vs HTTP, the overhead, throughput per client count with and without batching
    assert {r["variant"] for r in where("service", unit="s p50")} == {"in process", "HTTP"}
    assert {r["case"] for r in where("service", unit="ms")} == {
        "HTTP overhead at p50", "HTTP overhead, median of paired differences"}
    tput = where("service", unit="faces/s")
    assert {(r["variant"], r["batch"]) for r in tput} == {(v, k) for v in ("micro-batching", "no batching")
                                                         for k in (1, 2)}
    assert all(r["value"] > 0 for r in tput)
    # pseudo targets: the paper's 150 calls and DDIM's 15 (both timed on a couple of calls in a smoke run)
    calls = {r["variant"]: r["extra"]["calls"] for r in where("pseudo") if r["case"].startswith("iDDPM")}
    assert calls == {"ancestral": 150, "ddim": 15}
    assert all("extrapolated" in r["note"] for r in where("pseudo"))
    # fine-tune steps/s of SwinIR, CodeFormer and the bundled restorer
    assert len([r for r in where("finetune", unit="steps/s") if r["value"] > 0]) == 3
    # the target stage: 1 worker and 2 workers on the job's shards, and the speed-up
    assert {r["variant"] for r in where("targets", unit="s wall")} == {"1 worker(s) x 1 thread(s)",
                                                                       "2 worker(s) x 1 thread(s)"}
    assert where("targets", unit="x")
    md = out_md.read_text()
    assert md.startswith("| section | case |") and md.count("\n") == len(rows) + 2
