"""Every `faceadapt` error is one line on stderr (exit 2 for usage, 1 otherwise), never a traceback, and it comes
before any work starts; `faceadapt restore` reports the fidelity mode of every face in summary.json."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from restoration.models.zoo import Zoo
from restoration.settings import get_settings

FACEADAPT = str(Path(sys.executable).parent / "faceadapt")


@pytest.fixture
def env(tmp_path, facexlib_root):
    e = {k: v for k, v in os.environ.items() if not k.startswith("FACEADAPT_")}
    e.update({"FACEADAPT_HOME": str(tmp_path / "home"), "FACEADAPT_FACEXLIB_MODEL_ROOT": str(facexlib_root),
              "FACEADAPT_DEVICE": "cpu", "OMP_NUM_THREADS": "1"})
    return e


@pytest.fixture
def photo(tmp_path, shared_dir) -> Path:
    p = tmp_path / "photo.jpg"
    p.write_bytes((shared_dir / "data/realworld/whole/04.jpg").read_bytes())
    return p


@pytest.fixture
def data_dir(tmp_path, shared_dir) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    for f in sorted((shared_dir / "data/faces-utk200").iterdir())[:3]:
        Image.open(f).convert("RGB").resize((96, 96), Image.BICUBIC).save(d / f"{f.stem}.png")
    return d


def cli(args: list[str], env: dict, cwd: Path):
    """`faceadapt ARGS` in this process (typer's CliRunner: stdout and stderr apart) with exactly the FACEADAPT_
    variables of `env`."""
    from types import SimpleNamespace

    from cli import app

    overrides = {k: None for k in os.environ if k.startswith("FACEADAPT_")}
    overrides.update({k: v for k, v in env.items() if k.startswith("FACEADAPT_")})
    get_settings.cache_clear()
    try:
        r = CliRunner(env=overrides).invoke(app, args)
    finally:
        get_settings.cache_clear()
    return SimpleNamespace(returncode=r.exit_code, stdout=r.stdout, stderr=r.stderr)


def cli_process(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    """`faceadapt ARGS` as a real process (the console script)."""
    return subprocess.run([FACEADAPT, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def assert_one_line_error(r: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_restore_errors_are_one_line(tmp_path, env, photo):
    (tmp_path / "afile").write_text("x")
    out = ["-o", str(tmp_path / "out")]
    assert_one_line_error(cli(["restore", str(photo), "-o", str(tmp_path / "afile")], env, tmp_path), 2,
                          "afile", "not a folder")
    assert_one_line_error(cli(["restore", str(photo), *out, "--device", "gpu"], env, tmp_path), 2,
                          "'gpu'", "cpu, cuda, cuda:N, auto")
    # a device torch knows but this machine (or FaceAdapt) cannot use is the environment's error, like no CUDA
    assert_one_line_error(cli(["restore", str(photo), *out, "--device", "mps"], env, tmp_path), 1, "mps",
                          "cpu, cuda, cuda:N, auto")
    # the same through the console script: one line on the real stderr, exit code 2
    assert_one_line_error(cli_process(["restore", str(photo), *out, "--device", "gpu"], env, tmp_path), 2, "'gpu'")
    assert_one_line_error(cli_process(["restore", str(photo), *out, "--nope"], env, tmp_path), 2, "--nope")
    import torch

    if not torch.cuda.is_available():
        assert_one_line_error(cli(["restore", str(photo), *out, "--device", "cuda"], env, tmp_path), 1,
                              "no CUDA device")
    assert_one_line_error(cli(["restore", str(photo), *out, "--detector", "foo"], env, tmp_path), 2,
                          "'foo'", "auto, retinaface, mtcnn")
    empty = tmp_path / "no-weights"
    empty.mkdir()
    r = cli(["restore", str(photo), *out, "--detector", "retinaface"],
            {**env, "FACEADAPT_FACEXLIB_MODEL_ROOT": str(empty)}, tmp_path)
    assert_one_line_error(r, 1, "detection_mobilenet0.25_Final.pth", str(empty))
    assert_one_line_error(cli(["restore", str(photo), *out, "--fidelity", "1.5"], env, tmp_path), 2, "--fidelity")
    assert_one_line_error(cli(["restore", str(photo), *out, "--bogus"], env, tmp_path), 2, "--bogus")
    assert_one_line_error(cli(["restore", str(tmp_path / "missing.png"), *out], env, tmp_path), 2, "no such file")
    assert_one_line_error(cli(["restore", str(photo), *out, "--model", "nope"], env, tmp_path), 2, "nope")
    assert_one_line_error(cli(["restore", str(photo), *out, "--format", "gif"], env, tmp_path), 2, "--format")
    assert not (tmp_path / "out").exists()  # nothing created before the checks pass


def test_adapt_checks_everything_before_any_stage(tmp_path, env, data_dir):
    home = Path(env["FACEADAPT_HOME"])
    base = ["adapt", "--data", str(data_dir)]
    cases = [
        (["--name", "Bad Name!"], 2, ["invalid model name"]),
        (["--name", "faceadapt-swinir-small"], 1, ["bundled"]),
        (["--name", "ok", "--base", "nope"], 2, ["--base nope"]),
        (["--name", "ok", "--base", "faceadapt-iddpm-small"], 2, ["prior, not a restorer"]),
        (["--name", "ok", "--prior", "faceadapt-swinir-small"], 2, ["restorer, not a prior"]),
        (["--name", "ok", "--device", "gpu"], 2, ["cpu, cuda, cuda:N, auto"]),
        (["--name", "ok", "--hq-dir", str(tmp_path / "nohq")], 2, ["--hq-dir", "no such folder"]),
    ]
    for args, code, needles in cases:
        assert_one_line_error(cli(base + args, env, tmp_path), code, *needles)
    (tmp_path / "empty").mkdir()
    assert_one_line_error(cli(["adapt", "--data", str(tmp_path / "empty"), "--name", "ok"], env, tmp_path), 2,
                          "no images")
    r = cli(base + ["--name", "ok"], {**env, "FACEADAPT_DETECTOR": "retinaface",
                                       "FACEADAPT_FACEXLIB_MODEL_ROOT": str(tmp_path / "none")}, tmp_path)
    assert_one_line_error(r, 1, "FACEADAPT_DETECTOR", "detection_mobilenet0.25_Final.pth")
    # an existing model without --overwrite
    from restoration.models.archs import build
    from restoration.models.zoo import Zoo

    cfg = dict(img_size=8, patch_size=1, in_chans=3, embed_dim=16, depths=[1], num_heads=[2], window_size=8,
               mlp_ratio=2, sf=8, img_range=1.0, upsampler="nearest+conv", resi_connection="1conv", unshuffle=True,
               unshuffle_scale=8)
    Zoo(root=home / "models").register("taken", "swinir_face", cfg, build("swinir_face", cfg).state_dict(),
                                       kind="restorer", input_size=64, value_range=(0, 1), random_init=True)
    assert_one_line_error(cli(base + ["--name", "taken"], env, tmp_path), 1, "already exists", "--overwrite")
    assert not (home / "adapt").exists()  # nothing started


def test_other_commands_one_line(tmp_path, env):
    (tmp_path / "afile").write_text("x")
    assert_one_line_error(cli(["train", "restorer", "-o", str(tmp_path / "afile")], env, tmp_path), 2, "not a folder")
    assert_one_line_error(cli(["train", "prior", "-o", str(tmp_path / "r"), "--device", "mps"], env, tmp_path), 1,
                          "mps")
    assert_one_line_error(cli(["train", "prior", "-o", str(tmp_path / "r"), "--device", "gpu"], env, tmp_path), 2,
                          "'gpu'")
    assert_one_line_error(cli(["models", "show", "nope"], env, tmp_path), 2, "nope", "models list")
    assert_one_line_error(cli(["models", "import", str(tmp_path / "none.pth"), "--arch", "swinir_face", "--name",
                               "x"], env, tmp_path), 2, "no such file")
    assert_one_line_error(cli(["models", "import", str(tmp_path / "afile"), "--arch", "swinir_face", "--name",
                               "x"], env, tmp_path), 1)  # a file, but not a checkpoint
    assert_one_line_error(cli(["models", "delete", "nope"], env, tmp_path), 2, "nope")
    assert_one_line_error(cli(["models", "delete", "faceadapt-swinir-small"], env, tmp_path), 1, "bundled")
    assert_one_line_error(cli(["serve", "--port", "1"], {**env, "FACEADAPT_DEVICE": "gpu"}, tmp_path), 2,
                          "FACEADAPT_DEVICE")
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_one_line_error(cli(["serve", "--port", str(port)], env, tmp_path), 1, f"--port {port}", "in use")
    assert not Path(env["FACEADAPT_HOME"]).exists()  # refused before anything was created


def test_restore_summary_reports_each_face(tmp_path, monkeypatch, facexlib_root, shared_dir):
    """summary.json: per face native_size / mode / fidelity; the bundled demo model is warned about once."""
    from cli import app

    monkeypatch.setenv("FACEADAPT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FACEADAPT_FACEXLIB_MODEL_ROOT", str(facexlib_root))
    get_settings.cache_clear()
    try:
        size = Zoo().get(get_settings().default_restorer).restore_size  # the model input size faces are restored at
        photos = [shared_dir / "data/realworld/whole/Blake_Lively.jpg", shared_dir / "data/realworld/whole/04.jpg"]
        if size > 64:  # Blake_Lively's faces (150-250 px) enlarged, so that one is above DETAIL_RATIO x the model size
            big = np.asarray(Image.open(photos[0]).convert("RGB"))
            photos[0] = tmp_path / "blake.jpg"
            Image.fromarray(cv2.resize(big, None, fx=size / 64, fy=size / 64, interpolation=cv2.INTER_CUBIC)).save(
                photos[0], quality=95)
        r = CliRunner().invoke(app, ["restore", *map(str, photos), "-o", str(tmp_path / "out")])
        assert r.exit_code == 0, r.output
        assert r.stderr.count(f"bundled {size} px demo") == 1 and "faceadapt models pull swinir-face-dtbfr" in r.stderr
        s = json.loads((tmp_path / "out/summary.json").read_text())
        assert s["fidelity"] == "auto" and s["detail_ratio"] == 2.0 and s["model_input_size"] == size
        infos = [i for f in s["files"] for i in f["face_info"]]
        assert len(infos) == sum(f["faces"] for f in s["files"]) >= 3
        for i in infos:  # the mode by native size, unless the never-worse check made the face fall back (and why)
            assert {"box", "native_size", "mode", "fidelity", "check"} <= set(i) and i["fidelity"] in (0.0, 1.0)
            planned = i.get("planned", i["mode"])
            assert planned == ("detail_preserving" if i["native_size"] > 2 * size else "restored")
            assert ("reason" in i) == ("planned" in i) and (i["mode"] != planned) == ("planned" in i)
        assert {i.get("planned", i["mode"]) for i in infos} == {"restored", "detail_preserving"}
        assert s["modes"] == {m: sum(i["mode"] == m for i in infos) for m in ("restored", "detail_preserving", "kept")
                              if any(i["mode"] == m for i in infos)}
        assert s["fell_back"] == sum("reason" in i for i in infos)
        assert "detail_preserving" in r.stdout
        assert ("never worse:" in r.stdout) == ("instead" in r.stdout) == (s["fell_back"] > 0)
        # aligned crops with --weight (the alias): one of 4x and one of 1x the model size
        crops = tmp_path / "crops"
        crops.mkdir()
        hq = np.asarray(Image.open(sorted((shared_dir / "data/hq512").glob("*/*.png"))[0]).convert("RGB"))
        Image.fromarray(cv2.resize(hq, (4 * size, 4 * size), interpolation=cv2.INTER_AREA)).save(crops / "a.png")
        Image.fromarray(cv2.resize(hq, (size, size), interpolation=cv2.INTER_AREA)).save(crops / "b.png")
        r = CliRunner().invoke(app, ["restore", str(crops), "-o", str(tmp_path / "out2"), "--aligned", "--weight", "0.5"])
        assert r.exit_code == 0, r.output
        s = json.loads((tmp_path / "out2/summary.json").read_text())
        assert [f["face_info"] for f in s["files"]] == [
            [{"native_size": 4.0 * size, "mode": "detail_preserving", "fidelity": 0.5}],
            [{"native_size": float(size), "mode": "restored", "fidelity": 0.5}]]
        r = CliRunner().invoke(app, ["restore", str(crops), "-o", str(tmp_path / "out3"), "--aligned", "--fidelity", "1"])
        assert r.exit_code == 0 and json.loads((tmp_path / "out3/summary.json").read_text())["modes"] == {"kept": 2}
        for name in ("a.png", "b.png"):
            assert np.array_equal(np.asarray(Image.open(tmp_path / "out3" / name)), np.asarray(Image.open(crops / name)))
    finally:
        get_settings.cache_clear()


def test_no_cuda_and_no_mps_alike_and_nothing_created(tmp_path, env, photo):
    """`--device cuda` (without CUDA) and `--device mps` exit alike (1: the machine lacks it), and neither they nor
    `--model nope` nor `--detector foo` leave an output folder behind."""
    import torch

    out = tmp_path / "out"
    cases = [(["--model", "nope"], 2), (["--detector", "foo"], 2), (["--device", "mps"], 1)]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], 1))
    for args, code in cases:
        assert_one_line_error(cli(["restore", str(photo), "-o", str(out), *args], env, tmp_path), code)
        assert not out.exists(), args
    assert_one_line_error(cli_process(["restore", str(photo), "-o", str(out), "--device", "mps"], env, tmp_path), 1)
    assert not out.exists()


def test_text_file_named_png_is_one_clear_line(tmp_path, env):
    fake = tmp_path / "notes.png"
    fake.write_text("these are my notes, not a picture\n")
    line = assert_one_line_error(cli(["restore", str(fake), "-o", str(tmp_path / "out")], env, tmp_path), 1,
                                 "notes.png", "not an image", "text")
    assert "skipped" not in line and not (tmp_path / "out").exists()


def test_models_show_every_listed_name(tmp_path, env):
    """Every name `models list` prints can be shown: a short card (what it is, its licence; pullable ones the pull
    command), --json for all of it."""
    from restoration.models import KNOWN_CHECKPOINTS

    listing = cli(["models", "list"], env, tmp_path)
    assert listing.returncode == 0, listing.stderr
    names = [ln.split()[0] for ln in listing.stdout.splitlines()[1:] if ln.strip() and not ln.startswith(("Avail",
                                                                                                      "Service"))]
    assert "faceadapt-swinir-small" in names and "gfpgan-v1.4" in names
    for name in names:
        r = cli(["models", "show", name], env, tmp_path)
        assert r.returncode == 0, (name, r.stderr)
        lines = r.stdout.splitlines()
        assert lines[0].startswith(name) and 4 <= len(lines) <= 15, r.stdout
        assert any(ln.strip().startswith("licence:") for ln in lines)
        if name in KNOWN_CHECKPOINTS and "not pulled" in lines[0]:
            assert f"faceadapt models pull {name}" in r.stdout
            assert KNOWN_CHECKPOINTS[name].license.split()[0] in r.stdout
        full = cli(["models", "show", name, "--json"], env, tmp_path)
        assert full.returncode == 0
        import json as _json

        body = _json.loads(full.stdout)
        assert body["card"]["name"] == name and "config" in body


def test_help_texts_match_the_defaults(tmp_path, env):
    import re

    from restoration.models.zoo import Zoo

    r = cli(["adapt", "--help"], env, tmp_path)
    text = " ".join(r.stdout.replace("\u2502", " ").split())  # the help box's side bars out
    prior = Zoo().get("faceadapt-iddpm-small").extra["pseudo_target_defaults"]
    assert re.search(rf"--down-n .*{prior['down_N']} for the bundled prior", text), text
    assert f"{prior['start']} for the bundled prior" in text and "8 or 16" not in text
