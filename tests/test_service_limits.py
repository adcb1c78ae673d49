"""Bad input: every limit answers a 4xx JSON error naming it, and nothing partial is stored."""
from __future__ import annotations

import pytest

pytest_plugins = ["test_service_harness"]

from test_service_harness import face_files, png_bytes, zip_bytes as _zip  # noqa: E402


def _stored(st) -> tuple[int, int, int]:
    st.wait_collected()
    return (st.sql("SELECT count(*) FROM datasets")[0][0], st.sql("SELECT count(*) FROM images")[0][0], st.blob_count())


@pytest.fixture()
def client(service_stack, tenant_b):
    return service_stack, service_stack.auth(tenant_b)


def _post_dataset(st, auth, files):
    return st.client.post("/v1/datasets", files=[("files", f) for f in files], headers=auth)


def _expect_limit(r, status, limit):
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == "limit_exceeded" and body["limit"] == limit, body
    assert limit in body["detail"] or "path traversal" in body["detail"] or "symbolic link" in body["detail"]


def test_dataset_limits(client):
    st, auth = client
    before = _stored(st)
    face = face_files(1)[0].read_bytes()
    # upload size (Content-Length and while reading)
    big = b"\xff\xd8" + b"\0" * (3 * 1024 * 1024 + 100_000)
    _expect_limit(_post_dataset(st, auth, [("big.jpg", big, "image/jpeg")]), 413, "max_upload_bytes")
    # the same without Content-Length (chunked): refused once the limit has arrived, not buffered to the end
    def chunks():
        yield b"--xx\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.jpg\"\r\n\r\n"
        for _ in range(64):
            yield b"\0" * (256 * 1024)  # 16 MiB in all
    r = st.client.post("/v1/datasets", content=chunks(), headers={**auth, "Content-Type": "multipart/form-data; boundary=xx"})
    _expect_limit(r, 413, "max_upload_bytes")
    # decompression bomb: a tiny PNG announcing 2000x2000 pixels; the good face in the same upload is not kept
    bomb = png_bytes(2000, 2000)
    assert len(bomb) < 100_000
    _expect_limit(_post_dataset(st, auth, [("ok.jpg", face, "image/jpeg"), ("bomb.png", bomb, "image/png")]),
                  413, "max_image_pixels")
    # images per dataset (limit 12)
    _expect_limit(_post_dataset(st, auth, [(f"{i}.jpg", face, "image/jpeg") for i in range(13)]), 413, "max_dataset_images")
    # zip entries (limit 15)
    z = _zip({f"f{i}.jpg": face for i in range(16)})
    _expect_limit(_post_dataset(st, auth, [("many.zip", z, "application/zip")]), 413, "max_zip_entries")
    # unpacked size (limit 2 MiB): a zip bomb compresses to a few KB
    z = _zip({"ok.jpg": face, "huge.bin": b"\0" * (3 * 1024 * 1024)})
    assert len(z) < 50_000
    _expect_limit(_post_dataset(st, auth, [("bomb.zip", z, "application/zip")]), 413, "max_unpacked_bytes")
    # path traversal
    for evil in ("../evil.jpg", "/etc/evil.jpg", "a/../../evil.jpg"):
        z = _zip({"ok.jpg": face, evil: face})
        _expect_limit(_post_dataset(st, auth, [("evil.zip", z, "application/zip")]), 400, "zip_paths")
    # a zip that is no zip
    r = _post_dataset(st, auth, [("broken.zip", b"PK\x03\x04garbage", "application/zip")])
    assert r.status_code == 400 and r.json()["error"] == "bad_zip", r.text
    assert _stored(st) == before  # nothing partial stored


def test_dataset_rejects_files_with_reasons(client):
    st, auth = client
    faces = face_files(2, offset=100)
    z = _zip({"a/" + faces[0].name: faces[0].read_bytes(), faces[1].name: faces[1].read_bytes(),
              "notes.txt": b"hello", "flat.png": png_bytes(120, 120), "__MACOSX/._junk": b"x"})
    r = _post_dataset(st, auth, [("set.zip", z, "application/zip")])
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["images_accepted"] == 2 and body["faces_found"] >= 2
    reasons = {x["file"]: x["reason"] for x in body["rejected"]}
    assert set(reasons) == {"notes.txt", "flat.png"}, reasons
    assert "not a readable image" in reasons["notes.txt"] and reasons["flat.png"] == "no face found"
    # no face at all: a 4xx naming every rejected file, and no (empty) dataset is created
    n = st.sql("SELECT count(*) FROM datasets")[0][0]
    r = _post_dataset(st, auth, [("flat.png", png_bytes(100, 100), "image/png")])
    assert r.status_code == 422 and r.json()["error"] == "no_images", r.text
    assert r.json()["rejected"] == [{"file": "flat.png", "reason": "no face found"}], r.text
    assert st.sql("SELECT count(*) FROM datasets")[0][0] == n


