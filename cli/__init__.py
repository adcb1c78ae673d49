"""The `faceadapt` command line. Heavy imports (torch, the web app) happen inside commands."""
from cli.app import app
from cli import models, restore, train, adapt, serve  # noqa: F401,E402  (registers commands)


def main() -> None:
    app()
