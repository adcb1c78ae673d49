"""FaceAdapt's ML core: architectures, model zoo, face pipeline, degradations, diffusion prior,
pseudo targets, fine-tuning, metrics and the `faceadapt` CLI.

Importable without any web, database or queue package.
"""
__version__ = "0.1.0"
