"""Tenant isolation and API keys: another tenant's datasets, jobs and models answer 404 (to the CLI too)."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

pytest_plugins = ["test_service_harness"]

from test_service_harness import PY, REPO, face_files  # noqa: E402


def test_keys_required_and_checked(service_stack, tenant_a):
    c = service_stack.client
    out = service_stack.admin_key("tenant-c")
    assert re.fullmatch(r"fa_[A-Za-z0-9_-]{43}\n", out), out  # the key alone on stdout
    assert c.get("/v1/models", headers=service_stack.auth(out.strip())).status_code == 200
    assert c.get("/v1/models").status_code == 401
    r = c.get("/v1/models", headers={"Authorization": "Bearer fa_not-a-key"})
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    assert c.get("/v1/models", headers={"Authorization": "Basic abc"}).status_code == 401
    assert c.get("/healthz").status_code == 200  # health and metrics stay open
    # only the key's hash is stored
    rows = service_stack.sql("SELECT key_hash, prefix FROM api_keys")
    assert rows and all(len(h) == 64 and h != tenant_a for h, _ in rows)
    assert any(tenant_a.startswith(p) for _, p in rows)


def test_cli_restores_with_a_tenants_registered_model(service_stack, tenant_a, tenant_b, adapted, tmp_path):
    """One registry: on the service's database (PostgreSQL, weights in S3) `faceadapt models list` shows the model a
    job registered, with its tenant, and `faceadapt restore --tenant` restores with it by the API's rules."""
    st = service_stack
    cli = [str(Path(PY).parent / "faceadapt")]
    r = subprocess.run([*cli, "models", "list"], env=st.env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert any(ln.split()[:1] == ["acme-v1"] and "service, tenant tenant-a" in ln for ln in r.stdout.splitlines()), r.stdout
    crops = tmp_path / "crops"
    crops.mkdir()
    for f in face_files(2, offset=60):
        (crops / f.name).write_bytes(f.read_bytes())
    r = subprocess.run([*cli, "restore", str(crops), "-o", str(tmp_path / "out"), "--aligned", "--model", "acme-v1",
                        "--tenant", "tenant-a"], env=st.env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["model"] == "acme-v1"
    assert len([p for p in (tmp_path / "out").iterdir() if p.name != "summary.json"]) == 2
    r = subprocess.run([*cli, "restore", str(crops), "-o", str(tmp_path / "out-b"), "--aligned", "--model", "acme-v1",
                        "--tenant", "tenant-b"], env=st.env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "tenant tenant-b has no model" in r.stderr, r.stderr


def test_tenant_isolation(service_stack, tenant_a, tenant_b, adapted):
    st = service_stack
    a, b = st.auth(tenant_a), st.auth(tenant_b)
    ds_id, job_id, model_id = adapted["dataset"]["id"], adapted["job"]["id"], adapted["job"]["model_id"]
    # the owner sees everything
    assert st.client.get(f"/v1/datasets/{ds_id}", headers=a).status_code == 200
    assert st.client.get(f"/v1/models/{model_id}", headers=a).status_code == 200
    # the other tenant sees none of it
    assert st.client.get(f"/v1/datasets/{ds_id}", headers=b).status_code == 404
    assert st.client.delete(f"/v1/datasets/{ds_id}", headers=b).status_code == 404
    assert st.client.get(f"/v1/adaptations/{job_id}", headers=b).status_code == 404
    assert st.client.post(f"/v1/adaptations/{job_id}/cancel", headers=b).status_code == 404
    assert job_id not in [j["id"] for j in st.client.get("/v1/adaptations", headers=b).json()]
    for ref in (model_id, "acme-v1"):
        assert st.client.get(f"/v1/models/{ref}", headers=b).status_code == 404
        assert st.client.delete(f"/v1/models/{ref}", headers=b).status_code == 404
    names_b = [m["name"] for m in st.client.get("/v1/models", headers=b).json()]
    assert "acme-v1" not in names_b
    settings_default = st.env.get("FACEADAPT_DEFAULT_RESTORER", "faceadapt-swinir-small")
    assert settings_default in names_b  # public models are shared
    img = face_files(1, offset=21)[0].read_bytes()
    r = st.client.post("/v1/restore", files={"image": ("x.jpg", img, "image/jpeg")}, data={"model": "acme-v1"}, headers=b)
    assert r.status_code == 404 and "/v1/models" in r.json()["detail"]
    r = st.client.post("/v1/adaptations", json={"dataset_id": ds_id, "name": "stolen"}, headers=b)
    assert r.status_code == 404
    # public models cannot be deleted by a tenant
    default_id = next(m["id"] for m in st.client.get("/v1/models", headers=b).json() if m["name"] == settings_default)
    assert st.client.delete(f"/v1/models/{default_id}", headers=b).status_code == 403
    # the owner deletes its model: gone from the registry, from /v1/restore and (weights) from the storage
    st.wait_collected()  # the finished jobs' own clean-up is not what this counts
    blobs = st.blob_count()
    (files,) = st.sql("SELECT files FROM models WHERE id = %s", model_id)[0]
    shared = {k for (f,) in st.sql("SELECT files FROM models WHERE id <> %s", model_id) for k in f.values()}
    only_ours = set(files.values()) - shared  # blobs are content-addressed: config.json is shared with the siblings
    assert files["model.safetensors"] in only_ours
    assert st.client.delete(f"/v1/models/{model_id}", headers=a).status_code == 204
    assert st.client.get(f"/v1/models/{model_id}", headers=a).status_code == 404
    r = st.client.post("/v1/restore", files={"image": ("x.jpg", img, "image/jpeg")}, data={"model": "acme-v1"}, headers=a)
    assert r.status_code == 404
    assert st.blob_count() == blobs - len(only_ours)


def test_model_and_dataset_delete(service_stack, tenant_b):
    st, b = service_stack, service_stack.auth(tenant_b)
    r = st.upload_faces(tenant_b, face_files(2, offset=90), name="to-delete")
    assert r.status_code == 201
    ds_id = r.json()["id"]
    assert st.client.delete(f"/v1/datasets/{ds_id}", headers=b).status_code == 204
    assert st.client.get(f"/v1/datasets/{ds_id}", headers=b).status_code == 404
    assert st.sql("SELECT count(*) FROM images WHERE dataset_id = %s", ds_id)[0][0] == 0
