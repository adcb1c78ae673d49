"""The ML settings of FaceAdapt: where the zoo and the detector weights live, the device, the default models.

Every field can be set with an environment variable `FACEADAPT_<FIELD>` (for example
`FACEADAPT_HOME=/data/faceadapt`). The service's own settings (database, broker, storage, limits, jobs...) extend
this class in `service/settings.py`, so every FACEADAPT_* variable belongs to one namespace. This module only
depends on pydantic-settings, so the ML core stays importable without any web, database or queue package.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def folder(value: Path | None, default: Path) -> Path:
    """A folder setting: `value` (with ~ expanded) when set, else `default`."""
    return Path(value).expanduser() if value else default


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FACEADAPT_", env_file=".env", extra="ignore")

    # --- where things live -------------------------------------------------------------
    home: Path = Field(default=Path("~/.faceadapt"), description="Root folder for the model zoo, storage and the embedded database.")
    models_dir: Path | None = Field(default=None, description="Model zoo folder (default: HOME/models).")
    facexlib_model_root: Path | None = Field(
        default=None, description="Folder holding facexlib weights such as detection_mobilenet0.25_Final.pth (default: HOME/facexlib)."
    )

    # --- ML defaults ---------------------------------------------------------------------
    device: str = Field(default="auto", description="'auto', 'cpu' or 'cuda[:N]'.")
    default_restorer: str = "faceadapt-swinir-small"
    default_prior: str = "faceadapt-iddpm-small"
    guard_prior: str = Field(default="faceadapt-iddpm-small", description="Face prior of the never-worse check's "
                             "naturalness criterion (a result the prior finds less natural than the input falls back); "
                             "'none' or empty: the check looks at detail and coarse content only.")
    detector: str = Field(default="auto", description="'auto' (RetinaFace, else MTCNN), 'retinaface' or 'mtcnn'.")
    min_adapt_images: int = Field(default=8, ge=1, description="The fewest images (with a face) an adaptation takes; "
                                  "fewer are refused before any work (restoration.adaptation.checks.MIN_IMAGES).")
    image_formats: str = Field(default="png,jpeg,webp,bmp,tiff", description="Comma-separated image formats accepted "
                               "(checked from the file's signature before decoding; any of png, jpeg, webp, bmp, tiff).")

    @property
    def home_dir(self) -> Path:
        return Path(self.home).expanduser()

    @property
    def zoo_dir(self) -> Path:
        return folder(self.models_dir, self.home_dir / "models")

    @property
    def facexlib_dir(self) -> Path:
        return folder(self.facexlib_model_root, self.home_dir / "facexlib")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
