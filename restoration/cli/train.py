"""`faceadapt` commands: train."""
from restoration.cli.app import app  # noqa: F401
