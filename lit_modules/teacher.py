"""A teacher is a network, its weights and the input it expects, frozen.

Any network is a teacher: a zoo name or any importable ``nn.Module`` by class path, with weights from

- a cvlab checkpoint (written by :class:`lit_modules.classifier.ClassifierModule` or the KD student): the
  network and its whole input contract are read from it;
- a weight file as PyTorch reads it (``.pt``, ``.pth``, ``.th``, ``.tar``, old non-zip saves, ``.safetensors``
  where that package is installed): a ``state_dict`` at the top or nested under ``state_dict``, ``model``,
  ``model_state_dict``, ``net`` or ``module``; the ``module.`` prefix of DataParallel/DDP and the ``_orig_mod.``
  of ``torch.compile`` are taken off; ``key_map`` renames layers whose names differ from the class's. The file
  is accepted exactly when the class's strict ``load_state_dict`` accepts it (so an old save without
  BatchNorm's ``num_batches_tracked`` loads, as in PyTorch); a refusal names the layers;
- a TorchScript file (``torch.jit.save``): the network is in the file; cvlab's own exports carry their
  contract inside (``cvlab_contract.json``).

The *input contract* is the image size, channels, number of classes and normalisation (mean, std) the
network was trained with. An outside teacher (weights or TorchScript without cvlab's contract) must state
``image_size``, ``in_channels`` and its normalisation (``mean`` and ``std``, or ``normalization: none`` for a
network fed raw [0, 1] pixels): a guessed normalisation costs accuracy without a word (a tanh LeNet-5 on
MNIST: 98.94% with its own, 83.39% without). At import the whole contract is checked with one forward pass
on a blank batch of the declared shape; an error names the contract key to change. :class:`FrozenTeacher`
applies the contract: methods hand it [0, 1] pixels of any size, it resizes them to its own size when they
differ and normalises them with its own statistics, so a teacher sees what it was trained on.

A checkpoint is untrusted input: files are read with ``torch.load(weights_only=True)`` (TorchScript with
``torch.jit.load``, which runs no pickled Python). Every failure (missing, truncated or foreign file,
wrong architecture, incomplete or wrong contract) raises :class:`TeacherLoadError` with one line that says
what was expected, what was found and what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvlab.artifacts import UNREADABLE_TORCH_FILE
from cvlab.errors import CvlabError
from cvlab.task import TaskMismatchError, TaskSpec, check_task
from lit_modules.nets import (
    InputNormalization,
    NetSpec,
    available_nets,
    classifier_layer,
    create_net,
    features_and_logits,
    net_name,
)

CONTRACT_FILE = "cvlab_contract.json"
#: where a checkpoint dict nests its state_dict (searched in this order, two levels deep)
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")
#: how many layers an error names before it counts the rest
SHOWN_LAYERS = 4
#: image sizes tried when a contract's image_size does not run, to name one that does
PROBE_SIZES = (28, 32, 64, 96, 112, 128, 224, 227, 299)


class TeacherLoadError(CvlabError):
    """The teacher could not be loaded."""


@dataclass
class TeacherSpec:
    """Where a teacher comes from and the input it expects (a config may give any subset; the rest is read
    from a cvlab checkpoint or a cvlab TorchScript export; an outside teacher must give its contract).

    Args:
        weights: a cvlab ``.ckpt``, a weight file (``.pt``/``.pth``/``.th``/``.tar``/``.safetensors``), or a
            TorchScript file.
        arch: the network: a zoo name or ``{class_path: ..., init_args: {...}}`` (any importable
            ``nn.Module``); needed for a weight file, read from a cvlab checkpoint.
        arch_kwargs: extra keyword arguments of a zoo builder.
        num_classes, in_channels, image_size: the network's output classes and input shape (``num_classes``
            is read off the network's output when not given).
        mean, std: the per-channel normalisation the network was trained with (pixels in [0, 1]).
        normalization: ``"none"`` for a network fed raw [0, 1] pixels (then no mean/std); an outside
            teacher must give either this or ``mean`` and ``std``.
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
    normalization: str | None = None
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
            raise TeacherLoadError(f"unknown teacher keys {sorted(unknown)}; "
                                   f"expected {sorted(TeacherSpec.__dataclass_fields__)}")
        if "weights" not in teacher:
            raise TeacherLoadError(f"a teacher mapping needs 'weights' (the file), got keys {sorted(teacher)}")
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
                f"teacher {Path(self.spec.weights).name} takes {c}-channel images (its contract, checked against the "
                f"network at import) but was given {x.shape[1]} channels; use data with {c} channels, or a teacher "
                f"trained on {x.shape[1]}-channel images"
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


