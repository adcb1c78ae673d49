"""LPIPS, the learned perceptual distance (Zhang et al. 2018), built only from weights already on disk.

It needs two sets of weights that are not shipped here: the ImageNet backbone (torchvision's AlexNet or VGG16
state_dict, looked up in the torch hub cache, never downloaded) and the learned linear calibration layers (the
``lpips`` package's ``weights/v0.1/<net>.pth``, or a copy in ``<settings.home_dir>/lpips/<net>.pth``).
:func:`lpips_available` says whether both are there and, if not, why; :class:`LPIPS` refuses to build without them.
The backbone's convolution stack is written out here (the layers of torchvision's ``alexnet().features`` /
``vgg16().features``, same indices, so their state_dict loads as is).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn as nn

from restoration.settings import get_settings

__all__ = ["LPIPS", "LPIPSUnavailable", "lpips_available"]

_BACKBONE_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
_TAPS = {"alex": (2, 5, 8, 10, 12), "vgg": (4, 9, 16, 23, 30)}  # feature indices ending each stage
_CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}
# (out channels, kernel, stride, padding) of each convolution, "M" a max pooling
_ALEX = [(64, 11, 4, 2), "M", (192, 5, 1, 2), "M", (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1), "M"]
_VGG16 = [(c, 3, 1, 1) if c != "M" else "M"
          for c in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")]


class LPIPSUnavailable(RuntimeError):
    """LPIPS weights are not on disk (nothing is downloaded)."""


def backbone_features(net: str) -> nn.Sequential:
    """The convolution stack of torchvision's AlexNet (``'alex'``) or VGG16 (``'vgg'``) ``features``, layer for layer
    (non-inplace ReLUs), randomly initialised."""
    layers: list[nn.Module] = []
    ch = 3
    for spec in _ALEX if net == "alex" else _VGG16:
        if spec == "M":
            layers.append(nn.MaxPool2d(3, 2) if net == "alex" else nn.MaxPool2d(2, 2))
            continue
        out, k, s, p = spec
        layers += [nn.Conv2d(ch, out, k, s, p), nn.ReLU()]
        ch = out
    return nn.Sequential(*layers)


def _hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _lin_candidates(net: str) -> list[Path]:
    out = []
    spec = importlib.util.find_spec("lpips")  # the optional lpips package, only for where its weights are
    if spec is not None and spec.origin:
        out.append(Path(spec.origin).parent / "weights" / "v0.1" / f"{net}.pth")
    try:
        out.append(get_settings().home_dir / "lpips" / f"{net}.pth")
    except Exception:  # settings must never break a metric
        pass
    return out


def _find_weights(net: str, backbone_path=None, lin_path=None) -> tuple[Path | None, Path | None, str]:
    if net not in _BACKBONE_FILES:
        raise ValueError(f"net must be one of {sorted(_BACKBONE_FILES)}")
    reasons = []
    bb = Path(backbone_path) if backbone_path else _hub_checkpoint_dir() / _BACKBONE_FILES[net]
    if not bb.is_file():
        reasons.append(f"backbone weights {bb} not found (torchvision {net} ImageNet weights; not downloaded)")
        bb = None
    cands = [Path(lin_path)] if lin_path else _lin_candidates(net)
    lin = next((p for p in cands if p.is_file()), None)
    if lin is None:
        where = ", ".join(str(p) for p in cands) or "nowhere (the lpips package is not installed)"
        msg = f"LPIPS linear-layer weights v0.1/{net}.pth not found (looked in: {where})"
        if importlib.util.find_spec("lpips") is None:
            msg += "; the lpips package is not installed"
        reasons.append(msg)
    return bb, lin, "; ".join(reasons)


def lpips_available(net: str = "alex") -> tuple[bool, str]:
    """(True, 'ok') when LPIPS can be built offline, else (False, the reason)."""
    bb, lin, why = _find_weights(net)
    if bb is None or lin is None:
        return False, f"LPIPS ({net}) unavailable: {why}"
    return True, "ok"


class LPIPS(nn.Module):
    """Learned perceptual distance (lower = more similar), inputs RGB in [0, 1] (``BxCxHxW``).

    Built only from weights on disk: ``backbone_path`` (torchvision ImageNet state_dict) and
    ``lin_path`` (the v0.1 linear layers) default to the locations :func:`lpips_available` checks.
    """

    def __init__(self, net: str = "alex", backbone_path=None, lin_path=None):
        super().__init__()
        bb, lin, why = _find_weights(net, backbone_path, lin_path)
        if bb is None or lin is None:
            raise LPIPSUnavailable(f"LPIPS ({net}) unavailable: {why}")
        features = backbone_features(net)
        state = torch.load(str(bb), map_location="cpu", weights_only=True)
        feats = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        features.load_state_dict(feats, strict=True)
        layers = list(features.children())
        taps = _TAPS[net]
        starts = (0,) + taps[:-1]
        self.stages = nn.ModuleList(nn.Sequential(*layers[s:e]) for s, e in zip(starts, taps))
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _CHANNELS[net])
        lin_state = torch.load(str(lin), map_location="cpu", weights_only=True)
        for i, conv in enumerate(self.lins):
            key = next((k for k in (f"lin{i}.model.1.weight", f"lin{i}.weight", f"{i}.weight") if k in lin_state), None)
            if key is None:
                raise LPIPSUnavailable(f"{lin} does not hold LPIPS linear layer {i}")
            conv.weight.data.copy_(lin_state[key].float())
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.net = net
        self.eval().requires_grad_(False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-image distances (shape B) for inputs in [0, 1]."""
        if a.shape != b.shape:
            raise ValueError(f"images differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
        xa = ((a * 2 - 1) - self.shift) / self.scale
        xb = ((b * 2 - 1) - self.shift) / self.scale
        total = torch.zeros(a.shape[0], device=a.device, dtype=a.dtype)
        for stage, lin in zip(self.stages, self.lins):
            xa, xb = stage(xa), stage(xb)
            na = xa / (xa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            nb = xb / (xb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((na - nb) ** 2).mean(dim=(1, 2, 3))
        return total
