"""Serving under pressure (issue 10): more restorer models in use than the model cache holds, the faces-per-image
cap, the image format allow-list, oversized bodies answered with a 413 JSON, unexpected errors as JSON, and a clean
SIGTERM shutdown. Everything runs against a real uvicorn process on the real test stack (PostgreSQL, Redis).
Lean serving (issue 18): the micro-batcher never waits for nobody, the static batch, the lean options of a loaded
restorer (unit tests of app.serving, no stack) and an API started with them (on the stack)."""
from __future__ import annotations

import concurrent.futures
import copy
import io
import itertools
import json
import re
import signal
import socket
import subprocess
import threading
import time

import httpx
import numpy as np
import pytest
import torch

from app.serving import MicroBatcher, StaticBatch, lean
from restoration import Restorer, build
from restoration.models import ModelCard
from restoration.runtime import to_channels_last, to_contiguous
from service.settings import ServiceSettings

pytest_plugins = ["test_service_harness"]

from test_service_harness import PY, REPO, face_files, start_api, wait_ready  # noqa: E402

EXTRA_MODELS = [f"standin-r{i}" for i in range(1, 5)]  # with the default restorer: 5 models


def register_standins(env: dict, names: list[str]) -> None:
    """Random-init 64x64 restorers in the stack's zoo (FACEADAPT_MODELS_DIR); the next API start publishes them."""
    code = r'''
import sys, torch
from restoration.models.zoo import Zoo, instantiate
zoo = Zoo(); have = {c.name for c in zoo.list()}
cfg = dict(img_size=64, patch_size=1, in_chans=3, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=8,
           mlp_ratio=2, sf=8, img_range=1.0, upsampler="nearest+conv", resi_connection="1conv", unshuffle=True,
           unshuffle_scale=8)
for i, name in enumerate(sys.argv[1:]):
    if name in have:
        continue
    torch.manual_seed(100 + i)
    m = instantiate("swinir_face", cfg)
    zoo.register(name, "swinir_face", cfg, m.state_dict(), kind="restorer", input_size=64, value_range=[0, 1],
                 random_init=True, provenance="test stand-in (random init)")
'''
    subprocess.run([PY, "-c", code, *names], env=env, cwd=REPO, check=True)


class Api:
    """A second API process on the stack (model cache of 2, at most 3 faces per image, 5 restorer models plus a broken
    one); started on first use and again after a test stopped it."""

    def __init__(self, st, logdir):
        self.st, self.logdir, self.proc, self.n = st, logdir, None, 0
        register_standins(st.env, EXTRA_MODELS + [BROKEN])
        self.env = {**st.env, "FACEADAPT_MODEL_CACHE_SIZE": "2", "FACEADAPT_BATCH_MAX_WAIT_MS": "20",
                    "FACEADAPT_PUBLIC_MODELS": ",".join(EXTRA_MODELS + [BROKEN]),
                    "FACEADAPT_RESTORE_TIMEOUT_S": "60", "FACEADAPT_MAX_FACES_PER_IMAGE": "3"}

    def published(self) -> bool:
        """Are the stand-ins public registry models? (An API start with another FACEADAPT_PUBLIC_MODELS, e.g. by
        another test, takes them out; a start of this API puts them back.)"""
        names = EXTRA_MODELS + [BROKEN]
        n = self.st.sql("SELECT count(*) FROM models WHERE tenant_id IS NULL AND name = ANY(%s)", names)[0][0]
        return n == len(names)

    def ensure(self):
        if self.proc is not None and self.proc.poll() is None and not self.published():
            self.stop()
        if self.proc is None or self.proc.poll() is not None:
            self.n += 1
            log = self.logdir / f"api-small-cache-{self.n}.log"
            self.proc = start_api(self.env, log)
            self.proc.log = log
            wait_ready(self.proc, log)
        return self.proc

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


BROKEN = "standin-broken"


@pytest.fixture(scope="module")
def second_api(service_stack, tmp_path_factory):
    api = Api(service_stack, tmp_path_factory.mktemp("serving"))
    try:
        yield api
    finally:
        api.stop()


