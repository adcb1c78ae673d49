"""The layers: the ML settings hold only what the ML core reads and the service settings extend them (one
FACEADAPT_* namespace, one cache); the ML core imports no web, database or queue package; the import-linter contracts
of pyproject.toml hold (when import-linter is installed: `make test` runs it too)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from restoration.settings import Settings
from restoration.settings import get_settings as ml_settings
from service.settings import ServiceSettings, get_settings

REPO = Path(__file__).resolve().parents[1]
ML_FIELDS = {"home", "models_dir", "facexlib_model_root", "device", "default_restorer", "default_prior", "guard_prior",
             "detector", "image_formats", "min_adapt_images"}


def test_settings_split_into_one_namespace(monkeypatch, tmp_path):
    assert set(Settings.model_fields) == ML_FIELDS
    assert ML_FIELDS < set(ServiceSettings.model_fields) and issubclass(ServiceSettings, Settings)
    assert {"database_url", "broker_url", "storage_backend", "max_upload_bytes", "lease_ttl_s"} <= set(
        ServiceSettings.model_fields)
    monkeypatch.setenv("FACEADAPT_HOME", str(tmp_path / "a"))
    monkeypatch.setenv("FACEADAPT_LEASE_TTL_S", "7")
    get_settings.cache_clear()
    try:
        s = get_settings()
        assert s.home_dir == ml_settings().home_dir == tmp_path / "a" and s.lease_ttl_s == 7
        assert get_settings() is s  # cached
        monkeypatch.setenv("FACEADAPT_HOME", str(tmp_path / "b"))
        ml_settings.cache_clear()  # what the ML tests do: the service settings follow
        assert get_settings().home_dir == ml_settings().home_dir == tmp_path / "b"
        monkeypatch.setenv("FACEADAPT_HOME", str(tmp_path / "c"))
        get_settings.cache_clear()  # and clearing the service's clears both
        assert ml_settings().home_dir == get_settings().home_dir == tmp_path / "c"
    finally:
        get_settings.cache_clear()


def test_ml_core_imports_no_service_package():
    code = """
import importlib, pkgutil, sys
import restoration
for m in pkgutil.walk_packages(restoration.__path__, "restoration."):
    importlib.import_module(m.name)
bad = sorted({n.split(".")[0] for n in sys.modules} & {"fastapi", "starlette", "sqlalchemy", "celery", "kombu",
              "redis", "boto3", "uvicorn", "alembic", "prometheus_client", "service", "app", "worker", "cli"})
print(",".join(bad))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "", f"restoration imports {out.stdout.strip()}"


@pytest.mark.skipif(importlib.util.find_spec("importlinter") is None, reason="import-linter is not installed")
def test_import_contracts_hold():
    out = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                          "sys.argv = ['lint-imports']; lint_imports_command()"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