# --- reading files ------------------------------------------------------------------------------------------
def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The dict in a weight file: ``torch.load(path, weights_only=True)`` (any torch format, old non-zip saves
    included), or a ``.safetensors`` file; one readable error for every way it fails."""
    p = Path(path)
    if not p.is_file():
        raise TeacherLoadError(
            f"teacher checkpoint not found: {p} (train one with `cvlab fit --config experiments/teachers/...`, "
            "or pass the path of an existing .ckpt / state_dict / TorchScript file)"
        )
    if p.suffix == ".safetensors":
        return _read_safetensors(p)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except UNREADABLE_TORCH_FILE as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TeacherLoadError(
            f"cannot read checkpoint {p} ({p.stat().st_size} bytes): it is truncated, corrupt or not a "
            f"weights-only torch file ({first}); re-create it or re-download it"
        ) from None
    if not isinstance(obj, dict):
        raise TeacherLoadError(f"checkpoint {p} holds a {type(obj).__name__}, expected a state_dict or a cvlab "
                               "checkpoint")
    return obj


def _read_safetensors(p: Path) -> dict[str, Tensor]:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise TeacherLoadError(f"{p} is a safetensors file: install the safetensors package to read it "
                               "(`uv add safetensors`), or save the state_dict with torch.save") from None
    try:
        return load_file(str(p), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise TeacherLoadError(f"cannot read safetensors file {p}: {str(e).strip().splitlines()[0]}") from None


def is_torchscript(path: str | os.PathLike) -> bool:
    """A TorchScript archive is a zip with a ``constants.pkl`` / ``code/`` entry (no Python pickle of classes)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.split("/", 1)[-1] in ("constants.pkl",) or "/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def export_torchscript(net: nn.Module, path: str | os.PathLike, spec: TeacherSpec,
                       example: Tensor | None = None) -> None:
    """Save ``net`` as TorchScript (scripted, else traced on ``example``) with its input contract inside."""
    try:
        scripted = torch.jit.script(net)
    except Exception:  # noqa: BLE001  (scripting fails for many plain modules; tracing is the fallback)
        if example is None:
            raise
        scripted = torch.jit.trace(net, example)
    contract = {**spec.contract(), "normalization": "none" if spec.mean is None else None,
                "arch": spec.arch if spec.arch is None or isinstance(spec.arch, str) else net_name(spec.arch)}
    torch.jit.save(scripted, str(path), _extra_files={CONTRACT_FILE: json.dumps(contract)})


# --- state_dict keys as PyTorch reads them --------------------------------------------------------------------
def find_state_dict(obj: dict[str, Any], where: str) -> dict[str, Tensor]:
    """The ``{key: tensor}`` state_dict in a loaded checkpoint: ``obj`` itself, or nested (two levels at most)
    under one of :data:`STATE_DICT_KEYS` (``{"state_dict": ...}``, ``{"model": {"state_dict": ...}}``)."""
    if isinstance(obj, dict) and not obj:
        return {}  # the state_dict of a network without parameters: strict loading decides
    todo = [obj]
    for _ in range(3):
        nxt = []
        for d in todo:
            if d and all(isinstance(v, Tensor) for v in d.values()):
                return d
            nxt += [d[k] for k in STATE_DICT_KEYS if isinstance(d.get(k), dict)]
        todo = nxt
    raise TeacherLoadError(f"{where} holds no state_dict of tensors (top-level keys: {sorted(obj)[:6]}); save "
                           "model.state_dict() with torch.save, or nest it under 'state_dict'")


