"""Adversarial data-free KD with LRA's meta-learned student update.

Patel, Mopuri, Qiu, "Learning to Retain while Acquiring: Combating Distribution-Shift in Adversarial
Data-Free Knowledge Distillation", CVPR 2023 (https://arxiv.org/abs/2302.14290). A generator makes the
transfer data; the teacher is frozen; the student imitates it. One training step of this module is one
iteration of the paper's loop (and of its public code)::

    generate:  x = G(z), z ~ N(0, I)                          # batch_size images, latent_dim 1000
    G step:    L_G = 1 * one_hot(T(x)) + 5 * class_balance(T(x)) + 0.1 * activation(T(x))
                     + 1 * (1 - JS(S(x), T(x)))                # seek teacher-student disagreement; Adam 0.02
    repeat student_steps (10) times, each on a fresh batch x_new = G(z) (no gradient to G):
        x_mem = one random slot of the memory (empty at the start: plain KD)
        meta = second_order | first_order:  acquire on x_new (one inner SGD step, lr 0.9) -> theta',
                  retain on x_mem at theta', plus KD(theta) on [x_new; x_mem]      (lit_modules.distillation.lra_update)
        meta = none:  KD(theta) on [x_new; x_mem]   (the adversarial DFKD baseline with replay)
        SGD step of the student (lr 0.1, momentum 0.9, wd 5e-4, cosine over all generator steps)

The student loss is L1 between logits. ``memory_slots: 0`` turns the memory off (plain adversarial
DFKD without replay; then ``meta`` must be ``none``).

**Epochs and steps.** An epoch is ``steps_per_epoch`` generator steps of the datamodule
(:class:`datamodules.data_free.DataFreeDataModule`; LRA's code: 72 at batch 512), each followed by
``student_steps`` student steps. ``trainer.global_step`` counts generator steps (``max_steps`` is in
generator steps; the student's optimizer steps are not counted). The memory receives
``memory_per_push`` images of the last generated batch at the end of every
``memory_push_every_n_epochs``-th epoch (epochs 0, 5, 10, ... as the public code), into a cyclic buffer
of ``memory_slots`` slots; a student step replays one slot chosen at random.

**Generative replay** (``replay: generator``, the paper's second memory variant, as its public code
builds it): in place of the buffer, a *memory generator* (a second DAFL generator, Adam at
``generator_lr / 40``) and an encoder (:class:`lit_modules.nets.LatentEncoder`) are trained as an
auto-encoder of the generated images during the first ``memory_generator_updates`` (4) student steps of
every generator step: target = [first half of the new batch; the current memory samples], loss = L1 on
the images + L1 on the teacher's logits + 1e-5 KL (:func:`lit_modules.distillation.lra_losses.reconstruction_loss`).
A student step's memory samples are ``memory_per_push`` images of the memory generator (eval mode) at
latents refined by one fresh-Adam step (lr ``generator_lr``) towards confident, class-balanced teacher
outputs and the N(0, I) batch statistics. Before its first update the memory is empty (plain KD).
Differences from the public code: the student's memory samples of a step are also the memory part of
that step's auto-encoder target (the public code draws a second set in train mode), and the encoder's
input is not L2-normalised along the image height.

**Retention.** Each validation (``val_check_interval``, by default once per epoch) measures the student's
accuracy on the validation split of the teacher's task (real images held out of its training set; the
test split is evaluated once, after fit, on the final weights): ``val/acc`` is the accuracy curve over
generator steps; ``retention/best_acc`` is its maximum (a validation figure, never a test one);
``retention/drops`` counts the evaluations where it fell and ``retention/drop_total`` sums the falls
(accuracy as a fraction, so 0.012 = 1.2 points); ``retention/max_drop`` is the largest
(:func:`lit_modules.distillation.lra_retention.accuracy_drops`).

**Retention probe** (the paper's claim: the student forgets less of what it learned from earlier generator
distributions). At the end of each epoch in ``probe_epochs`` the first ``probe_size`` images of the last generated
batch are kept with the teacher's labels on them (:class:`lit_modules.distillation.lra_retention.RetentionProbe`);
each validation then logs the student's agreement with those labels on every probe taken so far:
``retention/probe_acc`` (the mean over probes), ``retention/probe_acc/e<epoch>`` (each probe),
``retention/probe_forgetting`` (the mean fall of each probe from its best so far), ``retention/probe_drops`` and
``retention/probe_drop_total`` (the drops of the probes' curves, summed over probes). Each arm's probe is its own
generator's batches, so the measure is what this run forgets of what it was taught. The curves are written to
``<run>/retention_curve.json`` and drawn as ``retention/curve`` (validation and mean probe accuracy against
generator steps). Generated images (sorted by the teacher's class) are logged as ``lra/generated`` grids.

**Distributed.** ``batch_size`` and ``memory_per_push`` are per device. Every gradient is taken with
``torch.autograd.grad`` on explicit tensors of the unwrapped networks (``torch.func.functional_call`` for
the student), never through the DDP wrapper, and averaged across ranks explicitly; the student update is
then the one of one process on the global batch (tested). The memory holds the pushes of all ranks
(``all_gather``), so it is identical everywhere and rank 0's checkpoint restores it for every rank. As
with DDP's BatchNorm, the generator's BatchNorm and the class-balance term see each rank's batch.

**Resume.** The memory (content, fill count, next position), the accuracy curve and the drop counts
are stored in the checkpoint; every random draw (latents, memory slot) is seeded by ``(seed, rank,
generator step, student step)``, so a run resumed from ``last.ckpt`` continues as if uninterrupted.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from cvlab.artifacts import atomic_write_json
from cvlab.distributed import Reduce, all_reduce_mean, no_reduce
from cvlab.errors import CvlabError
from cvlab.image_log import log_image_grid
from cvlab.seeding import fold_seed
from cvlab.task import task_of
from lit_modules.distillation.lra_losses import (
    GeneratorLossWeights,
    adam_first_step,
    class_balance_loss,
    generator_loss,
    latent_prior_loss,
    one_hot_loss,
    reconstruction_loss,
)
from lit_modules.distillation.lra_memory import CyclicMemory
from lit_modules.distillation.lra_retention import (
    RetentionProbe,
    accuracy_drops,
    probe_accuracy,
    probe_forgetting,
    retention_figure,
)
from lit_modules.distillation.lra_update import MetaMode, student_gradients
from lit_modules.distillation.student import (
    ImageSizeMismatchError,
    Student,
    create_student_net,
    legacy_fields,
    teacher_handshake,
)
from lit_modules.nets import InputNormalization, LatentEncoder, NetSpec, create_generator
from lit_modules.optim import ScheduleName, build_optimizer, build_schedule
from lit_modules.teacher import TeacherArg, load_teacher

__all__ = ["LRA", "AdversarialKD", "ImageSizeMismatchError"]


#: the flat arguments that ``generator_loss`` groups (old checkpoints still carry them)
LEGACY_GENERATOR_LOSS = {"weight_one_hot": "one_hot", "weight_balance": "balance", "weight_activation": "activation",
                         "weight_disagreement": "disagreement"}


class LRA(Student):
    """Adversarial data-free KD with the LRA student update (see the module docstring; the student's network,
    normalisation and evaluation: :class:`lit_modules.distillation.student.Student`).

    Args:
        teacher: the teacher: a cvlab checkpoint or TorchScript path, or a
            :class:`lit_modules.teacher.TeacherSpec` (weights, architecture, input contract, key map). With
            ``generator_loss.activation > 0`` it must expose penultimate features (not TorchScript).
        arch, arch_kwargs: the student (LRA: ``lenet5_half`` for MNIST/FMNIST, ``resnet18`` for CIFAR/SVHN), a
            zoo name or ``{class_path: ..., init_args: ...}``.
        num_classes, in_channels, image_size: the generator makes ``in_channels x image_size^2`` images for the
            teacher and the student; ``None`` takes the teacher's (its contract). The datamodule must hold
            images of that shape.
        mean, std: the student's input normalisation; ``None``: the datamodule's statistics.
        meta: ``second_order`` (LRA), ``first_order`` (no Hessian term, cheaper) or ``none`` (baseline).
        batch_size: generated images per step and device (512).
        student_steps: student steps per generator step (10).
        generator, latent_dim, generator_kwargs: the generator by name (``dafl``), its z size (1000) and
            keyword arguments (:class:`lit_modules.nets.generator.DAFLGenerator`).
        lr, momentum, weight_decay, lr_schedule: the student's SGD (0.1, 0.9, 5e-4, cosine).
        generator_lr: Adam learning rate of the generator (0.02).
        inner_lr, inner_weight_decay: the acquisition step (0.9; 5e-4 as the public code's inner SGD).
        retain_weight: weight of the retention term in the meta objective (1.0 in the paper; see lra_update).
        generator_loss: the generator loss weights ``{one_hot, balance, activation, disagreement}`` (1, 5, 0.1, 1;
            :class:`lit_modules.distillation.lra_losses.GeneratorLossWeights`), e.g.
            ``--model.init_args.generator_loss.activation=0``; ``js_temperature``: temperature of the disagreement
            term (3).
        memory_slots: slots of the cyclic memory (10; 0 disables memory and replay).
        memory_per_push: images pushed per device (default ``batch_size // 8``).
        memory_push_every_n_epochs: push at the end of epochs 0, n, 2n, ... (5).
        replay: ``buffer`` (the cyclic memory above) or ``generator`` (generative replay, see the module
            docstring; ``memory_slots`` and the push cadence are then unused).
        memory_generator_lr: Adam learning rate of the memory generator and its encoder (default
            ``generator_lr / 40``, as the public code).
        memory_generator_updates: memory-generator updates per generator step, on the first student steps (4).
        memory_kl_weight: weight of the encoder's KL term (1e-5).
        probe_epochs: the epochs at whose end the last generated batch joins the retention probe (see the module
            docstring; ``None``: no probe). An epoch at or past ``max_epochs`` is never taken.
        probe_size: images of that batch kept per probe and device (default ``batch_size``).
        image_every_n_epochs: generated-image grid cadence (and at the end of training).
        channels_last: run generator, teacher and student in channels-last memory format.
        bf16_generator: run the generator under bf16 autocast (its images are cast back to float32
            for teacher and student): about 2x faster generation on a CPU with AVX512-BF16 and on GPUs.
        seed: seeds the latents and the memory draws.
    """

    def __init__(
        self,
        teacher: TeacherArg,
        arch: NetSpec = "lenet5_half",
        arch_kwargs: dict[str, Any] | None = None,
        num_classes: int | None = None,
        in_channels: int | None = None,
        image_size: int | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        meta: MetaMode = "second_order",
        batch_size: int = 512,
        student_steps: int = 10,
        generator: NetSpec = "dafl",
        latent_dim: int = 1000,
        generator_kwargs: dict[str, Any] | None = None,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        lr_schedule: ScheduleName = "cosine",
        generator_lr: float = 0.02,
        inner_lr: float = 0.9,
        inner_weight_decay: float = 5e-4,
        retain_weight: float = 1.0,
        generator_loss: GeneratorLossWeights = GeneratorLossWeights(),
        js_temperature: float = 3.0,
        memory_slots: int = 10,
        memory_per_push: int | None = None,
        memory_push_every_n_epochs: int = 5,
        replay: Literal["buffer", "generator"] = "buffer",
        memory_generator_lr: float | None = None,
        memory_generator_updates: int = 4,
        memory_kl_weight: float = 1e-5,
        probe_epochs: list[int] | None = None,
        probe_size: int | None = None,
        image_every_n_epochs: int = 5,
        channels_last: bool = False,
        bf16_generator: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["generator_loss"])
        if isinstance(generator_loss, dict):  # from a checkpoint's hyper-parameters
            generator_loss = GeneratorLossWeights(**generator_loss)
        self.loss_weights = generator_loss
        self.hparams["generator_loss"] = asdict(generator_loss)  # plain values: checkpoints load weights-only
        self.automatic_optimization = False
        if meta not in ("none", "first_order", "second_order"):
            raise CvlabError(f"meta must be none, first_order or second_order; got {meta!r}")
        if retain_weight < 0:
            raise CvlabError(f"retain_weight must be >= 0; got {retain_weight}")
        if memory_slots < 0 or batch_size < 1 or student_steps < 1 or memory_push_every_n_epochs < 1:
            raise CvlabError("memory_slots must be >= 0; batch_size, student_steps and memory_push_every_n_epochs >= 1")
        if replay not in ("buffer", "generator"):
            raise CvlabError(f"replay must be buffer or generator; got {replay!r}")
        if replay == "generator" and not 1 <= memory_generator_updates <= student_steps:
            raise CvlabError(f"memory_generator_updates must be in [1, student_steps={student_steps}]; "
                             f"got {memory_generator_updates}")
        if meta != "none" and replay == "buffer" and memory_slots == 0:
            raise CvlabError(f"meta: {meta} replays memory on the adapted weights; it needs memory_slots >= 1 "
                             "or replay: generator (or set meta: none for plain adversarial DFKD)")
        self.memory_per_push = memory_per_push if memory_per_push is not None else max(1, batch_size // 8)
        if not 1 <= self.memory_per_push <= batch_size:
            raise CvlabError(f"memory_per_push must be in [1, batch_size={batch_size}]; got {self.memory_per_push}")
        self.probe_size = probe_size if probe_size is not None else batch_size
        if not 1 <= self.probe_size <= batch_size:
            raise CvlabError(f"probe_size must be in [1, batch_size={batch_size}]; got {self.probe_size}")
        self.probe = RetentionProbe(probe_epochs or ())

        self.teacher = load_teacher(teacher)
        hp = self.hparams
        teacher_handshake(hp, self.teacher, probe=True)  # the generator's and student's: the teacher's unless given
        in_channels, image_size = hp.in_channels, hp.image_size
        # the student's normalisation; None: the task's (setup)
        self.init_student(create_student_net(hp, channels_last), InputNormalization(mean, std), hp.num_classes,
                          image_size, channels_last)
        gkw = {"channels_last": channels_last, **(generator_kwargs or {})}
        self.generator = create_generator(generator, latent_dim=latent_dim, out_channels=in_channels,
                                          image_size=image_size, **gkw)
        self.memory_generator: torch.nn.Module | None = None
        self.encoder: LatentEncoder | None = None
        if replay == "generator":
            self.memory_generator = create_generator(generator, latent_dim=latent_dim, out_channels=in_channels,
                                                     image_size=image_size, **gkw)
            self.encoder = LatentEncoder(latent_dim, in_channels)
        if channels_last:
            self.teacher.to(memory_format=torch.channels_last)

        self.memory = CyclicMemory(memory_slots if replay == "buffer" else 0)
        self.memory_generator_steps = 0  # updates of the memory generator so far (generative replay)
        self.acc_curve: list[list[float]] = []  # [[generator step, test accuracy], ...]
        self.drops, self.drop_total, self.max_drop = 0, 0.0, 0.0
        self._last_new: Tensor | None = None  # the last generated batch (memory pushes, image grids)
        self._last_mem: Tensor | None = None  # the last replayed memory samples (image grids)
        self._reduce: Reduce = no_reduce

    def setup(self, stage: str) -> None:
        self._reduce = all_reduce_mean if self.trainer.world_size > 1 else no_reduce
        task, size = task_of(self._trainer), self.hparams.image_size
        if task is not None and task.image_size != size:
            raise ImageSizeMismatchError(
                f"the generator and teacher use {size}x{size} images but {task.name} gives "
                f"{task.image_size}x{task.image_size}; set the task's image_size to {size}"
            )
        self.check_student_task("LRA's student")

    def student_view(self, u: Tensor) -> Tensor:
        """Generated images live in the teacher's normalised input space (DAFL's generator ends in an
        affine-free BatchNorm: zero-mean, unit-variance images); the student sees the same pixels through its
        own normalisation. The identity when both normalise alike (a teacher trained on the task)."""
        if self.normalize.same_as(self.teacher.normalization):
            return u
        return self.normalize(self.teacher.normalization.inverse(u))

    def on_train_start(self) -> None:
        self.memory.to(self.device)
        self.probe.to(self.device)

    # --- the algorithm ------------------------------------------------------------------------------
    def _latent(self, step: int, k: int) -> Tensor:
        """``(batch_size, latent_dim)`` standard normal, seeded by (seed, rank, generator step, student step)."""
        hp = self.hparams
        return torch.randn(hp.batch_size, hp.latent_dim, generator=self._rng(step, k), device=self.device)

    def _rng(self, step: int, k: int, *salt: int) -> torch.Generator:
        """A generator seeded by (seed, rank, generator step, student step, *salt): resumable draws."""
        return torch.Generator(device=self.device).manual_seed(
            fold_seed(self.hparams.seed, self.global_rank, step, k + 1, *salt))

    def generate(self, z: Tensor, generator: torch.nn.Module | None = None) -> Tensor:
        """``G(z)`` (or ``generator(z)``) as float32 ``(B, C, H, W)`` (under bf16 autocast with ``bf16_generator``)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.hparams.bf16_generator):
            x = (self.generator if generator is None else generator)(z)
        return x.float()

    def _set_grads_and_step(self, opt: Any, params: list[Tensor], grads: list[Tensor]) -> None:
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        opt.zero_grad(set_to_none=True)

    def generator_step(self, step: int, opt: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """Update G to make confident, class-balanced, strongly activating images on which S and T disagree."""
        self.generator.train()
        x = self.generate(self._latent(step, -1))  # (B, C, H, W)
        if self.loss_weights.activation:
            feats, t = self.teacher.features_and_logits(x, normalized=True)  # (B, D), (B, K)
        else:  # no activation term: any teacher will do, TorchScript included
            t = self.teacher.forward_normalized(x)
            feats = t.new_zeros(t.shape[0], 1)
        loss, terms = generator_loss(t, feats, self.net(self.student_view(x)), self.loss_weights,
                                     self.hparams.js_temperature)
        params = [p for p in self.generator.parameters() if p.requires_grad]
        # opt is the LightningOptimizer: its step is the one trainer.global_step counts
        self._set_grads_and_step(opt, params, self._reduce(list(torch.autograd.grad(loss, params))))
        return loss.detach(), {k: v.detach() for k, v in terms.items()}

    def student_step(self, step: int, k: int, opt: torch.optim.Optimizer):
        """One student update on a fresh generated batch and a replayed memory slot (see lra_update)."""
        hp = self.hparams
        with torch.no_grad():
            x_new = self.generate(self._latent(step, k))  # (B, C, H, W); G in train mode, as the public code
            x_mem = self._replay(step, k)  # (m, C, H, W) or None
            x_all = x_new if x_mem is None else torch.cat([x_new, x_mem])
            t_all = self.teacher.forward_normalized(x_all)  # one teacher pass over [new; memory]
        B = x_new.shape[0]
        t_new, t_mem = t_all[:B], (None if x_mem is None else t_all[B:])
        self.net.train()
        params = dict(self.net.named_parameters())
        out = student_gradients(self.net, params, dict(self.net.named_buffers()), self.student_view(x_new), t_new,
                                None if x_mem is None else self.student_view(x_mem), t_mem,
                                hp.meta, hp.inner_lr, hp.inner_weight_decay, reduce=self._reduce,
                                retain_weight=hp.retain_weight)
        self._set_grads_and_step(opt, list(params.values()), [out.grads[n] for n in params])
        self._last_new, self._last_mem = x_new, x_mem
        return out

    def _replay(self, step: int, k: int) -> Tensor | None:
        """This rank's memory samples: its share of one random slot of the buffer (the same slot on every
        rank), or the memory generator's samples (generative replay; None before its first update)."""
        if self.hparams.replay == "generator":
            return self.memory_samples(step, k) if self.memory_generator_steps else None
        slot = self.memory.sample(fold_seed(self.hparams.seed, step, k, 7))
        if slot is None:
            return None
        world, rank = self.trainer.world_size, self.trainer.global_rank
        return slot.view(world, -1, *slot.shape[1:])[rank]  # pushes are gathered rank-major

    @torch.no_grad()
    def memory_samples(self, step: int, k: int) -> Tensor:
        """``memory_per_push`` images of the memory generator (eval mode) at latents refined by one
        fresh-Adam step towards confident, class-balanced teacher outputs with N(0, I) batch statistics."""
        hp = self.hparams
        z = torch.randn(self.memory_per_push, hp.latent_dim, generator=self._rng(step, k, 11), device=self.device)
        self.memory_generator.eval()
        with torch.enable_grad():
            z.requires_grad_(True)
            t = self.teacher.forward_normalized(self.generate(z, self.memory_generator))
            w = self.loss_weights
            loss = (w.one_hot * one_hot_loss(t) + w.balance * class_balance_loss(t)
                    + latent_prior_loss(z))
            (grad,) = torch.autograd.grad(loss, z)
        return self.generate(adam_first_step(z.detach(), grad, hp.generator_lr), self.memory_generator)

    def memory_generator_step(self, x_new: Tensor, x_mem: Tensor | None, step: int, k: int, opt: Any) -> Tensor:
        """One auto-encoder update of the memory generator and its encoder on [x_new[:B/2]; x_mem]."""
        hp = self.hparams
        x = x_new[: max(1, x_new.shape[0] // 2)]
        x = x if x_mem is None else torch.cat([x, x_mem])
        self.memory_generator.train()
        self.encoder.train()
        z, mu, log_var = self.encoder(x, generator=self._rng(step, k, 13))
        x_rec = self.generate(z, self.memory_generator)
        with torch.no_grad():
            t = self.teacher.forward_normalized(x)  # the target logits
        loss = reconstruction_loss(x_rec, x, self.teacher.forward_normalized(x_rec), t, mu, log_var,
                                   hp.memory_kl_weight)
        params = [p for p in [*self.memory_generator.parameters(), *self.encoder.parameters()] if p.requires_grad]
        self._set_grads_and_step(opt, params, self._reduce(list(torch.autograd.grad(loss, params))))
        self.memory_generator_steps += 1
        return loss.detach()

    def training_step(self, batch: int, batch_idx: int) -> dict[str, Tensor]:
        hp = self.hparams
        opts = self.optimizers()
        opt_s, opt_g = opts[0], opts[1]
        step = self.global_step  # generator steps done so far
        g_loss, terms = self.generator_step(step, opt_g)
        for k in range(hp.student_steps):
            s = self.student_step(step, k, opt_s.optimizer)  # the raw optimizer: not counted as a global step
            if hp.replay == "generator" and k < hp.memory_generator_updates:  # raw optimizer, as the student's
                m_loss = self.memory_generator_step(self._last_new, self._last_mem, step, k, opts[2].optimizer)
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        self.log("train/kd", s.kd, prog_bar=True)
        if s.retain is not None:
            self.log("train/acquire", s.acquire)
            self.log("train/retain", s.retain)
        self.log("train/generator_loss", g_loss)
        for name, v in terms.items():
            self.log(f"train/g_{name}", v)
        if hp.replay == "generator":
            self.log("train/memory_generator_loss", m_loss)
        else:
            self.log("train/memory_slots", float(len(self.memory)))
        self.log("train/lr", opt_s.optimizer.param_groups[0]["lr"])
        return {"loss": s.kd + g_loss}  # checked for NaN by the CLI's StopOnNonFiniteLoss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        hp = self.hparams
        if batch_idx + 1 != self.trainer.num_training_batches:  # the epoch's last generator step
            return
        if hp.replay == "buffer" and hp.memory_slots and self.current_epoch % hp.memory_push_every_n_epochs == 0:
            self.memory.push(self._last_batch_of_all_ranks(self.memory_per_push))
        if self.probe.wants(self.current_epoch):
            x = self._last_batch_of_all_ranks(self.probe_size)
            with torch.no_grad():
                self.probe.add(self.current_epoch, x, self.teacher.forward_normalized(x).argmax(-1))
        if self.current_epoch % hp.image_every_n_epochs == 0:
            self._log_images()

    def _last_batch_of_all_ranks(self, n: int) -> Tensor:
        """The first ``n`` images of the last generated batch of every rank: ``(world * n, C, H, W)``, rank-major
        (the same tensor on every rank)."""
        x = self._last_new[:n]
        if self.trainer.world_size > 1:
            x = self.all_gather(x).flatten(0, 1)
        return x

    def on_train_end(self) -> None:
        self._log_images()
        if self.acc_curve and self.trainer.is_global_zero:  # the whole retention curve, once (matplotlib)
            log_image_grid(self.trainer, "retention/curve",
                           retention_figure({f"meta: {self.hparams.meta}": self.retention_summary()}), nrow=1,
                           caption="validation accuracy (solid) and mean probe accuracy (dashed)")

    @torch.no_grad()
    def _log_images(self) -> None:
        if self._last_new is None or not self.trainer.is_global_zero:
            return
        self._log_grid("lra/generated", self._last_new)
        if self.hparams.replay == "generator" and self._last_mem is not None:
            self._log_grid("lra/memory", self._last_mem)

    def _log_grid(self, key: str, x: Tensor) -> None:
        x = x[:100]
        order = torch.argsort(self.teacher.forward_normalized(x).argmax(-1), stable=True)  # by the teacher's class
        x = x[order].float()
        if not self.teacher.normalization.is_identity:
            x = self.teacher.normalization.inverse(x)  # pixels
        else:  # min-max per image
            lo, hi = x.amin((1, 2, 3), keepdim=True), x.amax((1, 2, 3), keepdim=True)
            x = (x - lo) / (hi - lo).clamp_min(1e-8)
        log_image_grid(self.trainer, key, x.clamp(0, 1), nrow=10, caption="sorted by the teacher's class")

    # --- retention: accuracy on the task's validation split (held-out real training images) ------------
    def on_validation_epoch_end(self) -> None:
        acc = self.log_validation_accuracy()  # synced over ranks (Student's validation_step accumulates it)
        if self.trainer.sanity_checking:
            return
        self.record_accuracy(self.global_step, float(acc))
        # the same numbers on every rank (acc is synced): sync_dist only keeps Lightning's DDP check quiet
        self.log("retention/drops", float(self.drops), sync_dist=True)
        self.log("retention/drop_total", self.drop_total, sync_dist=True)
        self.log("retention/max_drop", self.max_drop, sync_dist=True)
        self.log("retention/best_acc", max(a for _, a in self.acc_curve), sync_dist=True)
        self.record_probe()
        if self.trainer.is_global_zero and self.trainer.default_root_dir:
            atomic_write_json(Path(self.trainer.default_root_dir) / "retention_curve.json", self.retention_summary())

    def record_accuracy(self, step: int, acc: float) -> None:
        """Append a point to the accuracy curve; a fall from the previous point is a drop."""
        self.acc_curve.append([int(step), acc])
        d = accuracy_drops([a for _, a in self.acc_curve])
        self.drops, self.drop_total, self.max_drop = d.count, d.total, d.largest

    @torch.no_grad()
    def probe_student_accuracy(self) -> Tensor:
        """The student's accuracy on each probe, ``(P,)`` (one forward per probe: P is small, a probe may not be)."""
        logits = torch.stack([self.net(self.student_view(x)) for x in self.probe.images])  # (P, n, K)
        return probe_accuracy(logits, self.probe.labels)

    def record_probe(self) -> None:
        """Evaluate the probe (when one is configured) and log its retention measures; every validation appends a
        row (empty before the first probe), so the rows stay aligned with the accuracy curve."""
        if not self.probe.epochs:
            return
        acc = self.probe_student_accuracy().tolist() if len(self.probe) else []  # one host sync per validation
        self.probe.record(acc)
        if not acc:
            return
        # the same numbers on every rank (every rank holds the whole probe): sync_dist only keeps Lightning quiet
        self.log("retention/probe_acc", sum(acc) / len(acc), sync_dist=True)
        for epoch, a in zip(self.probe.taken, acc):
            self.log(f"retention/probe_acc/e{epoch}", a, sync_dist=True)
        for key, v in self.probe_measures().items():
            self.log(f"retention/{key}", v, sync_dist=True)

    def probe_measures(self) -> dict[str, float]:
        """The forgetting of the probes and the drops of their curves (summed over probes)."""
        curves = self.probe.curves()
        drops = [accuracy_drops(c) for c in curves]
        return {"probe_forgetting": probe_forgetting(curves), "probe_drops": float(sum(d.count for d in drops)),
                "probe_drop_total": sum(d.total for d in drops)}

    def retention_summary(self) -> dict[str, Any]:
        out = {"generator_step": [int(s) for s, _ in self.acc_curve], "acc": [a for _, a in self.acc_curve],
               "drops": self.drops, "drop_total": self.drop_total, "max_drop": self.max_drop}
        if self.probe.epochs:
            out.update(probe_epochs=list(self.probe.taken), probe_acc=[list(r) for r in self.probe.acc],
                       **self.probe_measures())
        return out

    # --- optimizers and checkpoint state ---------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        opt_s = build_optimizer(self.net.parameters(), "sgd", hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=hp.generator_lr)
        sched = build_schedule(opt_s, hp.lr_schedule, self.trainer.estimated_stepping_batches)
        opts = [opt_s, opt_g]
        if hp.replay == "generator":
            lr_m = hp.memory_generator_lr if hp.memory_generator_lr is not None else hp.generator_lr / 40
            opts.append(torch.optim.Adam([*self.memory_generator.parameters(), *self.encoder.parameters()], lr=lr_m))
        return opts, ([sched] if sched is not None else [])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lra"] = {
            "memory": self.memory.state_dict(),
            "acc_curve": [list(p) for p in self.acc_curve],
            "drops": self.drops, "drop_total": self.drop_total, "max_drop": self.max_drop,
            "memory_generator_steps": self.memory_generator_steps,
            "probe": self.probe.state_dict(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        legacy = legacy_fields(checkpoint.get("hyper_parameters", {}), LEGACY_GENERATOR_LOSS)
        if legacy:  # a checkpoint of the flat weight_* arguments (before generator_loss)
            self.loss_weights = replace(self.loss_weights, **legacy)
            self.hparams["generator_loss"] = asdict(self.loss_weights)
        state = checkpoint.get("lra")
        if state is None:
            return
        self.memory.load_state_dict(state["memory"])
        self.acc_curve = [[int(s), float(a)] for s, a in state["acc_curve"]]
        self.drops, self.drop_total, self.max_drop = (int(state["drops"]), float(state["drop_total"]),
                                                      float(state["max_drop"]))
        self.memory_generator_steps = int(state.get("memory_generator_steps", 0))
        if "probe" in state:  # checkpoints before the retention probe have none
            self.probe.load_state_dict(state["probe"])


#: the old name of :class:`LRA` (configs and checkpoints that name ``lit_modules.distillation.AdversarialKD`` keep
#: working for one release)
AdversarialKD = LRA
