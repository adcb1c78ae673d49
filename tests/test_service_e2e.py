"""End to end: key, upload 8 faces, tiny adaptation, restore with the new model by name, events and metrics."""
from __future__ import annotations

import base64
import io
import re

import httpx

pytest_plugins = ["test_service_harness"]

from test_service_harness import face_files, start_api, stop_api, wait_ready  # noqa: E402


def test_e2e_adapt_then_restore(service_stack, tenant_a, adapted):
    st, auth = service_stack, service_stack.auth(tenant_a)
    ds, job = adapted["dataset"], adapted["job"]
    assert ds["images_accepted"] == 8 and ds["faces_found"] >= 8, ds
    assert job["status"] == "succeeded", job
    assert job["model_id"] and job["error"] is None
    assert job["evaluation"].get("count", 0) >= 1, job["evaluation"]
    # before/after figures, the quality gate's verdict and the grid, after the job's blobs were collected
    ev = job["evaluation"]
    assert {"base", "adapted", "input"} <= set(ev["metrics"]) and "naturalness" in ev["metrics"]["adapted"]
    assert ev["gate"]["verdict"] in ("ok", "worse") and "grid_png_b64" not in ev
    r = st.client.get(ev["grid_url"], headers=auth)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert st.client.get(ev["grid_url"], headers=st.auth("someone-else")).status_code in (401, 404)
    stages = [e["stage"] for e in job["events"]]
    for s in ("prepare", "targets", "finetune", "evaluate", "register"):
        assert s in stages, stages
    assert all(e["ts"] for e in job["events"])
    assert any("succeeded" in e["message"] for e in job["events"])
    # the model is in the registry, with its card
    models = {m["name"]: m for m in st.client.get("/v1/models", headers=auth).json()}
    assert models["acme-v1"]["id"] == job["model_id"] and not models["acme-v1"]["public"]
    card = st.client.get(f"/v1/models/{job['model_id']}", headers=auth).json()["card"]
    assert card["extra"]["base"] and card["extra"]["data_count"] == 8
    # exactly one model for the job
    assert st.sql("SELECT count(*) FROM models WHERE job_id = %s", job["id"])[0][0] == 1
    # restore with it by name: image bytes, and JSON
    img = face_files(1, offset=20)[0].read_bytes()
    r = st.client.post("/v1/restore", files={"image": ("f.jpg", img, "image/jpeg")}, data={"model": "acme-v1"},
                       headers=auth)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png" and r.headers["x-faceadapt-model"] == "acme-v1"
    r = st.client.post("/v1/restore", files={"image": ("f.jpg", img, "image/jpeg")},
                       data={"model": "acme-v1", "format": "jpeg"}, headers={**auth, "Accept": "application/json"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "acme-v1" and body["format"] == "jpeg" and len(body["faces"]) >= 1
    from PIL import Image

    out = Image.open(io.BytesIO(base64.b64decode(body["image"])))
    assert out.format == "JPEG" and out.size == (200, 200)
    # loaded once per process, then cached
    loads = lambda: float(re.search(r"^faceadapt_model_loads_total ([0-9.e+]+)$", st.client.get("/metrics", headers=st.metrics_auth).text, re.M)[1])  # noqa: E731
    n = loads()
    for _ in range(2):
        assert st.client.post("/v1/restore", files={"image": ("f.jpg", img, "image/jpeg")}, data={"model": "acme-v1"},
                              headers=auth).status_code == 200
    assert loads() == n
    # the API process above was started before the model existed; a second process serves it as well (the
    # registry is the database, the weights come from the blob storage: nothing shared in memory)
    api2 = start_api(st.env, st.home / "logs" / "api2.log")
    try:
        wait_ready(api2, st.home / "logs" / "api2.log")
        r = httpx.post(api2.url + "/v1/restore", files={"image": ("f.jpg", img, "image/jpeg")},
                       data={"model": job["model_id"]}, headers=auth, timeout=120)
        assert r.status_code == 200 and r.headers["x-faceadapt-model"] == "acme-v1", r.text
    finally:
        stop_api(api2)
    # the OpenAPI document
    paths = st.client.get("/openapi.json", headers=auth).json()["paths"]
    for p in ("/v1/restore", "/v1/datasets", "/v1/datasets/{dataset_id}", "/v1/adaptations", "/v1/adaptations/{job_id}",
              "/v1/adaptations/{job_id}/cancel", "/v1/models", "/v1/models/{model_id}", "/healthz", "/readyz", "/metrics"):
        assert p in paths, p
    # listing, metrics
    jobs = st.client.get("/v1/adaptations", headers=auth).json()
    assert job["id"] in [j["id"] for j in jobs]
    metrics = st.client.get("/metrics", headers=st.metrics_auth).text
    assert 'faceadapt_http_requests_total{method="POST",route="/v1/restore",status="200"}' in metrics
    assert "faceadapt_http_request_duration_seconds_bucket" in metrics
    assert "faceadapt_restore_batch_size_count" in metrics
    assert 'faceadapt_jobs{status="succeeded"}' in metrics
    assert "faceadapt_queue_depth{queue=" in metrics
    print(f"\ne2e: upload + adaptation took {adapted['seconds']:.1f}s")