def test_more_models_than_cache_never_hangs_and_sigterm_finishes(second_api, service_stack, tenant_b):
    """5 models requested concurrently through a cache of 2: every request is answered (no hang), and SIGTERM then
    stops the server promptly (it used to wait forever on requests stuck behind a closed batcher)."""
    api, st = second_api.ensure(), service_stack
    auth = st.auth(tenant_b)
    models = ["default", *EXTRA_MODELS]
    faces = [f.read_bytes() for f in face_files(6, offset=60)]
    # detection runs between taking the model from the cache and handing its crops to the batcher: the window in
    # which another request's load evicted it
    jobs = list(itertools.islice(zip(itertools.cycle(models), itertools.cycle(faces), itertools.cycle(["true", "false"])), 200))

    def one(job):
        model, data, aligned = job
        try:
            with httpx.Client(base_url=api.url, timeout=45) as c:
                r = c.post("/v1/restore", files={"image": ("f.jpg", data, "image/jpeg")},
                           data={"model": model, "aligned": aligned}, headers=auth)
            return r.status_code, r.headers.get("x-faceadapt-model")
        except httpx.TimeoutException:
            return "hang", model

    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(24) as ex:
        results = list(ex.map(one, jobs))
    hangs = [r for r in results if r[0] == "hang"]
    errors = [r for r in results if r[0] not in (200, "hang")]
    assert not hangs and not errors, (len(hangs), errors[:5], time.time() - t0)
    assert {m for _, m in results} >= set(EXTRA_MODELS)
    # SIGTERM while a second wave of requests is in flight: the server finishes its shutdown, and every request gets
    # an answer or a closed connection, none is left hanging
    ex = concurrent.futures.ThreadPoolExecutor(24)
    wave = [ex.submit(one, job) for job in jobs[:60]]
    time.sleep(2)
    t0 = time.time()
    api.send_signal(signal.SIGTERM)
    try:
        rc = api.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"API still running 30 s after SIGTERM:\n{api.log.read_text()[-3000:]}")
    finally:
        ex.shutdown(wait=False, cancel_futures=True)
    assert rc in (0, -signal.SIGTERM), api.log.read_text()[-3000:]  # uvicorn re-raises the signal it handled
    assert time.time() - t0 < 30
    done = []
    for f in wave:
        try:
            done.append(f.result(timeout=60))
        except concurrent.futures.CancelledError:
            continue  # never sent: the pool was shut down
        except httpx.TransportError:
            done.append(("closed", None))  # refused or cut by the stopping server: an answer, not a hang
    assert not [r for r in done if r[0] == "hang"], done
    assert any(r[0] == 200 for r in done), done  # some were in flight and finished


