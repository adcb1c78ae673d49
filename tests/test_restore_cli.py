"""`faceadapt restore` end to end on real photos, with a small restorer registered in a temporary zoo."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from restoration.models.archs import build
from restoration.settings import get_settings
from restoration.models.zoo import Zoo

CFG = dict(img_size=8, patch_size=1, in_chans=3, embed_dim=16, depths=[1], num_heads=[2], window_size=8,
           mlp_ratio=2, sf=8, img_range=1.0, upsampler="nearest+conv", resi_connection="1conv",
           unshuffle=True, unshuffle_scale=8)


@pytest.fixture
def home(tmp_path, monkeypatch, facexlib_root):
    monkeypatch.setenv("FACEADAPT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FACEADAPT_FACEXLIB_MODEL_ROOT", str(facexlib_root))
    get_settings.cache_clear()
    Zoo().register("tiny", "swinir_face", CFG, build("swinir_face", CFG).state_dict(), kind="restorer",
                   input_size=64, value_range=(0, 1), random_init=True)
    yield tmp_path
    get_settings.cache_clear()


def run(args):
    from cli import app

    return CliRunner().invoke(app, args)


def test_restore_whole_photos(home, shared_dir):
    photos = sorted((shared_dir / "data/realworld/whole").iterdir())[:2]
    out = home / "out"
    r = run(["restore", *map(str, photos), "-o", str(out), "--model", "tiny", "--batch-size", "4"])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "tiny" and len(summary["files"]) == 2
    for entry, photo in zip(summary["files"], photos):
        assert entry["detector"] == "retinaface"
        assert entry["faces"] >= 1 and len(entry["boxes"]) == entry["faces"]
        restored = np.asarray(Image.open(out / entry["output"]))
        original = np.asarray(Image.open(photo).convert("RGB"))
        assert restored.shape == original.shape and not np.array_equal(restored, original)


def test_restore_aligned_folder_batched(home, shared_dir):
    crops = home / "crops"
    crops.mkdir()
    src = sorted((shared_dir / "data/faces-utk200").iterdir())[:5]
    for f in src:
        (crops / f.name).write_bytes(f.read_bytes())
    (crops / "broken.png").write_bytes(b"not an image")
    out = home / "out"
    r = run(["restore", str(crops), "-o", str(out), "--model", "tiny", "--aligned", "--batch-size", "2"])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    ok = [f for f in summary["files"] if "output" in f]
    errors = [f for f in summary["files"] if "error" in f]
    assert len(ok) == 5 and len(errors) == 1 and "broken.png" in errors[0]["input"]
    for entry in ok:
        assert Image.open(out / entry["output"]).size == (200, 200)


def test_restore_errors(home):
    r = run(["restore", str(home / "missing.png"), "-o", str(home / "o")])
    assert r.exit_code == 2 and "no such file" in r.output
    img = home / "a.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(img)
    r = run(["restore", str(img), "-o", str(home / "o"), "--model", "nope"])
    assert r.exit_code == 2 and "not in the zoo" in r.output


def test_outputs_keep_the_input_format_with_ordinary_modes(home, shared_dir):
    """JPEG in -> JPEG out, PNG in -> PNG out (unless --format), files 0666 minus the umask (0644 here)."""
    import os

    src = home / "in"
    src.mkdir()
    (src / "a.jpg").write_bytes((shared_dir / "data/realworld/whole/03.jpg").read_bytes())
    (src / "b.png").write_bytes((shared_dir / "data/realworld/whole/10045.png").read_bytes())
    out = home / "out"
    old = os.umask(0o022)
    try:
        r = run(["restore", str(src), "-o", str(out), "--model", "tiny"])
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["a.jpg", "b.png", "summary.json"]
    assert Image.open(out / "a.jpg").format == "JPEG" and Image.open(out / "b.png").format == "PNG"
    for p in out.iterdir():
        assert p.stat().st_mode & 0o777 == 0o644, (p.name, oct(p.stat().st_mode))
    r = run(["restore", str(src / "a.jpg"), "-o", str(home / "out2"), "--model", "tiny", "--format", "webp"])
    assert r.exit_code == 0, r.output
    assert Image.open(home / "out2" / "a.webp").format == "WEBP"