def rename_keys(state: dict[str, Tensor], fn: Callable[[str], str]) -> OrderedDict[str, Tensor]:
    """``state`` with every key renamed by ``fn``, and its ``_metadata`` (the per-module versions PyTorch saves,
    which decide e.g. whether BatchNorm's ``num_batches_tracked`` may be missing) renamed alike."""
    out = OrderedDict((fn(k), v) for k, v in state.items())
    meta = getattr(state, "_metadata", None)
    if meta is not None:  # a module path "a.b" is renamed as the key prefix "a.b." would be
        out._metadata = OrderedDict((fn(f"{k}.").rstrip(".") if k else k, v) for k, v in meta.items())
    return out


def unwrap_keys(state: dict[str, Tensor], own: list[str]) -> dict[str, Tensor]:
    """Take off what wrappers add to every key: ``_orig_mod.`` of ``torch.compile`` (anywhere) and the
    ``module.`` prefix of DataParallel / DDP (any nesting of the two), unless the class's own keys have them."""
    if any("_orig_mod." in k for k in state) and not any("_orig_mod." in k for k in own):
        state = rename_keys(state, lambda k: k.replace("_orig_mod.", ""))
    while state and all(k.startswith("module.") for k in state) and not all(k.startswith("module.") for k in own):
        state = rename_keys(state, lambda k: k.removeprefix("module."))
    return state


def _remap(state: dict[str, Tensor], key_map: dict[str, str]) -> dict[str, Tensor]:
    for pattern, repl in key_map.items():
        rx = re.compile(pattern)
        state = rename_keys(state, lambda k, rx=rx, repl=repl: rx.sub(repl, k))
    return state


def _layer(key: str) -> str:
    return key.rsplit(".", 1)[0]


def _listing(keys: list[str]) -> str:
    """``a.{weight,bias}; b.{weight} ... (+N more layers; K keys)``: the first few layers of ``keys``, counted."""
    if not keys:
        return "none"
    layers: dict[str, list[str]] = {}
    for k in keys:
        layers.setdefault(_layer(k), []).append(k.rsplit(".", 1)[-1])
    shown = "; ".join(f"{layer}.{{{','.join(v)}}}" for layer, v in list(layers.items())[:SHOWN_LAYERS])
    more = len(layers) - SHOWN_LAYERS
    return shown + (f"; +{more} more layers" if more > 0 else "") + f" ({len(keys)} key{'s' * (len(keys) != 1)})"


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


def _prefix_hint(unexpected: list[str], missing: list[str]) -> str:
    """A key_map that would fix keys which all carry one extra leading segment (a Lightning module's
    ``model.``, an EMA wrapper's ``ema.``), when taking it off turns unexpected keys into missing ones."""
    heads = {k.split(".", 1)[0] for k in unexpected}
    if len(heads) != 1 or not missing:
        return ""
    head = heads.pop()
    if not {k.split(".", 1)[-1] for k in unexpected} & set(missing):
        return ""
    return f"; every unexpected key starts with '{head}.': set teacher.key_map {{'^{head}\\.': ''}}"


def _classes_hint(file_shapes: dict[str, tuple[int, ...]], own: dict[str, Tensor], spec: TeacherSpec) -> str:
    """When the only shape mismatches are the output layer's classes (the contract's ``num_classes`` against the
    file's), the contract key to change."""
    k = spec.num_classes
    if not file_shapes or k is None:
        return ""
    outs = {shape[0] for key, shape in file_shapes.items()
            if own[key].shape[0] == k and shape[1:] == tuple(own[key].shape[1:])}
    if len(outs) != 1 or len(file_shapes) != sum(own[key].shape[0] == k for key in file_shapes):
        return ""
    return f"; the file's output layer has {outs.pop()} classes: change teacher.num_classes (the contract says {k})"


