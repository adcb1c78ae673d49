"""Serving under pressure (issue 10): more restorer models in use than the model cache holds, the faces-per-image
cap, the image format allow-list, oversized bodies answered with a 413 JSON, unexpected errors as JSON, and a clean
SIGTERM shutdown. Everything runs against a real uvicorn process on the real test stack (PostgreSQL, Redis)."""
from __future__ import annotations

import concurrent.futures
import io
import itertools
import signal
import socket
import subprocess
import time

import httpx
import pytest

pytest_plugins = ["test_service_harness"]

from test_service_harness import PY, REPO, face_files, start_api, wait_ready  # noqa: E402

EXTRA_MODELS = [f"standin-r{i}" for i in range(1, 5)]  # with the default restorer: 5 models


def register_standins(env: dict, names: list[str]) -> None:
    """Random-init 64x64 restorers in the stack's zoo (FACEADAPT_MODELS_DIR); the next API start publishes them."""
    code = r'''
import sys, torch
from restoration.zoo import Zoo, instantiate
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


@pytest.fixture(scope="module")
def small_cache_api(service_stack, tmp_path_factory):
    """A second API process on the stack with a model cache of 2 and 5 restorer models to choose from."""
    st = service_stack
    register_standins(st.env, EXTRA_MODELS)
    env = {**st.env, "FACEADAPT_MODEL_CACHE_SIZE": "2", "FACEADAPT_BATCH_MAX_WAIT_MS": "20",
           "FACEADAPT_PUBLIC_MODELS": ",".join(EXTRA_MODELS),
           "FACEADAPT_RESTORE_TIMEOUT_S": "60"}
    log = tmp_path_factory.mktemp("serving") / "api-small-cache.log"
    api = start_api(env, log)
    api.log = log
    try:
        wait_ready(api, log)
        yield api
    finally:
        if api.poll() is None:
            api.kill()
            api.wait()


def test_more_models_than_cache_never_hangs_and_sigterm_finishes(small_cache_api, service_stack, tenant_b):
    """5 models requested concurrently through a cache of 2: every request is answered (no hang), and SIGTERM then
    stops the server promptly (it used to wait forever on requests stuck behind a closed batcher)."""
    api, st = small_cache_api, service_stack
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
    # SIGTERM: the server finishes its shutdown
    t0 = time.time()
    api.send_signal(signal.SIGTERM)
    try:
        rc = api.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"API still running 30 s after SIGTERM:\n{api.log.read_text()[-3000:]}")
    assert rc in (0, -signal.SIGTERM), api.log.read_text()[-3000:]  # uvicorn re-raises the signal it handled
    assert time.time() - t0 < 30
