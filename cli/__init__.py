"""The `faceadapt` command line: the top layer, above `app`, `worker`, `service` and `restoration`; nothing imports
it."""
from cli.app import app
from cli import models, restore, train, adapt, serve  # noqa: F401,E402  (registers commands)


def main() -> None:
    app()
