"""Building the engine's config dataclasses from JSON-like dicts (CLI, API and work-dir files)."""
from __future__ import annotations

import dataclasses
from typing import TypeVar

T = TypeVar("T")


def strict_from_dict(cls: type[T], d: dict | None, what: str) -> T:
    """`cls(**d)`, refusing keys that are not fields of `cls` with a message naming them (`what` says whose)."""
    d = dict(d or {})
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown {what} parameter(s): {sorted(unknown)}")
    return cls(**d)
