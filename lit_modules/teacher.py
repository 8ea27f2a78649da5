"""Load a trained classifier as a frozen teacher: from a cvlab checkpoint or a plain state_dict.

A checkpoint is untrusted input: it is read with ``torch.load(weights_only=True)``, so it cannot run
code. Every failure (missing file, truncated or foreign file, wrong architecture) raises
:class:`TeacherLoadError` with one line that says what was expected and what to do.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cvlab.errors import CvlabError
from lit_modules.nets import create_net


class TeacherLoadError(CvlabError):
    """The teacher could not be loaded."""


class FrozenTeacher(nn.Module):
    """Wraps a network so that it stays in eval mode with no gradients for its weights.

    ``module.train()`` on an enclosing LightningModule does not switch it back to training mode,
    so BatchNorm statistics and dropout of the teacher never change. Gradients still flow to the
    *inputs* (data impressions, generators, attacks need them).
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenTeacher:
        super().train(False)
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.net.forward_features(x)

    def get_classifier(self) -> nn.Linear:
        return self.net.get_classifier()


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with one readable error for every way it fails."""
    p = Path(path)
    if not p.is_file():
        raise TeacherLoadError(
            f"teacher checkpoint not found: {p} (train one with `cvlab fit --config experiments/teachers/...`, "
            "or pass the path of an existing .ckpt / state_dict file)"
        )
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TeacherLoadError(
            f"cannot read checkpoint {p} ({p.stat().st_size} bytes): it is truncated, corrupt or not a "
            f"weights-only torch file ({first}); re-create it or re-download it"
        ) from None
    if not isinstance(obj, dict):
        raise TeacherLoadError(f"checkpoint {p} holds a {type(obj).__name__}, expected a state_dict or a cvlab checkpoint")
    return obj


def load_teacher(
    path: str | os.PathLike,
    arch: str | None = None,
    num_classes: int | None = None,
    in_channels: int | None = None,
    image_size: int | None = None,
    arch_kwargs: dict[str, Any] | None = None,
) -> FrozenTeacher:
    """Build and load a teacher, frozen and in eval mode.

    Args:
        path: a checkpoint written by :class:`lit_modules.classifier.ClassifierModule` (the
            architecture is read from it), or a plain ``state_dict`` file.
        arch, num_classes, in_channels, image_size, arch_kwargs: the architecture, required for a
            plain state_dict; for a cvlab checkpoint they must match it when given.
    """
    ckpt = read_checkpoint(path)
    if "state_dict" in ckpt and "hyper_parameters" in ckpt:
        hp = dict(ckpt["hyper_parameters"])
        given = {"arch": arch, "num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
        clash = {k: (v, hp.get(k)) for k, v in given.items() if v is not None and hp.get(k) is not None and v != hp.get(k)}
        if clash:
            txt = ", ".join(f"{k}: asked {a} but checkpoint has {b}" for k, (a, b) in clash.items())
            raise TeacherLoadError(f"teacher checkpoint {path} does not match the config ({txt})")
        if "arch" not in hp:
            raise TeacherLoadError(
                f"checkpoint {path} was not written by cvlab's ClassifierModule (no 'arch' hyper-parameter); "
                "pass its state_dict with the architecture name instead"
            )
        arch, num_classes, in_channels = hp["arch"], hp["num_classes"], hp["in_channels"]
        image_size, arch_kwargs = hp.get("image_size", 32), hp.get("arch_kwargs") or {}
        prefix = "net."
        state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    else:
        if arch is None:
            raise TeacherLoadError(
                f"{path} is a plain state_dict: give its architecture too (teacher arch name, num_classes, in_channels)"
            )
        state = ckpt.get("state_dict", ckpt)
        state = {k.removeprefix("module."): v for k, v in state.items()}
    net = create_net(
        arch,
        num_classes=num_classes or 10,
        in_channels=in_channels or 3,
        image_size=image_size or 32,
        **(arch_kwargs or {}),
    )
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise TeacherLoadError(
            f"weights in {path} do not fit architecture {arch!r}: {str(e).splitlines()[-1].strip()}"
        ) from None
    if result.missing_keys or result.unexpected_keys:
        raise TeacherLoadError(
            f"weights in {path} do not fit architecture {arch!r} "
            f"(missing: {result.missing_keys[:4]}, unexpected: {result.unexpected_keys[:4]}); check the arch name"
        )
    return FrozenTeacher(net)
