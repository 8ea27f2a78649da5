"""Where datasets live: one root for every datamodule."""

from __future__ import annotations

import os
from pathlib import Path


def default_data_dir() -> str:
    """``$CVLAB_DATA`` if set, else ``./data``."""
    return os.environ.get("CVLAB_DATA", "./data")


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """The data root as an absolute path (``None`` means :func:`default_data_dir`)."""
    return Path(data_dir if data_dir is not None else default_data_dir()).expanduser().resolve()
