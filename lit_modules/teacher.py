"""A teacher is a network, its weights and the input it expects, frozen.

Any network is a teacher: a zoo name or any importable ``nn.Module`` by class path, with weights from

- a cvlab checkpoint (written by :class:`lit_modules.classifier.ClassifierModule` or the KD student): the
  network and its whole input contract are read from it;
- a plain ``state_dict`` file (nested under ``state_dict`` or ``model`` or not at all; ``module.`` prefixes
  of DataParallel are stripped; ``key_map`` renames layers whose names differ from the class's);
- a TorchScript file (``torch.jit.save``): the network is in the file; cvlab's own exports carry their
  contract inside (``cvlab_contract.json``).

The *input contract* is the image size, channels, number of classes and normalisation (mean, std) the
network was trained with. :class:`FrozenTeacher` applies it: methods hand it [0, 1] pixels of any size,
it resizes them to its own size when they differ and normalises them with its own statistics, so a
teacher trained on other statistics than the task's sees what it was trained on.

A checkpoint is untrusted input: files are read with ``torch.load(weights_only=True)`` (TorchScript with
``torch.jit.load``, which runs no pickled Python). Every failure (missing, truncated or foreign file,
wrong architecture) raises :class:`TeacherLoadError` with one line that says what was expected, what was
found and what to do; key mismatches list the missing and unexpected keys and suggest the closest zoo
architecture.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import zipfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvlab.errors import CvlabError
from lit_modules.nets import (InputNormalization, NetSpec, available_nets, classifier_layer, create_net,
                              features_and_logits, net_name)

CONTRACT_FILE = "cvlab_contract.json"


class TeacherLoadError(CvlabError):
    """The teacher could not be loaded."""


@dataclass
class TeacherSpec:
    """Where a teacher comes from and the input it expects (a config may give any subset; the rest is read
    from a cvlab checkpoint, or defaults where the file cannot say).

    Args:
        weights: a cvlab ``.ckpt``, a plain ``state_dict`` file, or a TorchScript file.
        arch: the network: a zoo name or ``{class_path: ..., init_args: {...}}`` (any importable
            ``nn.Module``); needed for a plain state_dict, read from a cvlab checkpoint.
        arch_kwargs: extra keyword arguments of a zoo builder.
        num_classes, in_channels, image_size: the network's output classes and input shape.
        mean, std: the per-channel normalisation the network was trained with (pixels in [0, 1]);
            ``None`` for a network that takes raw [0, 1] pixels.
        key_map: ``{regex: replacement}`` applied in order to every state_dict key before loading
            (e.g. ``{"^features\\\\.": "body.", "^classifier\\\\.": "fc."}``).
    """

    weights: str
    arch: NetSpec | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    num_classes: int | None = None
    in_channels: int | None = None
    image_size: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    key_map: dict[str, str] = field(default_factory=dict)

    def contract(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("num_classes", "in_channels", "image_size", "mean", "std")}


#: what a config gives as ``teacher``: a path, or a mapping of :class:`TeacherSpec`'s fields (a plain
#: mapping, so that it stays a weights-only-loadable hyper-parameter in checkpoints)
TeacherArg = Union[dict, str]


def as_spec(teacher: TeacherArg | dict[str, Any]) -> TeacherSpec:
    """A config's ``teacher`` (a path, a mapping, or a :class:`TeacherSpec`) as a :class:`TeacherSpec`."""
    if isinstance(teacher, TeacherSpec):
        return teacher
    if isinstance(teacher, (str, os.PathLike)):
        return TeacherSpec(weights=str(teacher))
    if isinstance(teacher, dict):
        unknown = set(teacher) - set(TeacherSpec.__dataclass_fields__)
        if unknown:
            raise TeacherLoadError(f"unknown teacher keys {sorted(unknown)}; expected {sorted(TeacherSpec.__dataclass_fields__)}")
        return TeacherSpec(**teacher)
    raise TeacherLoadError(f"a teacher is a path or a mapping with 'weights', got {type(teacher).__name__}")


