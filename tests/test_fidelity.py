"""Fidelity and native-size aware paste-back (restoration.faces.fidelity) with the bundled restorer, and the alignment
template of the bundled models (UTKFace framing)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from restoration.metrics import quality as M
from restoration.faces.alignment import template_for_card
from restoration.faces.helper import FaceHelper
from restoration.faces.fidelity import DETAIL_RATIO, check_fidelity, decide
from restoration.faces.restore import Restorer, restore_photo
from restoration.models.io import to_tensor, to_uint8
from restoration.models.zoo import Zoo
from restoration.settings import get_settings


@pytest.fixture(scope="module")
def helper(restorer, facexlib_root):
    return FaceHelper(restorer.size, detector="retinaface", model_root=facexlib_root,
                      face_template=template_for_card(restorer.card))


def _lapvar(img: np.ndarray) -> float:
    return float(cv2.Laplacian(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var())


def _hq(shared_dir, n=3, side=256):
    files = sorted((shared_dir / "data/hq512").glob("*/*.png"))[:n]
    return [cv2.resize(np.asarray(Image.open(f).convert("RGB")), (side, side), interpolation=cv2.INTER_AREA)
            for f in files]


def _photo(shared_dir):
    return np.asarray(Image.open(shared_dir / "data/realworld/whole/Blake_Lively.jpg").convert("RGB"))


def test_decide_modes():
    assert decide(64, 64).mode == "restored" and decide(64, 64).weight == 1.0
    assert decide(DETAIL_RATIO * 64, 64).mode == "restored"
    assert decide(DETAIL_RATIO * 64 + 1, 64).mode == "detail_preserving"
    assert decide(500, 64, fidelity=1.0).mode == "kept" and decide(30, 64, fidelity=1).weight == 0.0
    fm = decide(300, 64, fidelity=0.25, ratio=10)
    assert fm.mode == "restored" and fm.weight == 0.75 and fm.to_dict() == {"native_size": 300.0, "mode": "restored",
                                                                            "fidelity": 0.25}
    for bad in (-0.1, 1.01, float("nan"), "x"):
        with pytest.raises(ValueError, match="fidelity"):
            check_fidelity(bad)


def test_fidelity_one_returns_the_input_unchanged(restorer, shared_dir):
    crops = _hq(shared_dir, 2, 256) + [cv2.resize(_hq(shared_dir, 1)[0], (64, 64), interpolation=cv2.INTER_AREA)]
    outs, infos = restorer.restore_crops(crops, fidelity=1.0, return_info=True)
    for c, o, info in zip(crops, outs, infos):
        assert np.array_equal(c, o) and o is not c and info["mode"] == "kept"
    photo = _photo(shared_dir)
    res = restorer.restore_image(photo, fidelity=1.0, detector="retinaface")
    assert len(res.faces) >= 1 and all(f.extra["mode"] == "kept" for f in res.faces)
    assert np.array_equal(res.image, photo)


def test_fidelity_zero_at_model_size_is_the_plain_output(restorer, helper, shared_dir):
    s = restorer.size
    crop = cv2.resize(_hq(shared_dir, 1)[0], (s, s), interpolation=cv2.INTER_AREA)
    plain = to_uint8(restorer.restore_tensor(to_tensor([crop], s)))[0]  # the network output, nothing else
    for f in (None, 0.0):
        out, info = restorer.restore_crops([crop], fidelity=f, return_info=True)
        assert np.array_equal(out[0], plain) and info[0]["mode"] == "restored"
        res = restore_photo(helper, crop, restorer.restore_crops, aligned=True, fidelity=f, guard=False)
        img, faces = res.image, res.faces
        assert np.array_equal(img, plain) and faces[0].extra["mode"] == "restored"
    # a blend in between: exactly (1 - f) * restored + f * input
    half = restorer.restore_crops([crop], fidelity=0.5)[0].astype(np.float64)
    assert np.abs(half - (0.5 * plain + 0.5 * crop.astype(np.float64))).max() <= 0.5 + 1e-9


def test_detail_preserving_keeps_a_large_sharp_crop_sharp(restorer, shared_dir):
    side = 4 * restorer.size  # above DETAIL_RATIO x the model size
    for crop in _hq(shared_dir, 3, side):
        plain = restorer.restore_crops([crop], detail_ratio=1e9)[0]  # the old behaviour: upsampled model output
        outs, info = restorer.restore_crops([crop], return_info=True)  # default: auto
        out = outs[0]
        assert info[0] == {"native_size": float(side), "mode": "detail_preserving", "fidelity": 0.0}
        src = _lapvar(crop)
        assert _lapvar(plain) < 0.1 * src  # what the issue saw (337 -> 1.3 at its size)
        assert _lapvar(out) > 0.8 * src
        assert M.psnr(out / 255.0, crop / 255.0) > M.psnr(plain / 255.0, crop / 255.0) + 1.0


def test_detail_preserving_paste_in_a_photo(restorer, shared_dir):
    # a sharp face far above DETAIL_RATIO x the model size: a 512 px face on a plain background
    photo = cv2.copyMakeBorder(_hq(shared_dir, 1, 512)[0], 160, 160, 160, 160, cv2.BORDER_CONSTANT, value=(120, 120, 120))
    old = restorer.restore_image(photo, detector="retinaface", detail_ratio=1e9, guard=False)
    new = restorer.restore_image(photo, detector="retinaface", guard=False)
    assert [f.extra["mode"] for f in old.faces] == ["restored"] * len(old.faces)
    big = [f for f in new.faces if f.extra["native_size"] > DETAIL_RATIO * restorer.size]
    assert big and all(f.extra["mode"] == "detail_preserving" for f in big)
    lm = big[0].landmarks5  # eyes to mouth: well inside the paste mask
    x0, y0 = (int(v) for v in lm.min(0))
    x1, y1 = (int(v) + 1 for v in lm.max(0))
    roi = lambda im: im[y0:y1, x0:x1]  # noqa: E731
    assert _lapvar(roi(new.image)) > 0.7 * _lapvar(roi(photo)) > 2 * _lapvar(roi(old.image))
    assert not np.array_equal(new.image, photo)


@pytest.mark.parametrize("detector", ["retinaface", "mtcnn"])
def test_aligning_utk_faces_keeps_their_framing(restorer, facexlib_root, shared_dir, detector):
    """The bundled models were trained on UTKFace crops; detecting and aligning such a face (as `adapt` without
    --aligned does) must give a crop framed like the input, not the face in a quarter of the crop (FFHQ template)."""
    from restoration.data import faces as D

    assert template_for_card(restorer.card) == "utk200"
    root = D.default_faces_root()
    names = D.load_split("test")[:6]
    stats = {}
    for tmpl in ("utk200", "ffhq"):
        h = FaceHelper(64, detector=detector, model_root=facexlib_root, face_template=tmpl)
        ssim, rel = [], []
        for n in names:
            for side in (64, 128):
                img = np.asarray(Image.open(root / n).convert("RGB").resize((side, side), Image.BICUBIC))
                faces = h.detect(img)
                assert faces, (n, side)
                crop, affine = h.align(img, faces[0])
                ref = cv2.resize(img, (64, 64), interpolation=cv2.INTER_AREA)
                ssim.append(M.ssim(crop / 255.0, ref / 255.0))
                rel.append(float(np.hypot(affine[0, 0], affine[0, 1])) * side / 64)  # 1: same framing
        stats[tmpl] = (float(np.median(ssim)), float(np.median(rel)))
    assert stats["utk200"][0] > 0.5 and 0.85 < stats["utk200"][1] < 1.15, stats
    assert stats["ffhq"][1] < 0.7 and stats["ffhq"][0] < stats["utk200"][0] - 0.3, stats  # what the bug looked like


def test_api_fidelity_field(embedded_api, shared_dir):
    """POST /v1/restore: `fidelity` in [0, 1] (else a 422 naming the field and why), per-face native_size / mode /
    fidelity in JSON mode, X-FaceAdapt-Modes / X-FaceAdapt-Fidelity headers in image mode."""
    img = (shared_dir / "data/realworld/whole/Blake_Lively.jpg").read_bytes()
    size = Zoo().get(get_settings().default_restorer).restore_size  # the model input size faces are restored at
    c = embedded_api
    post = lambda data, **kw: c.post("/v1/restore", files={"image": ("f.jpg", img, "image/jpeg")},  # noqa: E731
                                     data=data, **kw)
    for bad, why in (("1.5", "less than or equal to 1"), ("-0.1", "greater than or equal to 0"),
                     ("abc", "valid number")):
        r = post({"fidelity": bad})
        assert r.status_code == 422 and "fidelity" in r.json()["detail"] and why in r.json()["detail"], r.text
    r = post({}, headers={"Accept": "application/json"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["fidelity"] == "auto" and sum(body["modes"].values()) == len(body["faces"]) >= 1
    assert body["gray"] is False
    for f in body["faces"]:  # the mode by native size, or (never worse) a fallback from it, with the reason
        planned = f["planned"] or f["mode"]
        assert planned == ("detail_preserving" if f["native_size"] > DETAIL_RATIO * size else "restored")
        assert (f["reason"] is None) == (f["planned"] is None) and f["check"]["detail_kept"] >= 0.8
        assert f["fidelity"] in (0.0, 1.0)
    fell = [k for k, f in enumerate(body["faces"], 1) if f["reason"]]
    r = post({})
    assert r.status_code == 200 and r.headers["x-faceadapt-gray"] == "no"
    assert r.headers["x-faceadapt-fell-back"] == (" | ".join(
        f"face {k}: {body['faces'][k - 1]['reason']}" for k in fell) or "none")
    r = post({"fidelity": "1"})
    assert r.status_code == 200 and r.headers["x-faceadapt-fidelity"] == "1"
    assert r.headers["x-faceadapt-modes"] == f"kept={len(body['faces'])}"
    r = post({"fidelity": "0.3"})
    assert r.status_code == 200 and r.headers["x-faceadapt-fidelity"] == "0.3"
    assert "=" in r.headers["x-faceadapt-modes"] and "kept" not in r.headers["x-faceadapt-modes"]


def test_codeformer_takes_the_fidelity_as_its_w(tmp_path, facexlib_root, shared_dir, monkeypatch):
    """For CodeFormer f goes to the network as w (no pixel blend; auto = the reference's 0.5); f = 1 keeps the face."""
    import torch

    from restoration.models.archs import build
    from restoration.settings import get_settings
    from restoration.models.zoo import Zoo

    monkeypatch.setenv("FACEADAPT_FACEXLIB_MODEL_ROOT", str(facexlib_root))
    get_settings.cache_clear()
    tiny = dict(dim_embd=64, n_head=4, n_layers=2, codebook_size=64, latent_size=64, connect_list=["16", "32"],
                img_size=64, nf=32, ch_mult=[1, 1, 2, 2], res_blocks=1, attn_resolutions=[8], emb_dim=32)
    torch.manual_seed(0)
    zoo = Zoo(tmp_path / "zoo", builtin_dir=None)
    zoo.register("cf", "codeformer", tiny, build("codeformer", tiny).state_dict(), kind="restorer", input_size=64,
                 value_range=(-1, 1), random_init=True)
    try:
        r = Restorer.from_zoo("cf", zoo=zoo, device="cpu")
        img = _photo(shared_dir)
        seen = []
        orig = r.restore_tensor
        r.restore_tensor = lambda x, fidelity=None: (seen.append(fidelity), orig(x, fidelity))[1]
        outs = {}
        for f in (None, 0.2, 0.8, 1.0):
            seen.clear()
            res = r.restore_image(img, detector="retinaface", fidelity=f, guard=False)  # random weights: the check
            outs[f] = res.image                                                         # would keep every face
            want = 0.5 if f is None else f
            assert [fc.extra["fidelity"] for fc in res.faces] == [want] * len(res.faces)
            assert seen == ([] if f == 1.0 else [want])  # the network's w, one batch
        assert not np.array_equal(outs[0.2], outs[0.8]) and np.array_equal(outs[1.0], img)
    finally:
        get_settings.cache_clear()
