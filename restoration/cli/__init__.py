"""The `faceadapt` command line. Heavy imports (torch, the web app) happen inside commands."""
from restoration.cli.app import app
from restoration.cli import models, restore, train, adapt, serve  # noqa: F401,E402  (registers commands)


def main() -> None:
    app()
