"""Blob storage, local folder and S3 (boto3 over HTTP against a local S3-compatible server, moto's)."""
from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest

from service.storage import BlobNotFound, LocalStorage, S3Storage, content_key


@pytest.fixture(scope="module")
def s3_endpoint():
    server_mod = pytest.importorskip("moto.server")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        st = LocalStorage(tmp_path / "blobs")
    else:
        endpoint = request.getfixturevalue("s3_endpoint")
        st = S3Storage("faceadapt-test", prefix="blobs", endpoint_url=endpoint, region="us-east-1",
                       access_key_id="test", secret_access_key="test")
    st.setup()
    st.ping()
    return st


def test_put_get_exists_delete(storage, tmp_path):
    data = b"pixels" * 1000
    key = storage.put(data)
    assert key == content_key(data) == hashlib.sha256(data).hexdigest()
    assert storage.put(data) == key  # same bytes, same key, no second copy
    assert storage.exists(key) and storage.get(key) == data
    out = storage.fetch_to(key, tmp_path / "a" / "b.bin")
    assert out.read_bytes() == data
    storage.delete(key)
    assert not storage.exists(key)
    with pytest.raises(BlobNotFound):
        storage.get(key)
    with pytest.raises(BlobNotFound):
        storage.get("../../etc/passwd")  # keys are content hashes, nothing else


def test_concurrent_writers_of_one_blob(storage):
    data = bytes(range(256)) * 4096
    keys = []
    threads = [threading.Thread(target=lambda: keys.append(storage.put(data))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(keys)) == 1 and storage.get(keys[0]) == data


def test_local_writes_are_atomic(tmp_path):
    st = LocalStorage(tmp_path)
    key = st.put(b"x" * 10)
    files = [p for p in Path(tmp_path).rglob("*") if p.is_file()]
    assert [p.name for p in files] == [key]  # no temporary file left behind
