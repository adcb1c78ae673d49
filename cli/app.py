"""The root `faceadapt` typer application; command modules register themselves on it."""
import typer

from cli.errors import OneLineErrors

app = typer.Typer(
    name="faceadapt",
    cls=OneLineErrors,  # every error is one line on stderr, never a traceback
    help="FaceAdapt: blind face restoration that adapts to your own images with a diffusion prior.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
