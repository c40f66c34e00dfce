"""Where the project finds its data: ``FASTERVIT_DATA`` or ``../shared/data`` beside the checkout."""

from __future__ import annotations

import os
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent


def data_root() -> Path:
    """Root of the shared real-image data (``$FASTERVIT_DATA``, default ``<repo>/../shared/data``)."""
    env = os.environ.get("FASTERVIT_DATA")
    return Path(env) if env else _REPO.parent / "shared" / "data"


def data_path(name: str) -> Path:
    """A named folder of the shared data, e.g. ``data_path('tiny-imagenet-10')``; errors clearly if absent."""
    path = data_root() / name
    if not path.exists():
        raise FileNotFoundError(
            f"data folder {path} does not exist; set FASTERVIT_DATA to the folder holding {name!r}"
        )
    return path
