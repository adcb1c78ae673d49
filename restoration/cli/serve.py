"""`faceadapt` commands: serve."""
from restoration.cli.app import app  # noqa: F401
