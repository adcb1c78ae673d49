"""Never worse, per face (restoration.faces.fidelity.check_face in restore_photo): a face whose result would blur,
wash out or look less natural to the face prior falls back (restored -> detail_preserving -> kept) and says why; gray
photos stay gray unless colour is asked for; 512 px aligned crops follow the detected faces' paste rule (their border
band is left as it was)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from restoration.faces import (MAX_NATURALNESS_DROP_DB, MIN_DETAIL_KEPT, MIN_DETAIL_KEPT_PRIOR,
                               MIN_NOISE_NATURALNESS_GAIN_DB, check_face, is_gray, keep_gray, load_image)
from restoration.faces.alignment import template_for_card
from restoration.faces.helper import FaceHelper
from restoration.faces.restore import restore_photo


@pytest.fixture(scope="module")
def helper(restorer, facexlib_root):
    return FaceHelper(restorer.size, detector="retinaface", model_root=facexlib_root,
                      face_template=template_for_card(restorer.card))


def _hq(shared_dir, side=128):
    f = sorted((shared_dir / "data/hq512").glob("*/*.png"))[0]
    return cv2.resize(np.asarray(Image.open(f).convert("RGB")), (side, side), interpolation=cv2.INTER_AREA)


def _blur_fn(crops, **_):  # a stand-in "model" that smears every face
    return [cv2.GaussianBlur(c, (0, 0), 2.0) for c in crops]


def _sharpen_fn(crops, **_):  # a stand-in "model" that adds detail and keeps the content
    return [np.clip(c.astype(np.float32) * 1.5 - cv2.GaussianBlur(c, (0, 0), 1.0).astype(np.float32) * 0.5, 0,
                    255).astype(np.uint8) for c in crops]


def _lapvar(img):
    return float(cv2.Laplacian(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), cv2.CV_64F, ksize=3).var())


def test_check_face_tells_blur_and_washout_from_a_good_result(shared_dir):
    face = _hq(shared_dir, 128)
    ok = check_face(face, face)
    assert ok["ok"] and ok["detail_kept"] >= 1.0 and ok["why"] is None  # >= 1: the input's own noise is not detail
    blurred = check_face(face, cv2.GaussianBlur(face, (0, 0), 1.5))
    assert not blurred["ok"] and blurred["detail_kept"] < 0.5 and "blur" in blurred["why"]
    mean = face.reshape(-1, 3).mean(0)
    washed = np.clip(mean + 0.6 * (face - mean), 0, 255).astype(np.uint8)
    w = check_face(face, washed)
    assert not w["ok"] and "coarse content" in w["why"] and w["lowpass_db"] < 30
    assert check_face(face, _sharpen_fn([face])[0])["ok"]


def test_removing_upsampled_noise_is_not_blurring(shared_dir):
    """A face with noise made at half its size and upsampled (a low-resolution noisy face enlarged): its clean version
    keeps less fine detail than the noisy input, but what it removed does not follow the face's edges, so it passes;
    a blur of the same noisy face does not."""
    face = _hq(shared_dir, 128)
    rng = np.random.default_rng(0)
    noise = cv2.resize(rng.normal(0, 30, (64, 64, 3)).astype(np.float32), (128, 128), interpolation=cv2.INTER_LINEAR)
    noisy = np.clip(face + noise, 0, 255).astype(np.uint8)
    clean = check_face(noisy, face)
    # under MIN_DETAIL_KEPT (the noise estimate, made for white noise, counts little of it), yet not a blur
    assert clean["ok"] and clean["detail_kept"] < MIN_DETAIL_KEPT and clean["removed_structure"] <= 0, clean
    blurred = check_face(noisy, cv2.GaussianBlur(noisy, (0, 0), 1.5))
    assert not blurred["ok"] and "blur" in blurred["why"] and blurred["removed_structure"] > 0, blurred


def test_the_priors_gain_tells_removed_noise_from_a_blur(shared_dir):
    """With the face prior's figures, a result that loses detail along the face's edges passes when the prior finds it
    at least MIN_NOISE_NATURALNESS_GAIN_DB more natural (what went was noise), and fails when it does not; a heavy blur
    whose removed detail does not follow the edges (removed_structure <= 0: too little fine detail left) fails when it
    keeps under MIN_DETAIL_KEPT_PRIOR and the prior sees no gain."""
    face = _hq(shared_dir, 128)
    rng = np.random.default_rng(0)
    noise = cv2.resize(rng.normal(0, 30, (64, 64, 3)).astype(np.float32), (128, 128), interpolation=cv2.INTER_LINEAR)
    noisy = np.clip(face + noise, 0, 255).astype(np.uint8)
    smooth = cv2.GaussianBlur(noisy, (0, 0), 1.5)
    assert not check_face(noisy, smooth)["ok"]
    gained = check_face(noisy, smooth, naturalness=(30.0, 30.0 + MIN_NOISE_NATURALNESS_GAIN_DB + 0.1))
    assert gained["ok"] and gained["removed_structure"] > 0, gained
    flat = check_face(noisy, smooth, naturalness=(30.0, 30.0 + MIN_NOISE_NATURALNESS_GAIN_DB - 0.2))
    assert not flat["ok"] and "blur" in flat["why"], flat

    crop = load_image(shared_dir / "data/realworld/cropped/0240.png")
    heavy = cv2.GaussianBlur(crop, (0, 0), 4.0)
    alone = check_face(crop, heavy, native_size=512)
    assert alone["detail_kept"] < MIN_DETAIL_KEPT_PRIOR and alone["removed_structure"] <= 0, alone
    judged = check_face(crop, heavy, native_size=512, naturalness=(30.0, 30.1))
    assert not judged["ok"] and "does not find it more natural" in judged["why"], judged
    assert check_face(crop, heavy, native_size=512,
                      naturalness=(30.0, 30.0 + MIN_NOISE_NATURALNESS_GAIN_DB))["ok"]


def test_naturalness_criterion_of_check_face(shared_dir):
    """With the face prior's (before, after) figures, a drop of more than MAX_NATURALNESS_DROP_DB fails and says so;
    a smaller drop, or a gain, does not."""
    face = _hq(shared_dir, 128)
    ok = check_face(face, face, naturalness=(30.0, 30.0 - MAX_NATURALNESS_DROP_DB + 0.2))
    assert ok["ok"] and ok["naturalness_db"] == pytest.approx(-MAX_NATURALNESS_DROP_DB + 0.2)
    bad = check_face(face, face, naturalness=(30.0, 30.0 - MAX_NATURALNESS_DROP_DB - 0.2))
    assert not bad["ok"] and "less natural to the face prior" in bad["why"] and "blur" not in bad["why"]
    assert "naturalness_db" not in check_face(face, face)


@pytest.fixture(scope="module")
def guarded(restorer):
    """The bundled restorer with the bundled guard prior (FACEADAPT_GUARD_PRIOR's default), as the CLI and the API
    run it."""
    import copy

    from restoration.diffusion import load_guard_prior

    r = copy.copy(restorer)
    r.guard_prior = load_guard_prior("faceadapt-iddpm-small")
    return r


def _utk_damaged(n=8, side=128):
    from restoration.data import FacesDataset
    from restoration.training import degradation_params, degrade_pair

    import torch

    ds = FacesDataset("test", side, limit=n)
    lq, _ = degrade_pair(torch.stack([ds[i] for i in range(len(ds))]), degradation_params(), 2_000_000)
    return [(x.permute(1, 2, 0).numpy() * 255.0).round().clip(0, 255).astype(np.uint8) for x in lq]


def test_the_prior_rejects_artefacts_not_restorations(guarded):
    """8 damaged UTK test faces at 128 px: the bundled restorer's results all pass the prior's criterion (each face's
    check carries its naturalness_db); the same results with JPEG quality-8 blocks are called less natural for most
    faces, and at most one of the eight comes out with them as planned (bench/naturalness.py: the prior's criterion
    catches 92% of such results on 48 faces; the detail and low-pass criteria catch others)."""
    from restoration.faces.restore import restore_aligned_crops

    crops = _utk_damaged()
    honest = guarded.restore_aligned(crops)
    nat = [r.faces[0].extra["check"]["naturalness_db"] for r in honest]
    assert min(nat) >= -MAX_NATURALNESS_DROP_DB, nat
    assert all("less natural" not in (r.faces[0].extra.get("reason") or "") for r in honest)

    def blocky(cs, **_):
        out = []
        for c in guarded.restore_crops(cs):
            ok, buf = cv2.imencode(".jpg", c, [cv2.IMWRITE_JPEG_QUALITY, 8])
            out.append(cv2.imdecode(buf, cv2.IMREAD_UNCHANGED))
        return out

    res = restore_aligned_crops(guarded.face_helper("auto"), crops, blocky, naturalness=guarded.naturalness)
    reasons = [face.extra.get("reason") or "" for _, face in res]
    assert sum(face.extra["mode"] == "restored" for _, face in res) <= 1, reasons
    assert sum("less natural to the face prior" in r for r in reasons) >= len(crops) // 2, reasons


def test_a_blurring_model_falls_back_in_a_photo(helper, shared_dir):
    """The regression of the issue (small faces smeared): with a model that blurs, every face falls back and says why,
    and no face of the result has lost detail; with fidelity given the check is off (the user asked for it)."""
    photo = load_image(shared_dir / "data/realworld/whole/03.jpg")
    res = restore_photo(helper, photo, _blur_fn)
    assert res.faces
    for f in res.faces:
        assert f.extra["planned"] == "restored" and f.extra["mode"] in ("detail_preserving", "kept")
        assert "restored rejected: it would blur" in f.extra["reason"] and "instead" in f.extra["reason"]
        x0, y0, x1, y1 = (int(round(float(v))) for v in f.box)
        assert _lapvar(res.image[y0:y1, x0:x1]) >= 0.8 * _lapvar(photo[y0:y1, x0:x1])
    forced = restore_photo(helper, photo, _blur_fn, fidelity=0.0)
    assert all("reason" not in f.extra for f in forced.faces) and not np.array_equal(forced.image, photo)
    # a model that keeps the content and adds detail is used (a face larger than the model input, whose upsampled
    # output would lose the input's finer detail, gets the detail-preserving paste instead)
    good = restore_photo(helper, photo, _sharpen_fn)
    assert all(f.extra["mode"] in ("restored", "detail_preserving") for f in good.faces)
    assert all(f.extra["check"]["detail_kept"] >= MIN_DETAIL_KEPT for f in good.faces)
    assert not np.array_equal(good.image, photo)


@pytest.mark.parametrize("name", ["03.jpg", "10045.png"])
def test_reference_photos_are_never_worse(restorer, name, shared_dir):
    """realworld 03.jpg (small faces: eyes and lips smeared) and 10045.png (the glasses erased), the issue's photos,
    with the bundled restorer: no face is blurred (Laplacian variance over its box under 0.8 x the input's,
    bench/never_worse.py's measure) after the check. Where the unchecked result blurs a face (03.jpg's with the
    bundled model; both photos with the 64 px model the issue saw), the check says why it fell back."""
    photo = load_image(shared_dir / "data/realworld/whole" / name)
    before = restorer.restore_image(photo, detector="retinaface", guard=False)
    after = restorer.restore_image(photo, detector="retinaface")
    assert len(after.faces) == len(before.faces) >= 1

    def ratios(res):
        out = []
        for f in res.faces:
            x0, y0, x1, y1 = (int(round(float(v))) for v in f.box)
            x0, y0 = max(0, x0), max(0, y0)
            out.append(_lapvar(res.image[y0:y1, x0:x1]) / max(_lapvar(photo[y0:y1, x0:x1]), 1e-9))
        return out

    for f, ratio in zip(after.faces, ratios(after)):
        # blurred by the bench's measure only where the check saw removed noise: less fine detail, but what was
        # removed does not follow the face's edges (10045.png's noisy middle face, denoised)
        assert ratio >= 0.8 or (f.extra["mode"] == "restored" and f.extra["check"]["removed_structure"] <= 0.0), \
            (ratio, f.extra)
    assert ratios(after)[0] >= 0.8  # the largest face: 03.jpg's smeared one, 10045.png's glasses
    for fb, rb, fa in zip(before.faces, ratios(before), after.faces):
        if rb < 0.8 and fb.extra.get("mode") == "restored" and fa.extra.get("mode") != "restored":
            assert "it would blur" in fa.extra.get("reason", ""), fa.extra
    if name == "03.jpg":  # the bundled model alone still smears its largest face: the check must catch it
        assert ratios(before)[0] < 0.8 and after.faces[0].extra.get("reason"), (ratios(before), after.faces[0].extra)


def test_removing_noise_is_not_blurring(restorer):
    """A noisy face at the model's size (UTK test faces at 64 px, Gaussian noise of 15 levels): the restorer's
    denoised output is kept as restored (the noise the input carried is not counted as fine detail) and is closer to
    the clean face than the input was."""
    from restoration import metrics as M
    from restoration.data import faces as D

    rng = np.random.default_rng(0)
    root = D.default_faces_root()
    gains = []
    for name in D.load_split("test")[:4]:
        gt = np.asarray(Image.open(root / name).convert("RGB").resize((64, 64), Image.BICUBIC))
        noisy = np.clip(gt + rng.normal(0, 15, gt.shape), 0, 255).astype(np.uint8)
        res = restorer.restore_aligned([noisy])[0]
        assert res.faces[0].extra["mode"] == "restored" and "reason" not in res.faces[0].extra
        gains.append(M.psnr(res.image, gt) - M.psnr(noisy, gt))
    assert min(gains) > 0 and np.mean(gains) > 2.0, gains


def test_gray_stays_gray_unless_colour_is_asked(helper, shared_dir):
    crop = load_image(shared_dir / "data/realworld/cropped_gray/067_David_Beckham_00.png")
    assert is_gray(crop) and not is_gray(_hq(shared_dir))
    tint = lambda crops, **_: [np.clip(c.astype(np.int16) + [12, 0, -12], 0, 255).astype(np.uint8)  # noqa: E731
                               for c in crops]
    small = cv2.resize(crop, (96, 96), interpolation=cv2.INTER_AREA)
    gray = restore_photo(helper, small, tint, aligned=True, fidelity=0.0)
    assert gray.gray and is_gray(gray.image)
    assert np.abs(gray.image[..., 0].astype(int) - gray.image[..., 2]).max() == 0
    colour = restore_photo(helper, small, tint, aligned=True, fidelity=0.0, color=True)
    assert not colour.gray and not is_gray(colour.image)
    # untouched pixels keep their exact values
    out = small.copy()
    out[10:20, 10:20] = [200, 100, 50]
    kept = keep_gray(small, out)
    assert np.array_equal(kept[30:], small[30:]) and is_gray(kept)


def test_aligned_512_crop_keeps_its_border_and_its_tone(restorer, shared_dir):
    """`--aligned` on a 512 px crop: the detail-preserving paste through the paste mask, as for a detected face: the
    border band (hair, background) is left exactly as it was (no halo), and the face keeps its tone (no wash-out)."""
    crop = load_image(sorted((shared_dir / "data/realworld/cropped").iterdir())[0])
    res = restorer.restore_aligned([crop])[0]
    out, info = res.image, res.faces[0].extra
    assert info["native_size"] == 512.0 and info["mode"] in ("detail_preserving", "kept")
    band = int(0.05 * 512)
    assert np.array_equal(out[:band], crop[:band]) and np.array_equal(out[:, -band:], crop[:, -band:])
    assert check_face(crop, out)["lowpass_db"] >= 30.0
    old = restorer.restore_crops([crop])[0]  # what --aligned gave before: the whole crop, border included
    assert not np.array_equal(old[:band], crop[:band])


def test_api_says_why_and_keeps_gray(embedded_api, shared_dir):
    """POST /v1/restore: a gray photo comes back gray (X-FaceAdapt-Gray: kept, JSON gray true) unless color=true; the
    JSON face list carries each face's check, and a face that fell back its planned mode and reason."""
    import base64
    import io

    gray = load_image(shared_dir / "data/realworld/cropped_gray/Einstein01.png")
    buf = io.BytesIO()
    Image.fromarray(cv2.resize(gray, (256, 256), interpolation=cv2.INTER_AREA)).save(buf, "PNG")
    photo = (shared_dir / "data/realworld/whole/03.jpg").read_bytes()
    c = embedded_api

    def post(data, img=buf.getvalue(), **kw):
        return c.post("/v1/restore", files={"image": ("f.png", img, "image/png")}, data=data, **kw)

    r = post({"aligned": "true"})
    assert r.status_code == 200 and r.headers["x-faceadapt-gray"] == "kept", r.text
    assert is_gray(np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB")))
    r = post({"aligned": "true", "color": "true"})
    assert r.status_code == 200 and r.headers["x-faceadapt-gray"] == "no"
    r = post({}, img=photo, headers={"Accept": "application/json"})
    body = r.json()
    assert r.status_code == 200 and body["gray"] is False and body["faces"], r.text
    out = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["image"]))).convert("RGB"))
    assert out.shape == load_image(photo).shape
    for f in body["faces"]:
        assert f["check"]["detail_kept"] >= MIN_DETAIL_KEPT and f["check"]["lowpass_db"] >= 30
        assert f["check"]["naturalness_db"] >= -MAX_NATURALNESS_DROP_DB  # the default guard prior is on
    assert any(f["reason"] and f["planned"] == "restored" for f in body["faces"])  # 03.jpg's face, smeared


def test_api_guard_prior_setting(embedded_api, shared_dir, monkeypatch):
    """FACEADAPT_GUARD_PRIOR=none: the check runs without the prior (no naturalness_db); a prior the zoo does not hold:
    503 guard_prior_unavailable naming the setting, not a 500."""
    from app import serving
    from restoration.settings import get_settings

    photo = (shared_dir / "data/realworld/whole/03.jpg").read_bytes()

    def post():
        return embedded_api.post("/v1/restore", files={"image": ("f.jpg", photo, "image/jpeg")},
                                 headers={"Accept": "application/json"})

    for value in ("none", "no-such-prior"):
        monkeypatch.setenv("FACEADAPT_GUARD_PRIOR", value)
        get_settings.cache_clear()
        if serving._cache is not None:  # a fresh model cache (and guard prior) under the new setting
            serving._cache.clear()
            serving._cache = None
        r = post()
        if value == "none":
            assert r.status_code == 200, r.text
            assert all("naturalness_db" not in f["check"] for f in r.json()["faces"])
        else:
            assert r.status_code == 503 and r.json()["error"] == "guard_prior_unavailable", r.text
            assert "FACEADAPT_GUARD_PRIOR" in r.json()["detail"]