def _image(fmt: str, size=(64, 48), **kw) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (120, 100, 90)).save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_faces_per_image_are_capped(second_api, service_stack, tenant_b):
    """A group photo with more faces than FACEADAPT_MAX_FACES_PER_IMAGE (3 here): the 3 largest are restored and the
    answer says how many were found."""
    from PIL import Image

    api, st = second_api.ensure(), service_stack
    sizes = [240, 200, 170, 130, 120, 110]
    canvas = Image.new("RGB", (sum(sizes) + 20 * (len(sizes) + 1), 300), (200, 200, 200))
    tiles, x = [], 20
    for f, side in zip(face_files(len(sizes), offset=30), sizes):
        canvas.paste(Image.open(f).convert("RGB").resize((side, side)), (x, 20))
        tiles.append((x, 20, x + side, 20 + side))
        x += side + 20
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    with httpx.Client(base_url=api.url, timeout=120) as c:
        r = c.post("/v1/restore", files={"image": ("group.png", buf.getvalue(), "image/png")},
                   headers={**st.auth(tenant_b), "Accept": "application/json"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["faces_found"] >= 4, body["faces_found"]  # the detector finds more than the cap
        assert body["faces_restored"] == 3 and len(body["faces"]) == 3
        centres = [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in (f["box"] for f in body["faces"])]
        hit = sorted(next(i for i, t in enumerate(tiles) if t[0] <= cx <= t[2] and t[1] <= cy <= t[3]) for cx, cy in centres)
        assert hit == [0, 1, 2], hit  # the three largest faces
        r = c.post("/v1/restore", files={"image": ("group.png", buf.getvalue(), "image/png")}, headers=st.auth(tenant_b))
        assert r.status_code == 200 and r.headers["x-faceadapt-faces"] == "3"
        assert int(r.headers["x-faceadapt-faces-found"]) == body["faces_found"]


def test_image_format_allow_list(service_stack, tenant_b):
    """PNG, JPEG, WebP, BMP and TIFF are restored; EPS, GIF, PDF are refused from their signature (415, before any
    decoder: an EPS never reaches Ghostscript); bytes that are no image are a 400."""
    st = service_stack
    auth = st.auth(tenant_b)
    post = lambda name, data: st.client.post("/v1/restore", files={"image": (name, data, "application/octet-stream")},  # noqa: E731
                                             data={"aligned": "true"}, headers=auth)
    for fmt in ("PNG", "JPEG", "WEBP", "BMP", "TIFF"):
        r = post(f"x.{fmt.lower()}", _image(fmt))
        assert r.status_code == 200, (fmt, r.text)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 48\n0 0 moveto 64 48 lineto stroke\nshowpage\n%%EOF\n"
    for name, data, fmt in (("x.eps", eps, "eps"), ("x.gif", _image("GIF"), "gif"),
                            ("x.pdf", b"%PDF-1.4\n1 0 obj<<>>endobj\n", "pdf"), ("photo.jpg", eps, "eps")):
        r = post(name, data)
        assert r.status_code == 415, (name, r.text)
        body = r.json()
        assert body["error"] == "unsupported_format" and body["format"] == fmt and body["limit"] == "image_formats", body
        assert "png, jpeg, webp, bmp, tiff" in body["detail"]
    r = post("x.png", b"hello, not an image at all")
    assert r.status_code == 400 and r.json()["error"] == "bad_image", r.text
    # in a dataset upload the refused file is listed with the reason and the rest is accepted
    face = face_files(1, offset=40)[0]
    r = st.client.post("/v1/datasets", files=[("files", (face.name, face.read_bytes(), "image/jpeg")),
                                              ("files", ("cover.eps", eps, "application/postscript"))], headers=auth)
    assert r.status_code == 201, r.text
    rejected = {x["file"]: x["reason"] for x in r.json()["rejected"]}
    assert "EPS" in rejected["cover.eps"] and r.json()["images_accepted"] == 1, rejected


def test_pixel_limit_names_the_real_size(service_stack, tenant_b):
    """A header announcing more pixels than even Pillow opens: the 413 names the announced size and the configured
    limit (it used to invent 1048576x1048576)."""
    import struct
    import zlib

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 30_000, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b""))
    st = service_stack
    r = st.client.post("/v1/restore", files={"image": ("bomb.png", png, "image/png")}, headers=st.auth(tenant_b))
    assert r.status_code == 413, r.text
    body = r.json()
    limit = int(st.env["FACEADAPT_MAX_IMAGE_PIXELS"])
    assert body["limit"] == "max_image_pixels" and body["limit_value"] == limit
    assert "3000000000 pixels" in body["detail"] and str(limit) in body["detail"], body