def load_weights(net: nn.Module, state: dict[str, Tensor], spec: TeacherSpec) -> None:
    """``net.load_state_dict(state, strict=True)``, accepting exactly what it accepts; a refusal is one line
    naming the missing, unexpected and shape-mismatched layers (counted, the first few named)."""
    own = net.state_dict()
    file_shapes = {k: tuple(state[k].shape) for k, v in own.items()
                   if k in state and tuple(state[k].shape) != tuple(v.shape)}
    fits = state
    if file_shapes:  # PyTorch raises on these even when not strict: load the rest to learn what else it refuses
        fits = OrderedDict((k, v) for k, v in state.items() if k not in file_shapes)
        if getattr(state, "_metadata", None) is not None:
            fits._metadata = state._metadata
    try:
        result = net.load_state_dict(fits, strict=False)
    except RuntimeError as e:  # a module's own _load_from_state_dict refused something
        lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
        raise TeacherLoadError(f"weights in {spec.weights} do not fit {net_name(spec.arch)}: "
                               f"{' '.join(lines[:2])}") from None
    missing = [k for k in result.missing_keys if k not in file_shapes]
    unexpected = list(result.unexpected_keys)
    if not (missing or unexpected or file_shapes):
        return  # what strict loading accepts (it also fills buffers that old saves lack, by their version)
    n = len(file_shapes)
    mismatched = [f"{k} {shape} vs {tuple(own[k].shape)}" for k, shape in file_shapes.items()]
    shapes = ("; ".join(mismatched[:SHOWN_LAYERS]) + (f"; +{n - SHOWN_LAYERS} more" if n > SHOWN_LAYERS else "")
              + f" ({n} key{'s' * (n != 1)})") if n else "none"
    hint = _closest_zoo(state, spec)
    raise TeacherLoadError(
        f"weights in {spec.weights} do not fit {net_name(spec.arch)}: missing {_listing(missing)}; "
        f"unexpected {_listing(unexpected)}; shape mismatches {shapes}" + _prefix_hint(unexpected, missing)
        + _classes_hint(file_shapes, own, spec) + (f"; the closest zoo architecture is {hint!r}" if hint else "")
        + "; check the architecture and its arguments, or map the keys with teacher.key_map"
    )


# --- the three kinds of file ----------------------------------------------------------------------------------
def _is_cvlab_checkpoint(ckpt: dict[str, Any], spec: TeacherSpec) -> bool:
    """A checkpoint with cvlab's hyper-parameters (a Lightning checkpoint of another project, with no
    ``arch`` hyper-parameter, is read as a state_dict when the config names the architecture)."""
    if "state_dict" not in ckpt or not isinstance(ckpt.get("hyper_parameters"), dict):
        return False
    return "arch" in ckpt["hyper_parameters"] or spec.arch is None


def _from_cvlab_checkpoint(ckpt: dict[str, Any], spec: TeacherSpec) -> tuple[nn.Module, TeacherSpec]:
    hp = dict(ckpt["hyper_parameters"])
    if "arch" not in hp:
        raise TeacherLoadError(
            f"checkpoint {spec.weights} was not written by cvlab's ClassifierModule (no 'arch' hyper-parameter); "
            "give its architecture (teacher.arch) and input contract to read its state_dict"
        )
    if "mean" not in hp and spec.mean is None and spec.normalization is None:
        raise TeacherLoadError(
            f"checkpoint {spec.weights} was written before cvlab stored a network's input normalisation: give "
            "teacher.mean and teacher.std (the statistics of the datamodule it was trained on, e.g. MNIST "
            "[0.1307] and [0.3081]), or retrain it"
        )
    if spec.normalization == "none" and hp.get("mean") is not None:
        raise TeacherLoadError(f"teacher checkpoint {spec.weights} normalises with mean {hp['mean']} and std "
                               f"{hp.get('std')}, but the config says normalization: none; drop it")
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
    state, own = ckpt["state_dict"], OrderedDict((k, v) for k, v in ckpt["state_dict"].items() if k.startswith("net."))
    if getattr(state, "_metadata", None) is not None:  # (the module versions, as PyTorch saved them)
        own._metadata = state._metadata
    state = rename_keys(own, lambda k: k.removeprefix("net."))
    load_weights(net, _remap(state, spec.key_map), spec)
    return net, spec


