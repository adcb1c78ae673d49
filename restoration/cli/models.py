"""`faceadapt` commands: models."""
from restoration.cli.app import app  # noqa: F401