def test_restore_bad_input(client):
    st, auth = client
    face = face_files(1, offset=5)[0].read_bytes()
    post = lambda files, data=None: st.client.post("/v1/restore", files=files, data=data or {}, headers=auth)  # noqa: E731
    _expect_limit(post({"image": ("bomb.png", png_bytes(2000, 2000), "image/png")}), 413, "max_image_pixels")
    _expect_limit(post({"image": ("big.jpg", b"\0" * (3 * 1024 * 1024 + 100_000), "image/jpeg")}), 413, "max_upload_bytes")
    r = post({"image": ("x.jpg", b"not an image", "image/jpeg")})
    assert r.status_code == 400 and r.json()["error"] == "bad_image", r.text
    r = post({"image": ("x.jpg", b"", "image/jpeg")})
    assert r.status_code == 400, r.text
    r = post({"image": ("f.jpg", face, "image/jpeg")}, {"model": "no-such-model"})
    assert r.status_code == 404 and "/v1/models" in r.json()["detail"], r.text
    r = post({"image": ("f.jpg", face, "image/jpeg")}, {"format": "gif"})
    assert r.status_code == 422 and r.json()["error"] == "invalid_request", r.text
    r = post({"image": ("f.jpg", face, "image/jpeg")}, {"model": st.env.get("FACEADAPT_DEFAULT_PRIOR", "faceadapt-iddpm-small")})
    assert r.status_code == 400 and r.json()["error"] == "wrong_model_kind", r.text
    assert st.client.post("/v1/restore", headers=auth).status_code == 422


def test_adaptation_bad_input(client):
    st, auth = client
    r = st.upload_faces(auth["Authorization"].split()[1], face_files(2, offset=110))
    ds = r.json()["id"]
    cases = [
        ({"dataset_id": "nope", "name": "x1"}, 404, "dataset_not_found"),
        ({"dataset_id": ds, "name": "Bad Name!"}, 422, "bad_name"),
        ({"dataset_id": ds, "name": "x2", "base_model": "missing"}, 404, "model_not_found"),
        ({"dataset_id": ds, "name": "x3", "params": {"no_such_param": 1}}, 422, "bad_params"),
        ({"dataset_id": ds, "name": "x4", "params": {"eval_fraction": 2.0}}, 422, "bad_params"),
        ({"dataset_id": ds, "name": "faceadapt-swinir-small"}, 409, "name_taken"),
        ({"name": "x5"}, 422, "invalid_request"),
        ({"dataset_id": ds, "name": "x6", "parameters": {"seed": 1}}, 422, "invalid_request"),  # misspelt field
    ]
    for body, status, code in cases:
        r = st.client.post("/v1/adaptations", json=body, headers=auth)
        assert r.status_code == status and r.json()["error"] == code, (body, r.text)


def test_concurrent_restores_are_micro_batched(service_stack, tenant_b):
    import concurrent.futures
    import re

    st, auth = service_stack, service_stack.auth(tenant_b)
    faces = [f.read_bytes() for f in face_files(8, offset=120)]

    def metric():
        text = st.client.get("/metrics", headers=st.metrics_auth).text
        count = sum(float(v) for v in re.findall(r'faceadapt_restore_batch_size_count\{[^}]*\} ([0-9.e+]+)', text))
        total = sum(float(v) for v in re.findall(r'faceadapt_restore_batch_size_sum\{[^}]*\} ([0-9.e+]+)', text))
        return count, total

    n0, s0 = metric()

    def one(data):
        r = st.client.post("/v1/restore", files={"image": ("f.jpg", data, "image/jpeg")}, data={"aligned": "true"},
                           headers=auth)
        assert r.status_code == 200, r.text

    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        list(ex.map(one, faces))
    n1, s1 = metric()
    assert s1 - s0 == 8  # eight crops restored
    assert n1 - n0 < 8, (n1 - n0)  # in fewer network passes than requests