def test_oversized_upload_gets_413_json_not_a_reset(service_stack, tenant_b):
    """A 120 MB restore upload (limit 3 MiB here) is answered 413 JSON naming the real limit, on a connection that
    stays usable; chunked and `Expect: 100-continue` uploads too."""
    st = service_stack
    auth = st.auth(tenant_b)
    limit = int(st.env["FACEADAPT_MAX_UPLOAD_BYTES"])
    big = b"\xff\xd8\xff" + b"\0" * (120 * 1000 * 1000)
    with httpx.Client(base_url=st.url, timeout=120) as c:
        t0 = time.time()
        r = c.post("/v1/restore", files={"image": ("big.jpg", big, "image/jpeg")}, headers=auth)
        assert r.status_code == 413, r.text
        body = r.json()
        assert body["error"] == "limit_exceeded" and body["limit"] == "max_upload_bytes" and body["limit_value"] == limit
        assert f"({limit} bytes = 3 MiB; FACEADAPT_MAX_UPLOAD_BYTES)" in body["detail"], body
        assert str(int(r.request.headers["content-length"])) in body["detail"]  # the announced size, not invented
        assert time.time() - t0 < 60
        # the same connection serves the next request (the body was read and discarded, not left unread)
        assert c.get("/healthz").status_code == 200

        def chunks():
            yield b"--xx\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.jpg\"\r\n\r\n"
            for _ in range(40):
                yield b"\0" * (512 * 1024)  # 20 MiB without Content-Length

        r = c.post("/v1/restore", content=chunks(), headers={**auth, "Content-Type": "multipart/form-data; boundary=xx"})
        assert r.status_code == 413 and r.json()["limit"] == "max_upload_bytes", r.text
    port = int(st.url.rsplit(":", 1)[1])
    # a client that writes its whole request before reading (curl without Expect, requests, urllib): the server used
    # to close the socket with the body unread, and the client got a broken pipe / connection reset
    body = (b"--xx\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.jpg\"\r\n\r\n" + big
            + b"\r\n--xx--\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"POST /v1/restore HTTP/1.1\r\nHost: 127.0.0.1\r\n" + f"Authorization: {auth['Authorization']}\r\n".encode()
                     + b"Content-Type: multipart/form-data; boundary=xx\r\n" + f"Content-Length: {len(body)}\r\n\r\n".encode())
        sock.sendall(body)
        answer = b""
        while not answer.endswith(b"}") and (chunk := sock.recv(65536)):
            answer += chunk
    head, _, payload = answer.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 413"), answer[:500]
    assert json.loads(payload)["limit_value"] == limit
    # Expect: 100-continue (curl's way for big bodies): the 413 comes before any body byte is sent
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /v1/restore HTTP/1.1\r\nHost: 127.0.0.1\r\n" + f"Authorization: {auth['Authorization']}\r\n".encode()
                     + b"Content-Type: multipart/form-data; boundary=xx\r\nContent-Length: 125829120\r\n"
                     + b"Expect: 100-continue\r\n\r\n")
        head = b""
        while chunk := sock.recv(65536):  # the server closes the connection after its answer
            head += chunk
        head = head.decode(errors="replace")
    assert head.startswith("HTTP/1.1 413"), head
    assert "max_upload_bytes" in head and "125829120" in head


def test_unexpected_errors_are_json(second_api, service_stack, tenant_b):
    """An error nobody planned for (here: a model whose weights file is damaged on disk) is the documented JSON
    error with an id that is in the server log, not Starlette's plain-text 500."""
    import shutil

    api, st = second_api.ensure(), service_stack
    weights = st.home / "models" / BROKEN / "model.safetensors"
    backup = weights.with_suffix(".bak")
    shutil.copyfile(weights, backup)
    try:
        weights.write_bytes(weights.read_bytes()[:100])
        face = face_files(1, offset=41)[0].read_bytes()
        with httpx.Client(base_url=api.url, timeout=60) as c:
            r = c.post("/v1/restore", files={"image": ("f.jpg", face, "image/jpeg")},
                       data={"model": BROKEN, "aligned": "true"}, headers=st.auth(tenant_b))
            assert r.status_code == 500, r.text
            assert r.headers["content-type"] == "application/json", r.headers
            body = r.json()
            assert body["error"] == "internal_error" and body["error_id"] in body["detail"], body
            assert c.get("/healthz").status_code == 200  # the process is fine
        time.sleep(0.5)
        assert body["error_id"] in api.log.read_text()
    finally:
        shutil.move(backup, weights)


