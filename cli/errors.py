"""One-line CLI errors: every error of the `faceadapt` command line is one line on stderr, never a traceback.

`OneLineErrors` is the root typer group class: usage errors (bad option, bad value, missing argument) print
``error: <message> (try 'faceadapt CMD --help')`` and exit 2; a click exception exits with its own code;
anything unexpected prints ``error: <type>: <message>`` and exits 1 (``FACEADAPT_DEBUG=1`` shows the traceback).
Commands report their own errors with :func:`fail`.
"""
from __future__ import annotations

import os
import sys
from typing import Any, NoReturn

import typer
from typer.core import TyperGroup

try:  # typer >= 0.20 carries its own copy of click
    from typer._click import exceptions as cx
except ImportError:  # pragma: no cover - older typer on the real click
    from click import exceptions as cx


def one_line(msg: object) -> str:
    """``msg`` as one line (its lines joined with '; ')."""
    lines = [ln.strip() for ln in str(msg).splitlines() if ln.strip()]
    return "; ".join(lines) if lines else str(msg).strip()


def fail(msg: object, code: int = 1) -> NoReturn:
    """Print ``error: msg`` (one line) on stderr and exit with ``code`` (2: usage, 1: anything else)."""
    typer.secho(f"error: {one_line(msg)}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def _echo_err(msg: str) -> None:
    typer.secho(f"error: {one_line(msg)}", err=True, fg=typer.colors.RED)


class OneLineErrors(TyperGroup):
    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode: bool = True,
             windows_expand_args: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False,
                                windows_expand_args=windows_expand_args, **extra)
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False,
                              windows_expand_args=windows_expand_args, **extra)
        except cx.NoArgsIsHelpError as e:  # `faceadapt` / `faceadapt models` alone: typer has printed the help
            sys.exit(e.exit_code)
        except cx.UsageError as e:
            hint = f" (try '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            _echo_err(e.format_message() + hint)
            sys.exit(e.exit_code)
        except cx.ClickException as e:
            _echo_err(e.format_message())
            sys.exit(e.exit_code)
        except typer.Abort:
            _echo_err("aborted")
            sys.exit(1)
        except Exception as e:  # noqa: BLE001 - the last line of defence: no traceback for the user
            if os.environ.get("FACEADAPT_DEBUG", "").lower() in ("1", "true", "yes"):
                raise
            _echo_err(f"{type(e).__name__}: {e} (FACEADAPT_DEBUG=1 shows the traceback)")
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)
