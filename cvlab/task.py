"""The data contract: what a task's data are, published by every datamodule and checked by every system.

A datamodule publishes one :class:`TaskSpec` (its ``task_spec`` property): classes (and their names), channels,
image size and the normalisation statistics a network trained on it uses. A system reads what its data are from
that spec alone, through :func:`task_of` (the spec of the trainer's datamodule, or ``None`` when the module runs
without one) and :func:`check_task` (one line naming the key and both values on a mismatch).

Ground floor: imports nothing of cvlab but the errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cvlab.errors import CvlabError


class TaskMismatchError(CvlabError):
    """A system and its data disagree on the task (classes, channels, image size)."""


@dataclass(frozen=True)
class TaskSpec:
    """What a task's images and labels are.

    ``image_size`` is ``None`` where images keep their own size; ``mean``/``std`` are per channel, the statistics a
    network trained on the task normalises with (``None``: the data prescribe none); ``train_class_counts`` are the
    training images per class once the data are set up (empty before, or where unknown)."""

    num_classes: int
    in_channels: int
    image_size: int | None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    class_names: tuple[str, ...] = ()
    name: str = ""
    train_class_counts: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_classes < 1 or self.in_channels < 1:
            raise CvlabError(f"task {self.name}: num_classes and in_channels must be >= 1, "
                             f"got {self.num_classes} and {self.in_channels}")
        for key in ("mean", "std"):
            v = getattr(self, key)
            if v is not None and len(v) != self.in_channels:
                raise CvlabError(f"task {self.name}: {key} has {len(v)} values for {self.in_channels} channels")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise CvlabError(f"task {self.name}: {len(self.class_names)} class names for {self.num_classes} classes")

    @property
    def input_shape(self) -> tuple[int, int, int] | None:
        """``(C, H, W)`` of an image, or ``None`` when the images keep their own size."""
        return None if self.image_size is None else (self.in_channels, self.image_size, self.image_size)


def task_spec(datamodule: Any) -> TaskSpec:
    """The spec a datamodule publishes; one line when it publishes none."""
    spec = getattr(type(datamodule), "task_spec", None)
    spec = datamodule.task_spec if spec is not None else None
    if not isinstance(spec, TaskSpec):
        raise CvlabError(f"{type(datamodule).__name__} publishes no task spec: a cvlab datamodule has a "
                         "`task_spec` property returning cvlab.task.TaskSpec")
    return spec


def task_of(trainer: Any) -> TaskSpec | None:
    """The spec of the trainer's datamodule; ``None`` when there is no trainer or no datamodule (a module used
    on its own, e.g. in a test or a notebook)."""
    dm = getattr(trainer, "datamodule", None) if trainer is not None else None
    return None if dm is None else task_spec(dm)


def check_task(owner: str, spec: TaskSpec, hint: str = "set --model.init_args.{key} to {data}", **expected: Any
               ) -> TaskSpec:
    """Check the keys a system needs against the spec (``None`` skips a key); a mismatch is one line naming the
    owner, the key and both values, with ``hint`` (formatted with ``key``, ``model`` and ``data``)."""
    for key, want in expected.items():
        if want is None:
            continue
        have = getattr(spec, key)
        if have is not None and have != want:
            raise TaskMismatchError(f"{owner} and the data disagree on {key}: {want} vs {have} ({spec.name}); "
                                    + hint.format(key=key, model=want, data=have))
    return spec