def test_restore_timeout_is_a_503(second_api, service_stack, tenant_b, tmp_path):
    """A request that cannot get its batch within FACEADAPT_RESTORE_TIMEOUT_S gets a 503 JSON naming the setting
    (here the timeout, 1 ms, is shorter than any network pass; a lone request no longer waits for company), and the
    server stays healthy."""
    st = service_stack
    env = {**second_api.env, "FACEADAPT_RESTORE_TIMEOUT_S": "0.001"}
    api = start_api(env, tmp_path / "api-timeout.log")
    try:
        wait_ready(api, tmp_path / "api-timeout.log")
        face = face_files(1, offset=42)[0].read_bytes()
        with httpx.Client(base_url=api.url, timeout=60) as c:
            t0 = time.time()
            r = c.post("/v1/restore", files={"image": ("f.jpg", face, "image/jpeg")}, data={"aligned": "true"},
                       headers=st.auth(tenant_b))
            assert r.status_code == 503, r.text
            body = r.json()
            assert body["error"] == "restore_timeout" and body["limit"] == "restore_timeout_s", body
            assert "FACEADAPT_RESTORE_TIMEOUT_S" in body["detail"] and body["limit_value"] == 0.001
            assert time.time() - t0 < 30
            assert c.get("/healthz").status_code == 200
    finally:
        api.send_signal(signal.SIGTERM)
        api.wait(timeout=30)


def test_short_load_run_has_no_errors_or_hangs(second_api, service_stack, tenant_b):
    """bench/load.py, short: 10 clients for 10 s mixing restores with 3 models (through a cache of 2), dataset uploads
    and job polling against the real API: no error, no hang."""
    api = second_api.ensure()
    out = subprocess.run([PY, str(REPO / "bench" / "load.py"), "--url", api.url, "--key", tenant_b, "--clients", "10",
                          "--duration", "10", "--timeout", "45", "--models", ",".join(EXTRA_MODELS[:3]),
                          "--no-prepare-models"], cwd=REPO, capture_output=True, text=True, timeout=300)
    print(out.stdout[-3000:])
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " 0 errors, 0 hangs" in out.stdout


# ---------------------------------------------------------------------------------------------- lean serving (issue 18)
def _crop(v: int = 0):
    return np.full((8, 8, 3), v, np.uint8)


def test_a_lone_request_is_not_held_for_the_batch_wait():
    """With nobody else on the way, a batch starts at once: a batch wait of an hour does not hold a lone request
    (before: every batch waited the whole batch_max_wait_ms for more; here that meant the 503 after timeout_s)."""
    batches = []
    batcher = MicroBatcher(lambda cs: batches.append(len(cs)) or cs, 8, 3600.0, "t", timeout_s=30)
    try:
        for v in range(3):
            out = batcher([_crop(v)])
            assert out[0][0, 0, 0] == v
        with batcher.expecting():  # announced, and submitting: the batcher does not wait for itself
            assert batcher([_crop(7)])[0][0, 0, 0] == 7
        assert batches == [1, 1, 1, 1] and batcher.coming == 0
    finally:
        batcher.close()


def test_announced_requests_join_the_batch_and_a_withdrawal_ends_the_wait():
    """A caller inside expecting() is waited for (its crops join the same batch); one that leaves without submitting
    (no face to restore) releases the waiting batch."""
    batches = []
    batcher = MicroBatcher(lambda cs: batches.append(len(cs)) or cs, 8, 3600.0, "t", timeout_s=30)
    try:
        announced, go = threading.Event(), threading.Event()
        results = {}

        def late():
            with batcher.expecting():
                announced.set()
                go.wait(30)
                results["late"] = batcher([_crop(2), _crop(3)])

        t = threading.Thread(target=late)
        t.start()
        assert announced.wait(30) and batcher.coming == 1
        fut = batcher.submit([_crop(1)])  # the batch now waits for the announced caller
        go.set()
        assert [c[0, 0, 0] for c in fut.result(30)] == [1]
        t.join(30)
        assert [c[0, 0, 0] for c in results["late"]] == [2, 3]
        assert batches == [3]  # one network pass for both callers

        def withdraws():
            with batcher.expecting():
                announced.set()
                go.wait(30)  # leaves without submitting

        announced.clear(), go.clear()
        t = threading.Thread(target=withdraws)
        t.start()
        assert announced.wait(30)
        fut = batcher.submit([_crop(4)])
        go.set()
        assert [c[0, 0, 0] for c in fut.result(30)] == [4]  # not held for the hour
        t.join(30)
        assert batcher.coming == 0 and batches == [3, 1]
    finally:
        batcher.close()


