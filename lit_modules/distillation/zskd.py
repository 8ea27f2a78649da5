"""Data Impression synthesis stage (``cvlab predict``): optimise inputs so the frozen teacher outputs
sampled Dirichlet soft labels.

"Zero-Shot Knowledge Distillation in Deep Networks", Nayak, Mopuri, Shaj, Babu, Chakraborty, ICML 2019
(arXiv 1905.08114), Algorithm 1: for each target ``y ~ Dir(alpha_k)`` (see
:mod:`lit_modules.distillation.data_impressions`), start from noise and minimise ``CE(y, softmax(T(x) / tau))``
(tau = 20, Adam, 1500 iterations, batches of 100). Also the generator of "Data Impressions", TPAMI 2022.

The datamodule (:class:`datamodules.transfer_sets.ImpressionTargets`) hands out impression indices;
Lightning shards them over devices. Every batch is one optimisation of ``B`` independent inputs: the
loss is the *sum* of per-impression losses and Adam is element-wise, so each impression follows the
same path as if it were optimised alone (the benchmark compares with a per-class loop). Each index's
target and starting noise depend on ``(seed, index)`` only, so a resumed or multi-device run gives the
same impressions as one uninterrupted run. :class:`cvlab.artifacts.ShardWriter` stores them (pixel space).

Any teacher works (:func:`lit_modules.teacher.load_teacher`): the impressions have the teacher's own
input shape, and each is parametrised in the teacher's normalised input space ``u = (x - mean) / std``
(the teacher's own statistics), where the recipes' learning rate, N(0, 1) start and L2 / TV penalties
are defined; the stored image is the pixel image ``x = u * std + mean``.

Departure (the TF-port recipe, ``init: gaussian`` with ``pixel_l2``): the N(0, 1) start and the L2
penalty taken from a public TF port act here in the teacher's *normalised* input space. In pixels the
start is therefore N(mean, std^2) per channel (MNIST: N(0.13, 0.31^2)), not N(0, 1), and the penalty
pulls the impressions towards the teacher's mean image, not towards black.
The "pixel" in ``pixel_l2`` / ``pixel_tv`` names the per-pixel penalty, not the space.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch import Tensor

from cvlab.artifacts import all_shards_on_rank_zero, check_manifest, merge_metrics, shard_folder, with_shard_writer
from cvlab.image_log import log_image_grid
from cvlab.seeding import mix_seed
from cvlab.task import check_task, task_of
from lit_modules.distillation.data_impressions import (
    Renormalize,
    class_similarity,
    dirichlet_targets,
    final_linear,
    total_variation,
)
from lit_modules.distillation.kd_loss import soft_cross_entropy
from lit_modules.teacher import TeacherArg, load_teacher, teacher_file_digest


def initial_images(indices: Tensor, shape: Sequence[int], init: str, seed: int) -> Tensor:
    """Starting points ``(B, *shape)`` on CPU, each drawn from a generator seeded by ``(seed, index)``:
    ``uniform`` U(0, 1) pixels, ``gaussian`` N(0, 1) in the normalised space (returned as-is)."""
    out = torch.empty(len(indices), *shape)
    for row, i in enumerate(indices.tolist()):  # set-up only, outside the optimisation
        g = torch.Generator().manual_seed(mix_seed(seed, i))
        if init == "uniform":
            out[row].uniform_(0, 1, generator=g)
        else:
            out[row].normal_(0, 1, generator=g)
    return out


def synthesize(teacher: torch.nn.Module, x0: Tensor, targets: Tensor, iterations: int, lr: float,
               temperature: float, progress=None, pixel_l2: float = 0.0,
               pixel_tv: float = 0.0) -> tuple[Tensor, Tensor]:
    """Optimise ``x0 (B, C, H, W)`` (the teacher's normalised input space: ``teacher`` maps it to logits,
    e.g. :meth:`FrozenTeacher.forward_normalized`) towards ``targets (B, K)``.

    Each impression minimises ``CE(y, softmax(T(x) / tau)) + pixel_l2 / 2 * ||x||^2 + pixel_tv * TV(x)``
    (neither penalty is in the paper; a public TF port adds the L2 one with weight 1e-3; ``TV`` is
    :func:`lit_modules.distillation.data_impressions.total_variation`). Returns ``(x, CE (B,))`` after
    ``iterations`` Adam steps. No host sync inside the loop.
    """
    x = x0.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    with torch.enable_grad():
        for it in range(iterations):
            opt.zero_grad(set_to_none=True)
            # an enclosing torch.autocast (cache on, its default) would keep x's first bf16 copy: the
            # teacher would see the starting images at every step. Lightning's own autocast has no cache.
            torch.clear_autocast_cache()
            loss = soft_cross_entropy(teacher(x), targets, temperature).sum()  # sum: independent per impression
            if pixel_l2:
                loss = loss + 0.5 * pixel_l2 * x.square().sum()
            if pixel_tv:
                loss = loss + pixel_tv * total_variation(x).sum()
            loss.backward()
            opt.step()
            if progress is not None:
                progress(it + 1)
        with torch.no_grad():
            loss = soft_cross_entropy(teacher(x), targets, temperature)
    return x.detach(), loss


class DataImpressionSynthesizer(L.LightningModule):
    """The synthesis stage; its arguments are the config (defaults: the paper's).

    Args:
        teacher: the frozen teacher: a cvlab checkpoint or TorchScript path, or a
            :class:`lit_modules.teacher.TeacherSpec` (weights, architecture, input contract, key map).
        temperature: tau of the impression objective (20).
        iterations: Adam steps per impression (1500).
        lr: Adam learning rate (paper 1e-3; a third-party PyTorch port uses 1e-2).
        init: ``uniform`` (U(0, 1) pixels, the paper) or ``gaussian`` (N(0, 1) in normalised space).
        betas, beta_split: Dirichlet scales and the share of impressions per scale (paper: 1.0 and 0.1, half each).
        renormalize: ``paper`` or ``public_code`` (min-max after scaling, which cancels beta; see
            :func:`lit_modules.distillation.data_impressions.concentration`).
        pixel_l2: weight of an L2 penalty ``pixel_l2 / 2 * ||u||^2`` on each impression ``u`` in the
            teacher's *normalised* input space (it pulls towards the mean image, not towards 0 pixels);
            not in the paper, a public TF port uses 1e-3 (with Adam lr 3.0). 0: off.
        pixel_tv: weight of a smoothness prior ``pixel_tv * TV(u)``, the squared differences of
            neighbouring pixels in the normalised space; not in the paper. 0: off.
        clip: store the impressions clipped to the pixel range [0, 1], as the public codes do when they
            save them as 8-bit images; the reported synthesis CE (``loss``) and the teacher's agreement
            are then both measured on the clipped, stored images.
        seed: seeds the targets and every impression's starting noise.
        grid_per_class: impressions per class in the logged grid (one row per class).
    """

    def __init__(
        self,
        teacher: TeacherArg,
        temperature: float = 20.0,
        iterations: int = 1500,
        lr: float = 1e-3,
        init: Literal["uniform", "gaussian"] = "uniform",
        betas: list[float] = [1.0, 0.1],  # noqa: B006  (a CLI default, never mutated)
        beta_split: list[float] = [0.5, 0.5],  # noqa: B006
        renormalize: Renormalize = "paper",
        pixel_l2: float = 0.0,
        clip: bool = False,
        pixel_tv: float = 0.0,
        seed: int = 0,
        grid_per_class: int = 10,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.teacher = load_teacher(teacher)
        self.similarity = class_similarity(final_linear(self.teacher).weight)  # (K, K), fails early without one
        self._t0, self._summarized = 0.0, False

    def configure_callbacks(self) -> list[L.Callback]:
        return with_shard_writer(self._trainer)

    def setup(self, stage: str) -> None:
        if stage != "predict":
            return
        dm, hp = self.trainer.datamodule, self.hparams
        check_task(f"teacher {hp.teacher}", task_of(self.trainer), "use the teacher trained on that task",
                   num_classes=self.similarity.shape[0], in_channels=self.teacher.spec.in_channels)
        targets, classes, betas = dirichlet_targets(self.similarity, dm.num_impressions, hp.betas, hp.beta_split,
                                                    hp.renormalize, hp.seed)
        self.register_buffer("targets", targets, persistent=False)  # (N, K), moved to the device with the module
        self.classes, self.betas = classes, betas
        if self.trainer.is_global_zero:  # a shard folder holds the impressions of one config only
            fp = {f"model.{k}": v for k, v in hp.items() if k not in ("grid_per_class", "teacher")}
            fp.update({f"model.teacher.{k}": v for k, v in teacher_file_digest(self.teacher.spec).items()})
            fp["model.impression_shape"] = list(self.impression_shape)
            check_manifest(shard_folder(self.trainer), {**fp, **dm.fingerprint()})
        self.trainer.strategy.barrier()

    @property
    def impression_shape(self) -> tuple[int, int, int]:
        """The teacher's input shape (its contract), else the task's."""
        return self.teacher.input_shape or tuple(task_of(self.trainer).input_shape)

    def on_predict_start(self) -> None:
        self._t0 = time.perf_counter()

    def predict_step(self, index: Tensor, batch_idx: int) -> dict[str, Tensor]:
        hp, norm = self.hparams, self.teacher.normalization
        with torch.inference_mode(False):  # also works under Trainer(inference_mode=True)
            index = index.clone()  # (B,)
            u0 = initial_images(index, self.impression_shape, hp.init, hp.seed).to(self.device)  # (B, C, H, W)
            if hp.init == "uniform":
                u0 = norm(u0)  # pixels -> the teacher's normalised input space
            y = self.targets[index]  # (B, K)
            u, loss = synthesize(self.teacher.forward_normalized, u0, y, hp.iterations, hp.lr, hp.temperature,
                                 self._progress(hp.iterations), pixel_l2=hp.pixel_l2, pixel_tv=hp.pixel_tv)
            image = norm.inverse(u).float()  # pixel space, as stored
            with torch.no_grad():
                if hp.clip:  # CE and agreement describe the stored (clipped) images
                    image = image.clamp(0, 1)
                    u = norm(image)
                    loss = soft_cross_entropy(self.teacher.forward_normalized(u), y, hp.temperature)
                start = soft_cross_entropy(self.teacher.forward_normalized(u0), y, hp.temperature)
                pred = self.teacher.forward_normalized(u).argmax(-1)
        cpu = index.cpu()
        return {"index": index, "image": image, "target": y, "class": self.classes[cpu],
                "beta": self.betas[cpu], "loss_start": start, "loss": loss, "teacher_pred": pred}

    def _progress(self, n: int):
        if not self.trainer.is_global_zero or self.trainer.progress_bar_callback is None:
            return None
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="DI iterations (this batch)", leave=False, dynamic_ncols=True)
        every = max(1, n // 100)

        def update(it: int) -> None:
            if it % every == 0 or it == n:
                bar.n = it
                bar.refresh()
            if it == n:
                bar.close()

        return update

    def on_predict_end(self) -> None:
        self._summarize(wall=time.perf_counter() - self._t0)

    def teardown(self, stage: str) -> None:
        # a resumed run whose shards are all written has no batches: Lightning skips the predict loop
        # and its hooks, so summarise (metrics, grid) here; the earlier run's wall time is kept
        if stage == "predict" and not self._summarized and getattr(self, "targets", None) is not None:
            self._summarize(wall=None)

    def _summarize(self, wall: float | None) -> None:
        self._summarized = True
        r = all_shards_on_rank_zero(self.trainer)
        if r is None:
            return
        n = r["index"].numel()
        metrics = {
            "synthesis/num_impressions": float(n),
            "synthesis/loss_start_mean": r["loss_start"].mean().item(),
            "synthesis/loss_mean": r["loss"].mean().item(),
            "synthesis/teacher_agrees_with_target": (r["teacher_pred"] == r["target"].argmax(-1)).float().mean().item(),
            # smoothness of the stored images (pixel space), per impression
            "synthesis/total_variation_mean": total_variation(r["image"].float()).mean().item(),
        }
        if wall is not None:
            metrics["synthesis/wall_s"] = wall
        merge_metrics(Path(self.trainer.default_root_dir) / "metrics.json", metrics)
        k, per = self.similarity.shape[0], self.hparams.grid_per_class
        order = r["class"].argsort(stable=True)  # grouped by class, in index order
        counts = torch.bincount(r["class"], minlength=k)
        rank = torch.arange(n) - (counts.cumsum(0) - counts)[r["class"][order]]
        pick = order[rank < per]  # up to `per` impressions of each class, one row per class
        log_image_grid(self.trainer, "synthesis/impressions_per_class", r["image"][pick], nrow=per)
