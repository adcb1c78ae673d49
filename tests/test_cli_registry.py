"""One registry: the CLI lists, shows and restores with the models the service registered on the same home, by the
API's tenant rules (a tenant's own model, else a public one; never another tenant's). Without a service database the
CLI shows and uses the zoo alone, and creates nothing."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from restoration.models.zoo import Zoo
from service import blobs
from service.db import migrate, session_scope
from service.registry import sync_zoo_models
from service.rows import ModelRow
from service.settings import get_settings
from service.tenants import get_or_create_tenant

BASE = "faceadapt-swinir-small"


@pytest.fixture
def home(tmp_path, monkeypatch):
    for k in ("FACEADAPT_DATABASE_URL", "FACEADAPT_MODELS_DIR", "FACEADAPT_STORAGE_DIR", "FACEADAPT_CACHE_DIR",
              "FACEADAPT_STORAGE_BACKEND", "FACEADAPT_DEFAULT_RESTORER"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("FACEADAPT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FACEADAPT_DEVICE", "cpu")
    get_settings.cache_clear()
    yield tmp_path / "home"
    get_settings.cache_clear()


def faceadapt(*args: str):
    from cli import app

    return CliRunner().invoke(app, list(args))


def register(tenant: str, name: str) -> str:
    """Register the bundled restorer's weights as `tenant`'s model `name`, as a job would: files in the blob store,
    a registry row with its blob references."""
    card = Zoo().get(BASE)
    folder = Path(card.path)
    card_json = card.to_json() | {"name": name}
    data = {"model.safetensors": (folder / "model.safetensors").read_bytes(),
            "config.json": (folder / "config.json").read_bytes(),
            "card.json": json.dumps(card_json).encode()}
    with session_scope() as s:
        t = get_or_create_tenant(s, tenant)
        row = ModelRow(tenant_id=t.id, name=name, kind=card.kind, arch=card.arch, sha256=card.sha256, card=card_json,
                       files={})
        s.add(row)
        s.flush()
        keys = blobs.store_many(s, list(data.values()), f"model:{row.id}")
        row.files = dict(zip(data, keys))
        return row.id


def crops(tmp_path: Path, shared_dir: Path) -> Path:
    folder = tmp_path / "crops"
    folder.mkdir()
    for f in sorted((shared_dir / "data" / "faces-utk200").iterdir())[:3]:
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


def test_without_a_service_database_the_cli_is_the_zoo_alone(home, tmp_path, shared_dir):
    r = faceadapt("models", "list")
    assert r.exit_code == 0, r.output
    assert BASE in r.stdout and "service" not in r.stdout and "tenant" not in r.stdout
    r = faceadapt("models", "list", "--json")
    assert r.exit_code == 0 and all("tenant" not in m for m in json.loads(r.stdout))
    r = faceadapt("restore", str(crops(tmp_path, shared_dir)), "-o", str(tmp_path / "out"), "--aligned",
                  "--tenant", "acme")
    assert r.exit_code == 1 and "no service database" in r.stderr, r.output
    assert not (home / "faceadapt.db").exists()  # nothing was created


def test_cli_lists_shows_and_restores_with_service_models(home, tmp_path, shared_dir):
    migrate()
    with session_scope() as s:
        sync_zoo_models(s)  # what an API start does: the public zoo models become registry rows
    model_id = register("acme", "acme-face")
    register("other", "other-face")

    r = faceadapt("models", "list")
    assert r.exit_code == 0, r.output
    lines = {ln.split()[0]: ln for ln in r.stdout.splitlines() if ln.strip()}
    assert "service, tenant acme" in lines["acme-face"] and "service, tenant other" in lines["other-face"]
    assert "bundled" in lines[BASE]
    listed = {m["name"]: m for m in json.loads(faceadapt("models", "list", "--json").stdout)}
    assert listed["acme-face"]["tenant"] == "acme" and listed["acme-face"]["model_id"] == model_id
    assert "tenant" not in listed[BASE]

    r = faceadapt("models", "show", "acme-face", "--tenant", "acme", "--json")
    assert r.exit_code == 0, r.output
    shown = json.loads(r.stdout)
    assert shown["card"]["name"] == "acme-face" and shown["card"]["tenant"] == "acme"
    assert shown["config"] == Zoo().config(BASE)
    r = faceadapt("models", "show", "acme-face")  # the zoo has no such model: the CLI says which tenant has one
    assert r.exit_code == 2 and "acme" in r.stderr and "--tenant" in r.stderr
    r = faceadapt("models", "show", "acme-face", "--tenant", "other")  # never another tenant's model
    assert r.exit_code == 1 and "tenant other has no model" in r.stderr
    r = faceadapt("models", "show", "acme-face", "--tenant", "acme")  # the short card
    assert r.exit_code == 0 and r.stdout.startswith("acme-face") and "tenant acme" in r.stdout.splitlines()[0]

    folder = crops(tmp_path, shared_dir)
    r = faceadapt("restore", str(folder), "-o", str(tmp_path / "zoo"), "--aligned")
    assert r.exit_code == 0, r.output
    r = faceadapt("restore", str(folder), "-o", str(tmp_path / "acme"), "--aligned", "--model", "acme-face",
                  "--tenant", "acme")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "acme" / "summary.json").read_text())["model"] == "acme-face"
    r = faceadapt("restore", str(folder), "-o", str(tmp_path / "public"), "--aligned", "--tenant", "other")
    assert r.exit_code == 0, r.output  # the default restorer: a public model, every tenant may use it
    outputs = sorted(p.name for p in (tmp_path / "zoo").iterdir() if p.name != "summary.json")  # the inputs' format
    assert len(outputs) == 3
    for name in outputs:  # the same weights, fetched through the registry: the same bytes
        assert (tmp_path / "acme" / name).read_bytes() == (tmp_path / "zoo" / name).read_bytes()
        assert (tmp_path / "public" / name).read_bytes() == (tmp_path / "zoo" / name).read_bytes()

    r = faceadapt("restore", str(folder), "-o", str(tmp_path / "x"), "--aligned", "--model", "acme-face",
                  "--tenant", "other")
    assert r.exit_code == 1 and "tenant other has no model" in r.stderr, r.output
    r = faceadapt("restore", str(folder), "-o", str(tmp_path / "y"), "--aligned", "--tenant", "nobody")
    assert r.exit_code == 1 and "no tenant 'nobody'" in r.stderr, r.output