def test_static_batch_pads_to_fixed_shapes_and_returns_only_the_callers_crops():
    seen = []

    def fn(crops):
        seen.append(len(crops))
        return [c + 1 for c in crops]

    static = StaticBatch(fn, 4)
    out = static([_crop(v) for v in range(5)])
    assert seen == [8] and [c[0, 0, 0] for c in out] == [1, 2, 3, 4, 5]
    assert [c[0, 0, 0] for c in static([_crop(9)] * 4)] == [10] * 4 and seen[-1] == 4
    assert static([]) == [] and seen[-1] == 0


def test_lean_options_keep_the_restore(tmp_path):
    """serve_precision / serve_channels_last / serve_static_batch applied to a loaded restorer (`app.serving.lean`)
    give the same crops as the plain restorer (fp32 and channels_last: to the rounding of uint8; bf16: close), and
    channels_last works for GFPGAN's 5-D modulated weights too."""
    cfg = dict(out_size=64, num_style_feat=32, channel_multiplier=2, decoder_load_path=None, fix_decoder=False,
               num_mlp=8, input_is_latent=True, different_w=True, narrow=0.0625, sft_half=True)
    torch.manual_seed(0)
    model = build("gfpgan_v1_4", cfg).eval()
    card = ModelCard(name="gfp", arch="gfpgan_v1_4", kind="restorer", input_size=64, value_range=[-1.0, 1.0])
    crops = [np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8) for i in range(3)]
    ref = Restorer(model, card, device="cpu", batch_size=4).restore_crops(crops)
    for opts, tol in (({"serve_channels_last": True, "serve_static_batch": True}, 1),
                      ({"serve_precision": "bf16"}, 24)):
        restorer = Restorer(copy.deepcopy(model), card, device="cpu", batch_size=4)
        fn = lean(restorer, ServiceSettings(**opts))
        got = fn(crops)
        assert len(got) == 3
        for a, b in zip(got, ref):
            assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() <= tol, opts
        assert restorer.precision == opts.get("serve_precision", "auto")
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    to_channels_last(model)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    to_contiguous(model)
    assert conv.weight.is_contiguous()


def test_lean_settings_through_the_api(service_stack, tenant_b, tmp_path):
    """An API started with the lean options (preload, static batch, channels_last, fp32, torch threads) has the default
    restorer loaded before any request, and serves restores as usual."""
    env = {**service_stack.env, "FACEADAPT_SERVE_PRELOAD": "true", "FACEADAPT_SERVE_STATIC_BATCH": "true",
           "FACEADAPT_SERVE_CHANNELS_LAST": "true", "FACEADAPT_SERVE_PRECISION": "fp32",
           "FACEADAPT_TORCH_THREADS": "1", "FACEADAPT_BATCH_MAX_SIZE": "4"}
    log = tmp_path / "api-lean.log"
    proc = start_api(env, log)
    try:
        wait_ready(proc, log)
        auth = {"Authorization": f"Bearer {tenant_b}"}
        metrics = httpx.get(proc.url + "/metrics", headers=service_stack.metrics_auth, timeout=60).text
        loads = sum(float(v) for v in re.findall(r"^faceadapt_model_loads_total ([0-9.e+]+)", metrics, re.M))
        assert loads == 1, metrics[-2000:]  # preloaded at start
        data = face_files(1, offset=40)[0].read_bytes()
        with concurrent.futures.ThreadPoolExecutor(3) as ex:
            rs = list(ex.map(lambda _: httpx.post(proc.url + "/v1/restore", files={"image": ("f.jpg", data)},
                                                  data={"aligned": "true"}, headers=auth, timeout=120), range(3)))
        assert [r.status_code for r in rs] == [200] * 3, rs[0].text
        assert rs[0].content == rs[1].content == rs[2].content
    finally:
        proc.kill()
        proc.wait()
