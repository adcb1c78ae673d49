"""`faceadapt` commands: restore."""
from restoration.cli.app import app  # noqa: F401