def _norm(v: Any) -> Any:
    return [float(x) for x in v] if isinstance(v, (list, tuple)) else v


def _from_torchscript(spec: TeacherSpec) -> tuple[nn.Module, TeacherSpec, bool]:
    """The scripted network, the spec with what its cvlab contract says filled in, and whether it had one."""
    extra = {CONTRACT_FILE: ""}
    try:
        net = torch.jit.load(spec.weights, map_location="cpu", _extra_files=extra)
    except (RuntimeError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TeacherLoadError(f"cannot read TorchScript teacher {spec.weights}: {first}") from None
    stored = json.loads(extra[CONTRACT_FILE]) if extra[CONTRACT_FILE] else {}
    if stored and "mean" in stored and stored["mean"] is None:  # cvlab wrote it: a network fed raw pixels
        stored["normalization"] = "none"
    keys = (*spec.contract(), "normalization")
    filled = {k: v for k, v in stored.items() if k in keys and getattr(spec, k) is None and v is not None}
    if spec.mean is not None or spec.normalization is not None:  # the config's normalisation wins as a whole
        filled = {k: v for k, v in filled.items() if k not in ("mean", "std", "normalization")}
    return net, replace(spec, **filled), bool(stored)


def _from_state_dict(ckpt: dict[str, Any], spec: TeacherSpec) -> tuple[nn.Module, TeacherSpec]:
    if spec.arch is None:
        raise TeacherLoadError(
            f"{spec.weights} is a plain state_dict: give its architecture too (teacher.arch: a zoo name or "
            "{class_path: ..., init_args: ...}, with num_classes, in_channels, image_size, mean, std)"
        )
    net = create_net(spec.arch, num_classes=spec.num_classes or 10, in_channels=spec.in_channels or 3,
                     image_size=spec.image_size or 32, **spec.arch_kwargs)
    state = unwrap_keys(find_state_dict(ckpt, str(spec.weights)), list(net.state_dict()))
    load_weights(net, _remap(state, spec.key_map), spec)
    return net, spec


# --- the input contract ---------------------------------------------------------------------------------------
def check_normalization(spec: TeacherSpec) -> None:
    """The normalisation keys make sense together: ``mean`` and ``std`` both (one value per channel, std > 0),
    or ``normalization: none``, not both."""
    w = spec.weights
    if spec.normalization not in (None, "none"):
        raise TeacherLoadError(f"teacher {w}: teacher.normalization is 'none' (a network fed raw [0, 1] pixels) or "
                               f"left out with teacher.mean and teacher.std given; got {spec.normalization!r}")
    if spec.normalization == "none" and (spec.mean is not None or spec.std is not None):
        raise TeacherLoadError(f"teacher {w}: teacher.normalization none and teacher.mean/std are both given; keep one")
    if (spec.mean is None) != (spec.std is None):
        given, lacking = ("mean", "std") if spec.mean is not None else ("std", "mean")
        raise TeacherLoadError(f"teacher {w}: teacher.{given} is given without teacher.{lacking}; give both")
    if spec.mean is None:
        return
    if len(spec.mean) != len(spec.std) or any(s <= 0 for s in spec.std):
        raise TeacherLoadError(f"teacher {w}: teacher.mean {spec.mean} and teacher.std {spec.std} need one value per "
                               "channel each, std > 0")
    if spec.in_channels is not None and len(spec.mean) not in (1, spec.in_channels):
        raise TeacherLoadError(f"teacher {w}: teacher.mean has {len(spec.mean)} values but teacher.in_channels is "
                               f"{spec.in_channels}; give one value per channel")


def check_contract_complete(spec: TeacherSpec) -> None:
    """An outside teacher states its whole contract: ``image_size``, ``in_channels`` and its normalisation
    (``mean`` and ``std``, or ``normalization: none``); ``num_classes`` is read off its output."""
    lacking = []
    if spec.image_size is None:
        lacking.append("teacher.image_size (the size it was trained at)")
    if spec.in_channels is None:
        lacking.append("teacher.in_channels")
    if spec.mean is None and spec.normalization != "none":
        lacking.append("teacher.mean and teacher.std (the per-channel normalisation it was trained with, on [0, 1] "
                       "pixels, e.g. MNIST's [0.1307] and [0.3081]), or teacher.normalization: none for a network fed "
                       "raw [0, 1] pixels")
    if lacking:
        raise TeacherLoadError(
            f"teacher {spec.weights} does not carry its input contract: give {', '.join(lacking)}; a wrong "
            "normalisation costs accuracy without any error (a tanh LeNet-5 on MNIST: 98.94% with its own, 83.39% "
            "without)"
        )


def _teacher_name(net: nn.Module, spec: TeacherSpec) -> str:
    cls = getattr(net, "original_name", type(net).__name__)  # (a TorchScript module's class name)
    return f"teacher {spec.weights} ({net_name(spec.arch) if spec.arch is not None else cls})"


def _first_conv_channels(net: nn.Module) -> int | None:
    """The input channels of the network's first 2-d convolution (a TorchScript one too), if it has one."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d) or getattr(m, "original_name", None) == "Conv2d":
            groups = int(getattr(m, "groups", 1))
            return int(getattr(m, "in_channels", m.weight.shape[1] * groups))
    return None


def _blank_forward(net: nn.Module, spec: TeacherSpec, c: int, size: int) -> tuple[Any, BaseException | None]:
    """The network's output on two blank images ``(2, c, size, size)`` of its contract, or the error it raised."""
    blank = InputNormalization(spec.mean, spec.std)(torch.zeros(2, c, size, size))
    try:
        with torch.no_grad():
            return net(blank), None
    except Exception as e:  # noqa: BLE001  (the network is the user's code: any error it raises becomes one line)
        return None, e


def _forward_failure(net: nn.Module, spec: TeacherSpec, e: BaseException) -> str:
    """One line for a forward pass that fails on the contract's blank batch, naming the key to change."""
    c, s, name = spec.in_channels, spec.image_size, _teacher_name(net, spec)
    lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
    if lines and lines[0].startswith("The following operation failed in the TorchScript interpreter"):
        lines = lines[-1:]  # the scripted network's own error comes last, after its TorchScript traceback
    first = lines[0] if lines and re.match(r"\w+(Error|Exception): ", lines[0]) else \
        f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    takes = _first_conv_channels(net)
    if takes is not None and takes != c:
        return (f"{name}: the contract says in_channels {c} but the network's first convolution takes {takes}-channel "
                f"images; change teacher.in_channels to {takes} (the contract value, not the teacher)")
    for size in sorted(PROBE_SIZES, key=lambda z: (abs(z - s), z)):
        if size != s and _blank_forward(net, spec, c, size)[1] is None:
            return (f"{name} does not run on {c}x{s}x{s} images ({first}) but runs on {c}x{size}x{size}; change "
                    f"teacher.image_size to the size it was trained at ({size}?)")
    return (f"{name} fails on a blank batch of its contract ({c}x{s}x{s}): {first}; check that teacher.arch is the "
            "class these weights were saved from (same layers, same forward) with the same init_args")


def validate_contract(net: nn.Module, spec: TeacherSpec) -> TeacherSpec:
    """Check the whole contract with one forward pass on a blank batch ``(2, in_channels, image_size,
    image_size)``: the network must run on it and give ``(2, num_classes)`` logits. Returns the spec with
    ``num_classes`` read off the output where it was not given; an error names the contract key to change."""
    net.eval()
    c, s = spec.in_channels, spec.image_size
    if c is None or s is None:  # (only an in-memory spec; files must state them)
        fc = classifier_layer(net)
        return spec if spec.num_classes is not None or fc is None else replace(spec, num_classes=fc.out_features)
    out, err = _blank_forward(net, spec, c, s)
    if err is not None:
        raise TeacherLoadError(_forward_failure(net, spec, err))
    if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[0] != 2:
        got = f"a tensor of shape {tuple(out.shape)}" if isinstance(out, Tensor) else f"a {type(out).__name__}"
        raise TeacherLoadError(f"{_teacher_name(net, spec)} returns {got} for a blank batch of 2 {c}x{s}x{s} images; "
                               "a teacher returns logits (2, num_classes): wrap the network so that it does")
    k = int(out.shape[1])
    if spec.num_classes is not None and spec.num_classes != k:
        raise TeacherLoadError(f"{_teacher_name(net, spec)}: the contract says num_classes {spec.num_classes} but the "
                               f"network gives {k} logits; change teacher.num_classes to {k}")
    return replace(spec, num_classes=k)


def load_teacher(
    teacher: TeacherArg | dict[str, Any],
    arch: NetSpec | None = None,
    num_classes: int | None = None,
    in_channels: int | None = None,
    image_size: int | None = None,
    arch_kwargs: dict[str, Any] | None = None,
) -> FrozenTeacher:
    """Build and load a teacher, frozen and in eval mode, with its input contract checked by one forward pass.

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
    check_normalization(spec)
    path = Path(spec.weights)
    if path.is_file() and is_torchscript(path):
        net, spec, carries_contract = _from_torchscript(spec)
    else:
        ckpt = read_checkpoint(path)
        carries_contract = _is_cvlab_checkpoint(ckpt, spec)
        net, spec = _from_cvlab_checkpoint(ckpt, spec) if carries_contract else _from_state_dict(ckpt, spec)
    spec = replace(spec, weights=str(path))
    if not carries_contract:
        check_contract_complete(spec)
    check_normalization(spec)
    return FrozenTeacher(net, validate_contract(net, spec))


def check_teacher_fits_data(teacher: FrozenTeacher, task: TaskSpec, resize: bool = False) -> bool:
    """Check a teacher's contract against a task (:class:`cvlab.task.TaskSpec`: classes, channels, image size)
    before any batch runs; one line naming what to change. Returns whether the task's images are resized to
    the teacher's size (allowed only with ``resize``)."""
    spec = teacher.spec
    check_task(f"teacher {spec.weights}", task, hint="its contract was checked against its network at import, so "
               "give it data with {key} {model} (the task it was trained for)",
               in_channels=spec.in_channels, num_classes=spec.num_classes)
    size = task.image_size
    if size is None or spec.image_size is None or size == spec.image_size:
        return False
    if not resize:
        raise TaskMismatchError(f"teacher {spec.weights} takes {spec.image_size}x{spec.image_size} images but "
                                f"{task.name or 'the data'} gives {size}x{size}; set --data.init_args.image_size "
                                f"{spec.image_size}, or let the teacher resize them with --model.init_args.resize true")
    return True


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
    if d["normalization"] is None:  # (absent before the key existed: old shard folders keep their fingerprint)
        d.pop("normalization")
    return d


__all__ = ["FrozenTeacher", "TeacherArg", "TeacherLoadError", "TeacherSpec", "as_spec", "check_contract_complete",
           "check_normalization", "check_teacher_fits_data", "export_torchscript", "find_state_dict", "is_torchscript",
           "load_teacher", "load_weights", "read_checkpoint", "rename_keys", "shape_from_teacher",
           "teacher_file_digest",
           "unwrap_keys", "validate_contract"]