class FrozenTeacher(nn.Module):
    """A network in eval mode with frozen weights, fed [0, 1] pixels through its own input contract.

    ``module.train()`` on an enclosing LightningModule does not switch it back to training mode, so
    BatchNorm statistics and dropout of the teacher never change. Gradients still flow to the *inputs*
    (data impressions, generators, attacks need them).

    Attributes:
        spec: the teacher's description with its contract filled in (``image_size``, ``in_channels``,
            ``num_classes``, ``mean``, ``std``).
        normalization: its :class:`InputNormalization`.
    """

    def __init__(self, net: nn.Module, spec: TeacherSpec | None = None) -> None:
        super().__init__()
        for p in net.parameters():  # (TorchScript modules have no requires_grad_)
            p.requires_grad_(False)
        self.net = net
        self.spec = spec or TeacherSpec(weights="<in memory>")
        self.normalization = InputNormalization(self.spec.mean, self.spec.std)
        self.eval()

    def train(self, mode: bool = True) -> FrozenTeacher:
        super().train(False)
        return self

    @property
    def num_classes(self) -> int | None:
        return self.spec.num_classes

    @property
    def input_shape(self) -> tuple[int, int, int] | None:
        s = self.spec
        return None if s.in_channels is None or s.image_size is None else (s.in_channels, s.image_size, s.image_size)

    def to_input(self, x: Tensor) -> Tensor:
        """[0, 1] pixels ``(B, C, H, W)`` -> what the network was trained on (resized, normalised)."""
        c, size = self.spec.in_channels, self.spec.image_size
        if c is not None and x.shape[1] != c:
            raise CvlabError(
                f"teacher {Path(self.spec.weights).name} takes {c}-channel images but was given {x.shape[1]} channels; "
                "use a teacher trained on this kind of image (or data with its channels)"
            )
        if size is not None and (x.shape[-1] != size or x.shape[-2] != size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return self.normalization(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.to_input(x))

    def forward_normalized(self, u: Tensor) -> Tensor:
        """Logits of an input already in the teacher's normalised space (``u = (x - mean) / std``)."""
        return self.net(u)

    def features_and_logits(self, x: Tensor, normalized: bool = False) -> tuple[Tensor, Tensor]:
        """Penultimate features ``(B, D)`` and logits ``(B, K)`` of pixels (or of ``normalized`` inputs)."""
        try:
            return features_and_logits(self.net, x if normalized else self.to_input(x))
        except TypeError as e:
            raise CvlabError(f"teacher {self.spec.weights}: {e}; this method needs them (give the network's class "
                             "and a state_dict instead of a TorchScript file)") from None

    def get_classifier(self) -> nn.Linear | None:
        return classifier_layer(self.net)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with one readable error for every way it fails."""
    p = Path(path)
    if not p.is_file():
        raise TeacherLoadError(
            f"teacher checkpoint not found: {p} (train one with `cvlab fit --config experiments/teachers/...`, "
            "or pass the path of an existing .ckpt / state_dict / TorchScript file)"
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


def is_torchscript(path: str | os.PathLike) -> bool:
    """A TorchScript archive is a zip with a ``constants.pkl`` / ``code/`` entry (no Python pickle of classes)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.split("/", 1)[-1] in ("constants.pkl",) or "/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def export_torchscript(net: nn.Module, path: str | os.PathLike, spec: TeacherSpec, example: Tensor | None = None) -> None:
    """Save ``net`` as TorchScript (scripted, else traced on ``example``) with its input contract inside."""
    try:
        scripted = torch.jit.script(net)
    except Exception:  # noqa: BLE001  (scripting fails for many plain modules; tracing is the fallback)
        if example is None:
            raise
        scripted = torch.jit.trace(net, example)
    contract = {**spec.contract(), "arch": spec.arch if spec.arch is None or isinstance(spec.arch, str) else net_name(spec.arch)}
    torch.jit.save(scripted, str(path), _extra_files={CONTRACT_FILE: json.dumps(contract)})


def _remap(state: dict[str, Tensor], key_map: dict[str, str]) -> dict[str, Tensor]:
    for pattern, repl in key_map.items():
        rx = re.compile(pattern)
        state = {rx.sub(repl, k): v for k, v in state.items()}
    return state


def _layer(key: str) -> str:
    return key.rsplit(".", 1)[0]


def _closest_zoo(state: dict[str, Tensor], spec: TeacherSpec) -> str | None:
    """The zoo architecture whose keys and shapes fit ``state`` best (for the error message)."""
    best, best_score = None, 0.0
    for name in available_nets():
        try:
            own = create_net(name, num_classes=spec.num_classes or 10, in_channels=spec.in_channels or 3,
                             image_size=spec.image_size or 32).state_dict()
        except Exception:  # noqa: BLE001  (a builder that refuses this shape is just not a candidate)
            continue
        fit = sum(1 for k, v in own.items() if k in state and tuple(state[k].shape) == tuple(v.shape))
        score = fit / max(len(own), len(state))
        if score > best_score:
            best, best_score = name, score
    return best if best_score > 0.5 else None


def _load_state(net: nn.Module, state: dict[str, Tensor], spec: TeacherSpec) -> None:
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        def per_layer(keys: list[str]) -> str:
            layers: dict[str, list[str]] = {}
            for k in keys:
                layers.setdefault(_layer(k), []).append(k.rsplit(".", 1)[-1])
            return "; ".join(f"{layer}.{{{','.join(v)}}}" for layer, v in layers.items()) or "none"

        hint = _closest_zoo(state, spec)
        raise TeacherLoadError(
            f"weights in {spec.weights} do not fit {net_name(spec.arch)}: missing {per_layer(missing)}; "
            f"unexpected {per_layer(unexpected)}; shape mismatches {'; '.join(shapes) or 'none'}"
            + (f"; the closest zoo architecture is {hint!r}" if hint else "")
            + "; check the architecture and its arguments, or map the keys with teacher.key_map"
        )
    net.load_state_dict(state, strict=True)


def _from_cvlab_checkpoint(ckpt: dict[str, Any], spec: TeacherSpec) -> tuple[nn.Module, TeacherSpec]:
    hp = dict(ckpt["hyper_parameters"])
    if "arch" not in hp:
        raise TeacherLoadError(
            f"checkpoint {spec.weights} was not written by cvlab's ClassifierModule (no 'arch' hyper-parameter); "
            "pass its state_dict with the architecture instead"
        )
    if "mean" not in hp and spec.mean is None:
        raise TeacherLoadError(
            f"checkpoint {spec.weights} was written before cvlab stored a network's input normalisation: give "
            "teacher.mean and teacher.std (the statistics of the datamodule it was trained on, e.g. MNIST "
            "[0.1307] and [0.3081]), or retrain it"
        )
    stored = {"arch": hp["arch"], "num_classes": hp.get("num_classes"), "in_channels": hp.get("in_channels"),
              "image_size": hp.get("image_size", 32), "mean": hp.get("mean"), "std": hp.get("std")}
    clash = {k: (getattr(spec, k), v) for k, v in stored.items()
             if getattr(spec, k) is not None and v is not None and _norm(getattr(spec, k)) != _norm(v)}
    if clash:
        txt = ", ".join(f"{k}: asked {a} but checkpoint has {b}" for k, (a, b) in clash.items())
        raise TeacherLoadError(f"teacher checkpoint {spec.weights} does not match the config ({txt})")
    spec = replace(spec, **{k: v for k, v in stored.items() if v is not None},
                   arch_kwargs=hp.get("arch_kwargs") or {})
    net = create_net(spec.arch, num_classes=spec.num_classes or 10, in_channels=spec.in_channels or 3,
                     image_size=spec.image_size or 32, **spec.arch_kwargs)
    state = {k[len("net."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    _load_state(net, _remap(state, spec.key_map), spec)
    return net, spec


def _norm(v: Any) -> Any:
    return [float(x) for x in v] if isinstance(v, (list, tuple)) else v


def _from_torchscript(spec: TeacherSpec) -> tuple[nn.Module, TeacherSpec]:
    extra = {CONTRACT_FILE: ""}
    try:
        net = torch.jit.load(spec.weights, map_location="cpu", _extra_files=extra)
    except (RuntimeError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TeacherLoadError(f"cannot read TorchScript teacher {spec.weights}: {first}") from None
    stored = json.loads(extra[CONTRACT_FILE]) if extra[CONTRACT_FILE] else {}
    filled = {k: v for k, v in stored.items() if k in spec.contract() and getattr(spec, k) is None and v is not None}
    return net, replace(spec, **filled)


def _from_state_dict(ckpt: dict[str, Any], spec: TeacherSpec) -> tuple[nn.Module, TeacherSpec]:
    if spec.arch is None:
        raise TeacherLoadError(
            f"{spec.weights} is a plain state_dict: give its architecture too (teacher.arch: a zoo name or "
            "{class_path: ..., init_args: ...}, with num_classes, in_channels, image_size, mean, std)"
        )
    state = ckpt
    for key in ("state_dict", "model", "model_state_dict", "net"):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    if not all(isinstance(v, Tensor) for v in state.values()):
        raise TeacherLoadError(f"{spec.weights} holds no state_dict of tensors (keys: {sorted(ckpt)[:6]})")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    net = create_net(spec.arch, num_classes=spec.num_classes or 10, in_channels=spec.in_channels or 3,
                     image_size=spec.image_size or 32, **spec.arch_kwargs)
    _load_state(net, _remap(state, spec.key_map), spec)
    return net, spec


def _probe_contract(net: nn.Module, spec: TeacherSpec) -> TeacherSpec:
    """Fill ``num_classes`` from the final layer, or from one forward pass on a zero image of the contract."""
    if spec.num_classes is not None:
        return spec
    fc = classifier_layer(net)
    if fc is not None:
        return replace(spec, num_classes=fc.out_features)
    if spec.in_channels is not None and spec.image_size is not None:
        with torch.no_grad():
            out = net(InputNormalization(spec.mean, spec.std)(torch.zeros(1, spec.in_channels, spec.image_size, spec.image_size)))
        return replace(spec, num_classes=int(out.shape[-1]))
    return spec


def load_teacher(
    teacher: TeacherArg | dict[str, Any],
    arch: NetSpec | None = None,
    num_classes: int | None = None,
    in_channels: int | None = None,
    image_size: int | None = None,
    arch_kwargs: dict[str, Any] | None = None,
) -> FrozenTeacher:
    """Build and load a teacher, frozen and in eval mode, with its input contract.

    Args:
        teacher: a path (cvlab checkpoint, or TorchScript), or a :class:`TeacherSpec` / mapping with
            the weights, architecture, contract and key map.
        arch, num_classes, in_channels, image_size, arch_kwargs: shorthands that fill the spec's fields
            where it leaves them unset; for a cvlab checkpoint they must match it when given.
    """
    spec = as_spec(teacher)
    given = {"arch": arch, "num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
    spec = replace(spec, **{k: v for k, v in given.items() if v is not None and getattr(spec, k) is None})
    if arch_kwargs and not spec.arch_kwargs:
        spec = replace(spec, arch_kwargs=arch_kwargs)
    path = Path(spec.weights)
    if path.is_file() and is_torchscript(path):
        net, spec = _from_torchscript(spec)
    else:
        ckpt = read_checkpoint(path)
        if "state_dict" in ckpt and "hyper_parameters" in ckpt:
            net, spec = _from_cvlab_checkpoint(ckpt, spec)
        else:
            net, spec = _from_state_dict(ckpt, spec)
    spec = _probe_contract(net, replace(spec, weights=str(path)))
    return FrozenTeacher(net, spec)


def shape_from_teacher(hparams: Any, teacher: FrozenTeacher) -> None:
    """Fill a module's ``num_classes``, ``in_channels``, ``image_size`` hyper-parameters left ``None`` with the
    teacher's contract (so configs need not repeat them); one line when neither says."""
    for key in ("num_classes", "in_channels", "image_size"):
        if hparams[key] is None:
            hparams[key] = getattr(teacher.spec, key)
        if hparams[key] is None:
            raise CvlabError(f"the teacher {teacher.spec.weights} does not say its {key}: set --model.init_args.{key}")


def teacher_file_digest(teacher: TeacherArg | dict[str, Any]) -> dict[str, Any]:
    """What identifies a teacher in a manifest: its contract and a hash of its weights file."""
    spec = as_spec(teacher)
    d = asdict(spec)
    d["weights_sha256"] = hashlib.sha256(Path(spec.weights).read_bytes()).hexdigest()[:16]
    d.pop("weights")
    return d


__all__ = ["FrozenTeacher", "TeacherArg", "TeacherLoadError", "TeacherSpec", "as_spec", "export_torchscript",
           "is_torchscript", "load_teacher", "read_checkpoint", "shape_from_teacher", "teacher_file_digest"]
