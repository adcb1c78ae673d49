"""Shared test fixtures. `../shared` (beside the repo) holds the data and compat fixtures; it is read in place."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FACEADAPT_SHARED", REPO.parent / "shared")).resolve()
COMPAT = SHARED / "compat"

# The tests adapt tiny sets (2-8 images, also through the service stack, which inherits this environment): the
# engine's minimum (restoration.adaptation.checks.MIN_IMAGES, measured for the real models) is lowered for them;
# tests/test_small_sets.py checks the default itself.
os.environ.setdefault("FACEADAPT_MIN_ADAPT_IMAGES", "2")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"shared data folder not found at {SHARED} (set FACEADAPT_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def compat_dir(shared_dir: Path) -> Path:
    return shared_dir / "compat"


@pytest.fixture(scope="session")
def facexlib_root(shared_dir: Path) -> Path:
    return shared_dir / "weights" / "facexlib"


@pytest.fixture(scope="module")
def restorer(facexlib_root):
    """The bundled restorer (faceadapt-swinir-small: adapted at 64 px, restores at 128) on the CPU, the shared facexlib weights in the settings."""
    from restoration.faces.restore import Restorer
    from restoration.settings import get_settings

    mp = pytest.MonkeyPatch()
    mp.setenv("FACEADAPT_FACEXLIB_MODEL_ROOT", str(facexlib_root))
    get_settings.cache_clear()
    yield Restorer.from_zoo("faceadapt-swinir-small", device="cpu")
    mp.undo()
    get_settings.cache_clear()


@pytest.fixture
def embedded_api(tmp_path, monkeypatch, facexlib_root):
    """The app in process on its embedded defaults (SQLite, local storage under tmp_path), as a TestClient holding a
    fresh API key of tenant 'acme'; the settings and the model cache are cleared afterwards."""
    from fastapi.testclient import TestClient

    from restoration.settings import get_settings

    for k, v in {"FACEADAPT_HOME": tmp_path / "home", "FACEADAPT_FACEXLIB_MODEL_ROOT": facexlib_root,
                 "FACEADAPT_DEVICE": "cpu", "FACEADAPT_DATABASE_URL": "", "FACEADAPT_BROKER_URL": ""}.items():
        if v == "":
            monkeypatch.delenv(k, raising=False)
        else:
            monkeypatch.setenv(k, str(v))
    get_settings.cache_clear()
    try:
        from app.main import create_app
        from service.db import session_scope
        from service.tenants import create_key

        with TestClient(create_app()) as c:
            with session_scope() as s:
                c.headers["Authorization"] = f"Bearer {create_key(s, 'acme')}"
            yield c
    finally:
        get_settings.cache_clear()
        from app import serving

        if serving._cache is not None:
            serving._cache.clear()
            serving._cache = None
