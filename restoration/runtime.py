"""Exceptions shared by the long-running stages of FaceAdapt (pseudo targets, fine-tuning, adaptation).

`Cancelled` is raised when a `should_cancel()` callback returns True; stages check it between batches and
leave their work dir in a resumable state before raising.
"""
from __future__ import annotations


class Cancelled(Exception):
    """The caller asked the running stage to stop (its `should_cancel()` returned True)."""


__all__ = ["Cancelled"]
