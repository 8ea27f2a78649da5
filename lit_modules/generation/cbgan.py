"""CBGAN: an unconditional GAN with the class-balancing regulariser (Rangwani, Mopuri, Babu, "Class
Balancing GAN with a Classifier in the Loop", UAI 2021, https://arxiv.org/abs/2106.09402).

One training step is one discriminator step on a real batch; every ``n_dis``-th step is also a generator
step (``global_step`` counts generator steps, so ``trainer.max_steps`` is the paper's "100k steps")::

    D step:  x_f = G(z);            L_D = loss_D(D(x_r), D(x_f))                               (Adam)
    G step:  x_f = G(z');           L_G = loss_G(D(x_f)[, D(x_r)]) + lambda sum_k w_k pbar_k log pbar_k
             pbar = mean_b softmax(C(x_f))   (C: the frozen classifier, trained on the long-tailed data)
             n_k += #{b : argmax C(x_f)_b = k};  every T G steps  N_k <- max(alpha N_k + (1 - alpha) n_k, 1)
             w = (1/N) / sum(1/N) * K                        (lit_modules.generation.class_balance)
             G_ema <- copy of G before ``ema_start``, then ema_decay G_ema + (1 - ema_decay) G

``lambda = 0`` (or no classifier) is the same GAN without the regulariser (the baseline); the classifier
then still measures the samples.

**Evaluation** (validation and test, on the EMA generator in eval mode): ``validation_step`` / ``test_step``
generate one batch per real batch and return it as ``{"fake": images}``; the measuring (class histogram and its KL
to uniform, domain FID, Inception FID / KID) is the callback :class:`~lit_modules.generation.GenerationEvaluation`,
wired under ``trainer.callbacks`` in every CBGAN config. Sample grids are logged as images (``cbgan/samples``).

**Distributed.** ``batch_size`` is per device. Gradients are taken with ``torch.autograd.grad`` on the
unwrapped G and D and averaged over devices explicitly (:mod:`lit_modules.generation.gan_losses`): DDP's
reducer never sees a backward, so the player not being trained is never an "unused parameter"; the
regulariser uses the global batch's ``pbar`` (all-reduced) and the argmax counts are summed over devices,
so the class-balance state is identical on every device. A generator step on 2 processes equals one
process on the global batch for ``ns`` / ``hinge`` / ``relativistic`` (paired) without BatchNorm in G (tested);
``relativistic_average``'s batch means and G's BatchNorm statistics are per device.

**Resume.** G, D, G_ema, both Adam states, the effective and pending counts and the step counters are in
the checkpoint; latents are drawn from generators seeded by (seed, rank, step), so a run resumed from
``last.ckpt`` continues as if uninterrupted (tested).
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar, Literal

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor

from cvlab.distributed import all_reduce_mean, no_reduce
from cvlab.errors import CvlabError
from cvlab.image_log import log_image_grid
from cvlab.task import check_task, task_of
from lit_modules.generation.class_balance import ClassBalanceState, class_balance_loss, hard_counts
from lit_modules.generation.evaluation import MOVED_TO_CALLBACK, histogram_image, moved_argument_line
from lit_modules.generation.gan_losses import (
    GAN_LOSSES,
    GanLoss,
    discriminator_gradients,
    ema_update,
    generator_gradients,
    set_grads,
    trainable,
)
from lit_modules.nets import NetSpec, create_discriminator, create_generator
from lit_modules.teacher import TeacherArg, load_teacher

Stage = Literal["val", "test"]


def _seed(*keys: int) -> int:
    h = 0x9E3779B97F4A7C15
    for k in keys:
        h = (h ^ (int(k) + 0x632BE59BD9B4E019 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFF
    return h


class ClassBalancingGAN(L.LightningModule):
    """An unconditional GAN (SNDCGAN or SNGAN-ResNet) with CBGAN's class-balancing regulariser.

    Args:
        classifier: the frozen classifier in the loop: any cvlab teacher (a checkpoint / TorchScript path or
            a :class:`~lit_modules.teacher.TeacherSpec` mapping); its classes must be the data's. ``None``: no
            regulariser and no class metrics.
        reg_weight: lambda (10 / 7.5 / 5 for CIFAR-10-LT imbalance 100 / 10 / 1); 0: the plain GAN.
        alpha, update_every, initial_count: the effective-count update (0.5, 2000, 50).
        initial_pending_count: the first period's starting argmax counts, every class (512: the public code's
            ``init_size``; 0: none).
        generator, discriminator: a registered name (``sndcgan``, ``resnet_gan``) or ``{class_path, init_args}``.
        generator_kwargs, discriminator_kwargs: e.g. ``{width: 32}``, ``{norm: none}``.
        latent_dim: z (128).
        in_channels, image_size: the images (checked against the datamodule).
        loss: ``relativistic`` (the paper's: the *paired* relativistic GAN of the public code, ``adv_loss: "rel"``),
            ``relativistic_average``, ``ns`` or ``hinge`` (:mod:`lit_modules.generation.gan_losses`). Checkpoints
            and configs written before issue 40 that say ``relativistic`` were trained with the average form
            (then the only one); they now load and rerun with the paired form.
        n_dis: discriminator steps per generator step.
        lr_g, lr_d, betas: Adam (2e-4, 2e-4, (0.5, 0.999)).
        ema_decay, ema_start: generator EMA (0.9999 from generator step 20k).
        image_every_n_epochs: sample grids during training.
        seed: seeds every latent draw.

    The evaluation's settings (``inception_path``, ``inception_fid_on``, ``kid_subset_size``,
    ``inception_batches``) are :class:`~lit_modules.generation.GenerationEvaluation`'s; ``moved_args`` gives the
    CLI its one line for a config that still sets them here.
    """

    moved_args: ClassVar[dict[str, str]] = {
        name: moved_argument_line(name, "ClassBalancingGAN") for name in MOVED_TO_CALLBACK}

    def __init__(
        self,
        classifier: TeacherArg | None = None,
        reg_weight: float = 10.0,
        alpha: float = 0.5,
        update_every: int = 2000,
        initial_count: float = 50.0,
        initial_pending_count: float = 512.0,
        generator: NetSpec = "sndcgan",
        generator_kwargs: dict[str, Any] | None = None,
        discriminator: NetSpec = "sndcgan",
        discriminator_kwargs: dict[str, Any] | None = None,
        latent_dim: int = 128,
        in_channels: int = 3,
        image_size: int = 32,
        loss: GanLoss = "relativistic",
        n_dis: int = 1,
        lr_g: float = 2e-4,
        lr_d: float = 2e-4,
        betas: tuple[float, float] = (0.5, 0.999),
        ema_decay: float = 0.9999,
        ema_start: int = 20000,
        image_every_n_epochs: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        if loss not in GAN_LOSSES:
            raise CvlabError(f"loss must be one of {', '.join(GAN_LOSSES)}; got {loss!r}")
        if n_dis < 1 or not 0.0 <= ema_decay < 1.0 or reg_weight < 0:
            raise CvlabError(f"need n_dis >= 1, 0 <= ema_decay < 1 and reg_weight >= 0; got {n_dis}, {ema_decay}, "
                             f"{reg_weight}")
        if reg_weight > 0 and classifier is None:
            raise CvlabError("the class-balancing regulariser (reg_weight > 0) needs a classifier: set "
                             "--model.init_args.classifier to a cvlab checkpoint trained on the long-tailed data, "
                             "or reg_weight 0 for the plain GAN")
        self.generator = create_generator(generator, latent_dim=latent_dim, out_channels=in_channels,
                                          image_size=image_size, **(generator_kwargs or {}))
        self.discriminator = create_discriminator(discriminator, in_channels=in_channels, image_size=image_size,
                                                  **(discriminator_kwargs or {}))
        self.generator_ema = copy.deepcopy(self.generator).requires_grad_(False)
        self.register_buffer("d_steps", torch.zeros((), dtype=torch.long))
        self.classifier = None
        self.num_classes: int | None = None
        if classifier is not None:
            self.classifier = load_teacher(classifier)
            self.num_classes = self._classifier_classes()
            self.class_balance = ClassBalanceState(self.num_classes, alpha, update_every, initial_count,
                                                   initial_pending_count)
        self._reduce = no_reduce
        self._samples: Tensor | None = None

    def _classifier_classes(self) -> int:
        hp = self.hparams
        try:
            with torch.no_grad():
                return int(self.classifier(torch.zeros(2, hp.in_channels, hp.image_size, hp.image_size)).shape[-1])
        except RuntimeError as e:
            raise CvlabError(f"the classifier {self.classifier.spec.weights} cannot take "
                             f"{hp.in_channels}x{hp.image_size}x{hp.image_size} images "
                             f"({str(e).splitlines()[0]})") from None

    def setup(self, stage: str) -> None:
        self._reduce = all_reduce_mean if self.trainer.world_size > 1 else no_reduce
        task = task_of(self._trainer)
        if task is None:
            return
        hp = self.hparams
        check_task("the GAN", task, in_channels=hp.in_channels, image_size=hp.image_size)
        check_task(f"the classifier {self.classifier.spec.weights}", task, "give a classifier trained on this data",
                   num_classes=self.num_classes)

    # --- the algorithm ------------------------------------------------------------------------------
    def latent(self, n: int, *keys: int) -> Tensor:
        """``(n, latent_dim)`` standard normal drawn from a generator seeded by (seed, rank, *keys)."""
        g = torch.Generator(device=self.device).manual_seed(_seed(self.hparams.seed, self.global_rank, *keys))
        return torch.randn(n, self.hparams.latent_dim, generator=g, device=self.device)

    def regularizer(self, x_fake: Tensor) -> Tensor:
        """``lambda * sum_k w_k pbar_k log pbar_k`` on the global batch; counts this step's argmax classes."""
        logits = self.classifier(x_fake)  # (B, K); frozen, gradients flow to the images
        probs = logits.softmax(-1)
        counts = hard_counts(logits.detach(), self.num_classes)  # (K,)
        pbar = probs.mean(0).detach()
        global_pbar = None
        if self.trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)  # summed over devices: the same state everywhere
            global_pbar = all_reduce_mean([pbar])[0]
        self._step_counts = counts
        return self.hparams.reg_weight * class_balance_loss(probs, self.class_balance.weights(), global_pbar)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        hp = self.hparams
        opt_g, opt_d = self.optimizers()
        x_real = batch[0]
        b, d_step = x_real.shape[0], int(self.d_steps)
        # discriminator step
        with torch.no_grad():
            x_fake = self.generator(self.latent(b, d_step, 0))
        d_loss, d_grads = discriminator_gradients(self.discriminator, x_real, x_fake, hp.loss, self._reduce)
        set_grads(trainable(self.discriminator), d_grads)
        opt_d.optimizer.step()  # the raw optimizer: global_step counts generator steps
        opt_d.optimizer.zero_grad(set_to_none=True)
        self.d_steps += 1
        self.log("train/d_loss", d_loss, prog_bar=True)
        if (d_step + 1) % hp.n_dis:
            return {"loss": d_loss}
        # generator step
        regularize = hp.reg_weight > 0 and self.classifier is not None
        self.discriminator.requires_grad_(False)
        try:
            g_adv, reg, g_grads, x_fake = generator_gradients(
                self.generator, self.discriminator, self.latent(b, d_step, 1), x_real, hp.loss,
                self.regularizer if regularize else None, self._reduce)
        finally:
            self.discriminator.requires_grad_(True)
        set_grads(trainable(self.generator), g_grads)
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        ema_update(self.generator_ema, self.generator, hp.ema_decay if self.global_step > hp.ema_start else 0.0)
        if regularize:
            self.class_balance.observe(self._step_counts)
            self.log("train/reg", reg)
        self._samples = x_fake
        self.log("train/g_loss", g_adv, prog_bar=True)
        return {"loss": d_loss + g_adv}

    def on_train_epoch_end(self) -> None:
        if self.current_epoch % self.hparams.image_every_n_epochs == 0 and self._samples is not None:
            self._log_samples("cbgan/train_samples", self._samples)

    # --- evaluation -----------------------------------------------------------------------------------
    def _eval_step(self, stage: Stage, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """One generated batch per real batch, for :class:`~lit_modules.generation.GenerationEvaluation`."""
        x_fake = self.generator_ema(self.latent(batch[0].shape[0], batch_idx, 2 if stage == "val" else 3))
        if batch_idx == 0:
            self._eval_samples = x_fake
        return {"fake": x_fake}

    def _eval_epoch_end(self, stage: Stage) -> None:
        if not self.trainer.sanity_checking and getattr(self, "_eval_samples", None) is not None:
            self._log_samples(f"cbgan/{stage}_samples", self._eval_samples)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return self._eval_step("val", batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return self._eval_step("test", batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    @torch.no_grad()
    def _log_samples(self, key: str, x: Tensor) -> None:
        if not self.trainer.is_global_zero:
            return
        x = x[:100].float()
        caption = "EMA generator"
        if self.classifier is not None:
            x = x[torch.argsort(self.classifier(x).argmax(-1), stable=True)]
            caption += ", sorted by the classifier's class"
        log_image_grid(self.trainer, key, x.clamp(0, 1), nrow=10, step=self.global_step, caption=caption)

    def configure_optimizers(self):
        hp = self.hparams
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=hp.lr_g, betas=tuple(hp.betas))
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=hp.lr_d, betas=tuple(hp.betas))
        return [opt_g, opt_d]



__all__ = ["ClassBalancingGAN", "histogram_image"]  # histogram_image: its old home, one release
