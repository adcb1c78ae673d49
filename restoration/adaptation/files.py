"""Crash-safe file writes of the adaptation work dirs: JSON (temp file + rename) and fsync'ed JSON lines; images go
through `restoration.faces.save_image` (temp file + rename too).

A killed stage leaves every file either whole or absent (the temp files start with '.'), and at worst a torn last
line in an append-only manifest, which its reader ignores.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


__all__ = ["write_json", "read_json", "append_line"]


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_json(path: Path, obj) -> None:
    """`obj` as indented, key-sorted JSON (non-JSON values as str), written atomically; parent folders are made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


def append_line(path: Path, record: dict) -> None:
    """Append `record` as one key-sorted JSON line and fsync it."""
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
