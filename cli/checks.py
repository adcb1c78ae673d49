"""Checks the CLI commands run before any work starts: device, detector, output folder, zoo names, data folders.

Each returns the checked value or exits with one line on stderr (:func:`cli.errors.fail`), by one rule: code 2 for a
value that names nothing known (an unknown device, detector or model name, a missing input: usage), 1 for a known
thing this machine cannot give (no CUDA or MPS here, missing weights, a model that fails to load, a name already
taken: the environment). Nothing is created before they pass: `check_outdir` only looks, `make_outdir` creates.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from cli.errors import fail
from restoration.adaptation import list_images
from restoration.diffusion import load_guard_prior
from restoration.faces import RETINAFACE_WEIGHTS, Restorer
from restoration.models import ModelNotFound, ZooError, check_name
from restoration.settings import get_settings

DEVICE_CHOICES = "cpu, cuda, cuda:N, auto"
DETECTOR_CHOICES = ("auto", "retinaface", "mtcnn")
_DEVICE_RE = re.compile(r"cpu|auto|cuda|cuda:\d+")
#: torch device types FaceAdapt knows but does not run on: refused like a missing CUDA (exit 1)
_OTHER_DEVICES = re.compile(r"(mps|xpu|xla|hip|vulkan|ipu|hpu|mtia)(:\d+)?")


def check_device(device: str | None, option: str = "--device") -> str:
    """A device the machine has: 'cpu', 'auto', 'cuda' or 'cuda:N' (None: FACEADAPT_DEVICE)."""
    source = option if device is not None else "FACEADAPT_DEVICE"
    dev = (device if device is not None else get_settings().device).strip().lower()
    if _OTHER_DEVICES.fullmatch(dev):
        fail(f"{source} {dev}: FaceAdapt does not run on {dev.split(':')[0].upper()} devices; use one of "
             f"{DEVICE_CHOICES}", 1)
    if not _DEVICE_RE.fullmatch(dev):
        fail(f"{source}: unknown device {dev!r}; use one of {DEVICE_CHOICES}", 2)
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            fail(f"{source} {dev}: no CUDA device is available here (torch {torch.__version__}, "
                 f"CUDA build {torch.version.cuda or 'none'}); use --device cpu or auto", 1)
        if ":" in dev and int(dev.split(":")[1]) >= torch.cuda.device_count():
            fail(f"{source} {dev}: there are only {torch.cuda.device_count()} CUDA device(s) "
                 f"(cuda:0..cuda:{torch.cuda.device_count() - 1})", 1)
    return dev


def check_detector(detector: str | None, option: str = "--detector", need_weights: bool = True) -> str:
    """'auto', 'retinaface' (its weights must be on disk, unless not `need_weights`) or 'mtcnn' (None:
    FACEADAPT_DETECTOR)."""
    settings = get_settings()
    source = option if detector is not None else "FACEADAPT_DETECTOR"
    det = (detector if detector is not None else settings.detector).strip().lower()
    if det not in DETECTOR_CHOICES:
        fail(f"{source}: unknown detector {det!r}; use one of {', '.join(DETECTOR_CHOICES)}", 2)
    if det == "retinaface" and need_weights:
        root = settings.facexlib_dir
        weights = root / RETINAFACE_WEIGHTS
        alt = f"{option} mtcnn or auto" if detector is not None else "FACEADAPT_DETECTOR=mtcnn or auto"
        if not weights.is_file():
            where = "FACEADAPT_FACEXLIB_MODEL_ROOT" if settings.facexlib_model_root else \
                "FACEADAPT_HOME/facexlib (FACEADAPT_FACEXLIB_MODEL_ROOT is not set)"
            fail(f"{source} retinaface: the RetinaFace weights {RETINAFACE_WEIGHTS} are missing: looked for "
                 f"{weights} ({where}); put the file there, or use {alt} (nothing is downloaded)", 1)
    return det


def check_outdir(outdir: Path, option: str = "-o") -> Path:
    """An output folder that can be made or written to; nothing is created (:func:`make_outdir` does it once every
    check has passed): an existing file is a usage error, a place that cannot be written an environment one."""
    if outdir.exists() and not outdir.is_dir():
        fail(f"{option} {outdir}: exists and is not a folder; give a folder for the outputs", 2)
    probe = outdir
    while not probe.exists():  # the nearest existing folder above it must be writable
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        fail(f"{option} {outdir}: {probe} is a file, not a folder", 2)
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        fail(f"{option} {outdir}: cannot write in {probe}: permission denied", 1)
    return outdir


def make_outdir(outdir: Path, option: str = "-o") -> Path:
    """Create the output folder checked by :func:`check_outdir` and make sure a file can be written there."""
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(f"{option} {outdir}: cannot create the folder: {exc.strerror or exc}", 1)
    probe = outdir / ".faceadapt-write-test"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        fail(f"{option} {outdir}: cannot write there: {exc.strerror or exc}", 1)
    return outdir


def check_restorer(name: str | None, zoo, device: str, batch_size: int, option: str = "--model"):
    """The loaded `Restorer` of zoo model `name` (None: the default restorer): an unknown name or a model that is not a
    restorer is a usage error (2), a model that fails to load an environment one (1)."""
    try:
        restorer = Restorer.from_zoo(name, zoo=zoo, device=device, batch_size=batch_size)
    except ModelNotFound as exc:
        fail(f"{option} {name or get_settings().default_restorer}: {exc} (`faceadapt models list` shows the "
             "models)", 2)
    except (ZooError, ValueError) as exc:
        if "not a restorer" in str(exc):
            fail(f"{option} {name}: {exc}", 2)
        fail(f"{option} {name or get_settings().default_restorer}: {exc}", 1)
    if restorer.card.kind != "restorer":
        fail(f"{option} {restorer.card.name}: it is a {restorer.card.kind}, not a restorer", 2)
    try:
        restorer.guard_prior = load_guard_prior(device=restorer.device)  # from the local zoo, whoever owns the model
    except (ZooError, ValueError) as exc:
        fail(f"FACEADAPT_GUARD_PRIOR {get_settings().guard_prior}: {exc} (the never-worse check's face prior; 'none' "
             "turns it off)", 1)
    return restorer


def check_new_model_name(zoo, name: str, overwrite: bool = False, option: str = "--name") -> str:
    """A valid zoo name that is free (or `overwrite`, and not a bundled model)."""
    try:
        check_name(name)
    except ZooError as exc:
        fail(f"{option}: {exc}", 2)
    try:
        card = zoo.get(name)
    except ModelNotFound:
        return name
    except ZooError as exc:
        fail(f"{option} {name}: {exc}", 1)
    if getattr(card, "builtin", False):
        fail(f"{option} {name}: a bundled model has that name and cannot be replaced; choose another name", 1)
    if not overwrite:
        fail(f"{option} {name}: a model of that name already exists in the zoo; choose another name or pass "
             "--overwrite", 1)
    return name


def check_zoo_model(zoo, name: str, kind: str, option: str) -> object:
    """The card of an existing zoo model of `kind` ('restorer' or 'prior')."""
    try:
        card = zoo.get(name)
    except ModelNotFound as exc:
        fail(f"{option} {name}: {exc}", 2)
    except ZooError as exc:
        fail(f"{option} {name}: {exc}", 1)
    if card.kind != kind:
        fail(f"{option} {name}: it is a {card.kind}, not a {kind}", 2)
    return card


def check_image_folder(folder: Path, option: str) -> list[Path]:
    """A folder holding at least one image (directly in it); returns the images."""
    if not folder.exists():
        fail(f"{option} {folder}: no such folder", 2)
    if not folder.is_dir():
        fail(f"{option} {folder}: not a folder", 2)
    images = list_images(folder)
    if not images:
        fail(f"{option} {folder}: no images in it (.png, .jpg, .jpeg, .bmp, .webp, .tif, .tiff; sub-folders are not "
             "read)", 2)
    return images
