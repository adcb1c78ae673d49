"""The model zoo: architecture name + constructor config + safetensors weights + a model card.

Two roots are searched: the bundled defaults shipped in the package (`restoration/zoo_defaults`,
read-only) and the user's zoo (`settings.zoo_dir`). The folder format is described in
docs/ARCHITECTURE.md. Writes go to a temporary folder that is renamed into place, so a crash never
leaves a half-written model behind.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
import urllib.request
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from restoration.models.archs import build
from restoration.models.checkpoints import KNOWN_CHECKPOINTS, CheckpointError, KnownCheckpoint, load_strict, read_pth
from restoration.settings import get_settings

BUILTIN_DIR = Path(__file__).resolve().parents[1] / "zoo_defaults"
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")  # whole-string match (`fullmatch`): no trailing newline
WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "card.json"


class ZooError(Exception):
    """A zoo operation failed; the message says why."""


class ModelNotFound(ZooError, KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "model not found"


@dataclass
class ModelCard:
    name: str
    arch: str
    kind: str  # "restorer" | "prior"
    input_size: int
    value_range: list[float]
    license: str = "unknown"
    provenance: str = ""
    sha256: str = ""
    created_at: str = ""
    description: str = ""
    random_init: bool = False
    extra: dict = field(default_factory=dict)
    # The input size the model is run at to restore faces, when it differs from `input_size` (the size it is trained
    # and adapted at): the bundled restorer, trained at both, restores at 128 px and is adapted at 64. None: input_size.
    serve_size: int | None = None
    # Filled in when read from disk; not stored in card.json.
    builtin: bool = field(default=False, compare=False)
    path: str = field(default="", compare=False)

    @property
    def restore_size(self) -> int:
        """The input size the model restores faces at (`serve_size`, else `input_size`)."""
        return int(self.serve_size or self.input_size)

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("builtin")
        d.pop("path")
        if d["serve_size"] is None:  # cards without one stay as they were
            d.pop("serve_size")
        return d

    @classmethod
    def from_json(cls, d: dict, **runtime) -> "ModelCard":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known}, **runtime)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ZooError(
            f"invalid model name {name!r}: use 1-64 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def instantiate(arch: str, config: dict, state_dict: dict[str, torch.Tensor] | None = None, name: str = "model"):
    """Build `arch` with `config` and load `state_dict` strictly (if given). Returns the module in eval mode."""
    model = build(arch, config)
    if state_dict is not None:
        load_strict(model, state_dict, name=name)
    return model.eval()


class Zoo:
    def __init__(self, root: str | Path | None = None, builtin_dir: str | Path | None = BUILTIN_DIR):
        self.root = Path(root) if root is not None else get_settings().zoo_dir
        self.builtin_dir = Path(builtin_dir) if builtin_dir is not None else None

    # ----------------------------------------------------------------------------- reading
    def _dirs(self) -> list[tuple[Path, bool]]:
        out = []
        if self.builtin_dir is not None and self.builtin_dir.is_dir():
            out.append((self.builtin_dir, True))
        if self.root.is_dir():
            out.append((self.root, False))
        return out

    def path(self, name: str) -> Path:
        for base, _ in self._dirs():
            if (base / name / CARD).is_file():
                return base / name
        raise ModelNotFound(f"model {name!r} is not in the zoo (see `faceadapt models list`)")

    def get(self, name: str) -> ModelCard:
        p = self.path(name)
        card = json.loads((p / CARD).read_text())
        return ModelCard.from_json(card, builtin=self.builtin_dir is not None and p.parent == self.builtin_dir, path=str(p))

    def list(self) -> list[ModelCard]:
        seen: dict[str, ModelCard] = {}
        for base, _ in self._dirs():
            for p in sorted(base.iterdir()):
                if (p / CARD).is_file() and p.name not in seen and not p.name.startswith("."):
                    seen[p.name] = self.get(p.name)
        return list(seen.values())

    def config(self, name: str) -> dict:
        return json.loads((self.path(name) / CONFIG).read_text())

    def load(self, name: str, device: str | torch.device = "cpu") -> torch.nn.Module:
        p = self.path(name)
        cfg = json.loads((p / CONFIG).read_text())
        model = instantiate(cfg["arch"], cfg["config"], load_file(str(p / WEIGHTS)), name=name)
        return model.to(device)

    # ----------------------------------------------------------------------------- writing
    def register(
        self,
        name: str,
        arch: str,
        config: dict,
        state_dict: dict[str, torch.Tensor],
        kind: str,
        input_size: int,
        value_range: list[float] | tuple[float, float],
        overwrite: bool = False,
        **card_fields,
    ) -> ModelCard:
        """Validate (strict load into `arch`), then write weights, config and card atomically."""
        check_name(name)
        if kind not in ("restorer", "prior"):
            raise ZooError(f"kind must be 'restorer' or 'prior', not {kind!r}")
        if self.builtin_dir is not None and (self.builtin_dir / name / CARD).is_file():
            raise ZooError(f"{name!r} is a bundled model; choose another name")
        final = self.root / name
        if final.exists() and not overwrite:
            raise ZooError(f"model {name!r} already exists in {self.root}; delete it first or choose another name")
        instantiate(arch, config, state_dict, name=name)  # refuses weights that do not fit
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.root))
        try:
            tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
            save_file(tensors, str(tmp / WEIGHTS))
            (tmp / CONFIG).write_text(json.dumps({"arch": arch, "config": config}, indent=1))
            card = ModelCard(
                name=name,
                arch=arch,
                kind=kind,
                input_size=int(input_size),
                value_range=[float(v) for v in value_range],
                sha256=sha256_file(tmp / WEIGHTS),
                created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                **card_fields,
            )
            (tmp / CARD).write_text(json.dumps(card.to_json(), indent=1))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.get(name)

    def delete(self, name: str) -> None:
        card = self.get(name)
        if card.builtin:
            raise ZooError(f"{name!r} is a bundled model and cannot be deleted")
        shutil.rmtree(card.path)

    def import_checkpoint(
        self, path: str | Path, arch: str, name: str, config: dict | None = None, kind: str | None = None,
        input_size: int | None = None, **card_fields,
    ) -> ModelCard:
        """Convert a local .pth (weights_only) or .safetensors file into a zoo model.

        Without `config`, the public full config of `arch` is used (the DT-BFR face SwinIR or the
        DifFace FFHQ-512 prior).
        """
        known = _known_for_arch(arch)
        if config is None:
            if known is None:
                raise ZooError(f"no default config for arch {arch!r}; pass one")
            config = known.config
        kind = kind or (known.kind if known else "restorer")
        state_dict = read_pth(path)
        card_fields.setdefault("provenance", f"imported from {Path(path).name}")
        return self.register(
            name, arch, config, state_dict, kind=kind,
            input_size=input_size or (known.input_size if known else 512),
            value_range=known.value_range if known else ((0.0, 1.0) if kind == "restorer" else (-1.0, 1.0)),
            **card_fields,
        )

    def pull(
        self, name: str, url: str | None = None, progress: Callable[[int, int], None] | None = None,
        timeout: float = 60.0,
    ) -> ModelCard:
        """Download a known public checkpoint, check it, convert it to safetensors and register it.

        `url` overrides the official address (a mirror). The download goes to a temporary file that is
        removed whatever happens; only a fully checked model is registered.
        """
        known = KNOWN_CHECKPOINTS.get(name)
        if known is None:
            raise ZooError(f"unknown public model {name!r}; known: {', '.join(sorted(KNOWN_CHECKPOINTS))}")
        url = url or known.url
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".pth.part", dir=self.root)
        tmp = Path(tmp_name)
        try:
            with open(fd, "wb") as out:
                _download(url, out, progress, timeout)
            size = tmp.stat().st_size
            if known.size is not None and size != known.size:
                raise ZooError(f"download of {name} has {size} bytes, expected {known.size}")
            digest = sha256_file(tmp)
            if known.sha256 is not None and digest != known.sha256:
                raise ZooError(f"download of {name} has sha256 {digest}, expected {known.sha256}")
            try:
                state_dict = read_pth(tmp)
            except CheckpointError as exc:
                raise ZooError(f"download of {name} is not a usable checkpoint: {exc}") from None
            return self.register(
                name, known.arch, known.config, state_dict, kind=known.kind, input_size=known.input_size,
                value_range=known.value_range, license=known.license,
                provenance=f"{known.provenance}; downloaded from {url}; source sha256 {digest}",
                extra=dict(known.extra, source_file=known.file_name, source_sha256=digest, source_bytes=size),
            )
        finally:
            tmp.unlink(missing_ok=True)


def _known_for_arch(arch: str) -> KnownCheckpoint | None:
    return next((k for k in KNOWN_CHECKPOINTS.values() if k.arch == arch), None)


def _download(url: str, out, progress, timeout: float) -> None:
    """Stream `url` into `out`; a body shorter than Content-Length is an error."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            total = int(resp.headers.get("Content-Length") or 0)
            done = 0
            while True:
                try:
                    block = resp.read(1 << 20)
                except Exception as exc:  # http.client.IncompleteRead and friends
                    raise ZooError(f"download from {url} broke off after {done} bytes ({type(exc).__name__})") from None
                if not block:
                    break
                out.write(block)
                done += len(block)
                if progress:
                    progress(done, total)
    except ZooError:
        raise
    except Exception as exc:
        raise ZooError(f"cannot download {url}: {exc}") from None
    if total and done != total:
        raise ZooError(f"download from {url} is incomplete: {done} of {total} bytes")
