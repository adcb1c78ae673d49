"""`faceadapt` commands: adapt."""
from restoration.cli.app import app  # noqa: F401
