"""Shared fixtures: offline, CSV logging, runs in a temporary folder, few threads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CVLAB_SHARED_DATA", REPO.parent / "shared" / "data"))

os.environ.setdefault("CVLAB_LOGGER", "csv")
os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _isolated_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test writes its run folders under its own tmp dir and never reads a user's data root."""
    monkeypatch.setenv("CVLAB_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("CVLAB_DATA", str(tmp_path / "data"))
    monkeypatch.chdir(REPO)


@pytest.fixture
def shared_data(tmp_path: Path) -> Path:
    """A writable copy of the real MNIST / Fashion-MNIST from ../shared/data (skips if absent)."""
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.skip(f"real data not found under {SHARED_DATA}")
    import shutil

    dst = tmp_path / "real"
    for name in ("MNIST", "FashionMNIST"):
        if (SHARED_DATA / name).is_dir():
            shutil.copytree(SHARED_DATA / name, dst / name)
    return dst
