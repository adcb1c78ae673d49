"""Model zoo: register/load, `import` of local checkpoints and `pull` against a local HTTP server."""
from __future__ import annotations

import collections
import http.server
import json
import threading

import pytest
import torch
from typer.testing import CliRunner

from restoration.models.archs import build
from restoration.models.checkpoints import KNOWN_CHECKPOINTS, CheckpointError, read_pth
from restoration.models.zoo import Zoo, ZooError

SMALL_SWINIR = dict(img_size=8, patch_size=1, in_chans=3, embed_dim=16, depths=[1], num_heads=[2], window_size=8,
                    mlp_ratio=2, sf=8, img_range=1.0, upsampler="nearest+conv", resi_connection="1conv",
                    unshuffle=True, unshuffle_scale=8)


class Evil:  # anything that is not a tensor container must be refused by weights_only loading
    def __reduce__(self):
        return (print, ("unpickled!",))


@pytest.fixture
def zoo(tmp_path):
    return Zoo(root=tmp_path / "zoo", builtin_dir=None)


def _entries(path):
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


def test_register_load_roundtrip(zoo):
    model = build("swinir_face", SMALL_SWINIR)
    card = zoo.register("tiny", "swinir_face", SMALL_SWINIR, model.state_dict(), kind="restorer", input_size=64,
                        value_range=(0, 1), license="test")
    assert card.sha256 and len(card.sha256) == 64
    loaded = zoo.load("tiny")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded(x))
    assert [c.name for c in zoo.list()] == ["tiny"]
    with pytest.raises(ZooError, match="already exists"):
        zoo.register("tiny", "swinir_face", SMALL_SWINIR, model.state_dict(), kind="restorer", input_size=64,
                     value_range=(0, 1))
    with pytest.raises(ZooError, match="invalid model name"):
        zoo.register("../escape", "swinir_face", SMALL_SWINIR, model.state_dict(), kind="restorer", input_size=64,
                     value_range=(0, 1))
    zoo.delete("tiny")
    with pytest.raises(ZooError, match="not in the zoo"):
        zoo.get("tiny")


def test_register_refuses_mismatched_weights(zoo):
    sd = build("swinir_face", SMALL_SWINIR).state_dict()
    sd.pop(next(iter(sd)))
    with pytest.raises(CheckpointError, match="missing keys"):
        zoo.register("bad", "swinir_face", SMALL_SWINIR, sd, kind="restorer", input_size=64, value_range=(0, 1))
    assert _entries(zoo.root) == []


@pytest.mark.parametrize("container", ["plain", "module", "params_ema", "state_dict"])
def test_import_containers(zoo, tmp_path, container):
    sd = build("swinir_face", SMALL_SWINIR).state_dict()
    if container == "module":
        obj = collections.OrderedDict(("module." + k, v) for k, v in sd.items())
    elif container == "params_ema":
        obj = {"params_ema": sd, "params": {k: torch.zeros_like(v) for k, v in sd.items()}}
    elif container == "state_dict":
        obj = {"iters_start": 5, "state_dict": sd}
    else:
        obj = sd
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    card = zoo.import_checkpoint(path, arch="swinir_face", name="imp", config=SMALL_SWINIR, input_size=64)
    loaded = zoo.load(card.name).state_dict()
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_import_refuses_pickled_objects_and_junk(zoo, tmp_path):
    evil = tmp_path / "evil.pth"
    torch.save({"w": Evil()}, evil)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        read_pth(evil)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        zoo.import_checkpoint(junk, arch="swinir_face", name="junk", config=SMALL_SWINIR)
    assert _entries(zoo.root) == []


class _Server:
    """A tiny HTTP server on 127.0.0.1 serving bytes; `/truncated/...` announces more than it sends."""

    def __init__(self, files: dict[str, bytes]):
        files = files

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                truncated = self.path.startswith("/truncated/")
                body = files.get(self.path.removeprefix("/truncated"))
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if truncated else body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def public_swinir(tmp_path_factory):
    """A generated checkpoint in the layout of the public swinir_gan_v1.pth (full config, DDP prefix)."""
    known = KNOWN_CHECKPOINTS["swinir-face-dtbfr"]
    torch.manual_seed(0)
    sd = build(known.arch, known.config).state_dict()
    path = tmp_path_factory.mktemp("pub") / known.file_name
    torch.save(collections.OrderedDict(("module." + k, v) for k, v in sd.items()), path)
    server = _Server({"/" + known.file_name: path.read_bytes(), "/garbage.pth": b"\x00" * 4096})
    yield known, sd, server
    server.close()


def test_pull_from_mirror(zoo, public_swinir):
    known, sd, server = public_swinir
    card = zoo.pull(known.name, url=f"{server.url}/{known.file_name}")
    assert card.arch == "swinir_face" and card.input_size == 512 and card.kind == "restorer"
    assert card.extra["source_file"] == known.file_name
    from safetensors.torch import load_file

    stored = load_file(f"{card.path}/model.safetensors")
    assert stored.keys() == sd.keys()
    assert all(torch.equal(stored[k], sd[k]) for k in sd)
    assert _entries(zoo.root) == [known.name]  # no temporary file left behind


@pytest.mark.parametrize("path,message", [("/truncated/swinir_gan_v1.pth", "broke off|incomplete"),
                                          ("/garbage.pth", "not a usable checkpoint")])
def test_pull_rejects_corrupted_download(zoo, public_swinir, path, message):
    known, _, server = public_swinir
    with pytest.raises(ZooError, match=message):
        zoo.pull(known.name, url=server.url + path)
    assert _entries(zoo.root) == []


def test_pull_unknown_name(zoo):
    with pytest.raises(ZooError, match="unknown public model"):
        zoo.pull("no-such-model")


def test_cli_models(tmp_path, monkeypatch):
    from cli import app
    from restoration.settings import get_settings

    monkeypatch.setenv("FACEADAPT_HOME", str(tmp_path))
    get_settings.cache_clear()
    try:
        ckpt = tmp_path / "tiny.pth"
        torch.save({"params_ema": build("swinir_face", SMALL_SWINIR).state_dict()}, ckpt)
        cfg = tmp_path / "cfg.json"
        cfg.write_text(json.dumps(SMALL_SWINIR))
        runner = CliRunner()
        r = runner.invoke(app, ["models", "import", str(ckpt), "--arch", "swinir_face", "--name", "tiny",
                                "--config", str(cfg), "--input-size", "64"])
        assert r.exit_code == 0, r.output
        r = runner.invoke(app, ["models", "list"])
        assert r.exit_code == 0 and "tiny" in r.output and "swinir-face-dtbfr" in r.output
        r = runner.invoke(app, ["models", "show", "tiny", "--json"])
        assert r.exit_code == 0 and json.loads(r.output)["card"]["input_size"] == 64
        r = runner.invoke(app, ["models", "show", "nope"])
        assert r.exit_code == 2 and "not in the zoo" in r.output
        (tmp_path / "x.txt").write_text("hello")
        r = runner.invoke(app, ["models", "import", str(tmp_path / "x.txt"), "--arch", "swinir_face", "--name", "x"])
        assert r.exit_code == 1 and "not a PyTorch checkpoint" in r.output
    finally:
        get_settings.cache_clear()
