"""Dataset Condensation with Gradient Matching (Zhao, Mopuri & Bilen, ICLR 2021,
https://arxiv.org/abs/2006.05929), Algorithm 1.

The learned parameters are the synthetic images S, ``ipc`` per class. One training step is one outer
iteration of Algorithm 1:

    sample a fresh network theta
    for ol in outer_loop:
        match:  D = sum_c d(grad L(S_c; theta), grad L(real batch of class c; theta))   (Eq. 10)
        update: S <- SGD(S, dD/dS)                     (lr_img 0.1, momentum 0.5)
        train:  theta <- inner_loop epochs of SGD on S  (lr_net 0.01, momentum 0.5; skipped after the last ol)

All classes are matched in one batched computation (``vmap`` over classes, see
:mod:`lit_modules.condensation.gradient_matching`) on accelerators; on CPU the per-class loop is faster
(``class_mode``). The real-batch gradients (the targets, >95% of the work) can run in bf16 and be
``torch.compile``d. The matching gradients never go through the DDP wrapper: the network is a plain
local module (not a submodule of this one) called with ``torch.func.functional_call``; under DDP each rank matches
its share of the classes (``rank::world``) and the image gradient is summed with one explicit
all-reduce, so every rank applies the same update. ``trainer.global_step`` counts outer iterations.

Pixels in, normalisation inside (issue 34): the real batches are class-balanced [0, 1] pixel draws from
the datamodule (``class_images``), S is kept in [0, 1] pixel space and every network normalises its own
input. The image gradient is scaled by ``std ** 2`` per channel, so one SGD step (momentum included) on the
pixels equals the paper's step on normalised images with the same ``lr_img``. The evaluation protocol is a
callback, :class:`lit_modules.condensation.CondensationEvaluation`, run by ``test``.

Departure (BatchNorm networks only; the default ConvNet uses instance norm): before each match the
BatchNorm statistics are the *exact* mean and variance of 16 real images per class, then frozen. The
public code runs the same batch once in train mode with PyTorch's default momentum 0.1 from freshly
reset running statistics, which leaves ``0.9 * (0, 1) + 0.1 * batch`` (mostly the reset values).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from cvlab.artifacts import atomic_torch_save
from cvlab.errors import CvlabError
from cvlab.image_log import log_image_grid
from cvlab.image_ops import denormalize
from cvlab.seeding import fold_seed
from cvlab.task import check_task, task_of
from datamodules.class_balanced import ClassBalancedImages, class_image_source
from lit_modules.condensation.gradient_matching import (
    ClassMode,
    Metric,
    RealGradients,
    check_matchable,
    match_loss,
    resolve_class_mode,
)
from lit_modules.condensation.pixel_net import PixelNet, create_pixel_net, pixel_preconditioner
from lit_modules.nets import NetSpec

#: the paper's (outer_loop, inner_loop) per images-per-class (DC code's get_loops)
PAPER_LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


def train_on_set(forward: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, epochs: int,
                 batch_size: int, generator: torch.Generator, bf16: bool = False) -> None:
    """``epochs`` of minibatch training of ``forward`` on ``(x, y)``, reshuffled by ``generator`` every
    epoch: Algorithm 1's inner loop on S. ``bf16``: the forward pass under bf16 autocast (the
    parameters and ``opt``'s update stay as they are)."""
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=generator, device=x.device)
        for i in range(0, x.shape[0], batch_size):
            b = perm[i : i + batch_size]
            opt.zero_grad(set_to_none=True)
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(forward(x[b]), y[b])
            loss.backward()
            opt.step()


@dataclass
class _Engine:
    """The matching network (re-initialised in place every outer iteration, so compiled code is reused),
    its real-gradient function, the resolved class mode, and its inner-loop forward (``net`` itself, or
    ``net`` compiled: the same parameters)."""

    net: nn.Module
    real: RealGradients
    mode: str
    inner: nn.Module


#: constructor arguments that moved to the evaluation callback (issue 34): old key -> where it lives now
MOVED_TO_EVALUATION = {
    "eval_num_nets": "num_nets", "eval_archs": "archs", "eval_epochs": "epochs", "eval_augment": "augment",
    "eval_lr": "lr", "eval_batch_size": "batch_size", "eval_baselines": "baselines", "herding_pool": "herding_pool",
    "eval_test_size": "test_size", "eval_parallel": "parallel", "eval_compile": "compile",
    "eval_condensed": "condensed", "whole_epochs": "whole_epochs", "whole_nets": "whole_nets",
}


def moved_argument_line(key: str) -> str:
    """One line naming where a removed ``DatasetCondensation`` argument lives now."""
    return (f"DatasetCondensation's {key} moved to the evaluation callback: set it as `{MOVED_TO_EVALUATION[key]}` "
            "of lit_modules.condensation.CondensationEvaluation under trainer.callbacks "
            "(e.g. --trainer.callbacks.init_args." + MOVED_TO_EVALUATION[key] + ")")


def load_condensed(path: str | Path) -> dict[str, Any]:
    """Read a ``condensed.pt`` written by :class:`DatasetCondensation` (``weights_only=True``).

    ``images`` are [0, 1] pixel space (not clamped); a file written before issue 34 kept them normalised
    and is converted with its own ``mean``/``std``."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved.get("space") != "pixels":  # the old format: normalised images
        saved["images"] = denormalize(saved["images"], saved["mean"], saved["std"])
        saved["space"] = "pixels"
    return saved


class DatasetCondensation(L.LightningModule):
    """Learn ``ipc`` synthetic images per class by gradient matching (see the module docstring).

    The synthetic images are a parameter in [0, 1] pixel space, not clamped (the paper's code does not clamp
    in its normalised space either); every network normalises its own input with ``mean``/``std``. The
    image gradient is scaled by ``std ** 2`` per channel before SGD, which makes ``lr_img`` mean what it
    means in the paper's normalised space (:func:`~lit_modules.condensation.pixel_net.pixel_preconditioner`).
    Real images come from the datamodule as class-balanced [0, 1] batches
    (:class:`datamodules.class_balanced.ClassImageSource`). The evaluation protocol (fresh networks trained
    on the condensed set and on baselines) is the :class:`~lit_modules.condensation.CondensationEvaluation`
    callback, run by ``test``.

    Args:
        ipc: images per class.
        num_classes, in_channels, image_size: the task (checked against the datamodule's task spec).
        mean, std: the networks' input normalisation (None: the task's, taken at setup).
        arch, arch_kwargs: the matching network, a name from :func:`lit_modules.nets.available_nets` or any
            ``nn.Module`` as ``{class_path, init_args}`` (it must work with ``torch.func``: no in-place
            buffer updates outside BatchNorm).
        init: ``real`` (random real images) or ``noise`` (standard normal in normalised space).
        outer_loop, inner_loop: default: the paper's per ipc (1: (1, 1), 10: (10, 50), 50: (50, 10)).
        lr_img, momentum_img: SGD on the images (lr in normalised units, see above). lr_net, momentum_net,
            batch_train: SGD on the network.
        batch_real: real images per class per match.
        distance: ``ours`` (Eq. 10), ``mse`` or ``cos``.
        class_mode: ``batched`` (one vmapped computation for all classes), ``loop`` (the paper's loop
            over classes) or ``auto`` (batched on accelerators, loop on CPU, where it is faster).
        bf16_real: bf16 autocast for the real-data gradients only (the targets; the synthetic
            branch and its second-order gradients stay float32).
        compile_real: ``torch.compile`` the real-data gradient function (needs a C++ compiler on
            CPU / Triton on GPU; the first outer iteration compiles).
        real_chunk: pass each class's real batch in chunks of this many images (the same gradient;
            faster on CPU, where smaller activations stay in cache; None: the whole batch at once).
        bf16_inner: bf16 autocast for the inner-loop network training on S (the ``inner_loop`` SGD
            epochs between matches, most of an ipc >= 10 iteration; the weights and the SGD update
            stay float32). compile_inner: ``torch.compile`` that network's forward (and backward).
        image_every_n_steps, save_every_n_steps: grid image / ``condensed.pt`` cadence (and at the end).
        condensed_path: a ``condensed.pt`` to start from / evaluate (``cvlab test`` without fitting).
        seed: seeds image init, the fresh networks and the real batches.
    """

    #: the CLI's one line for a config that still sets an evaluation argument here (issue 34)
    moved_args: ClassVar[dict[str, str]] = {name: moved_argument_line(name) for name in MOVED_TO_EVALUATION}

    def __init__(
        self,
        ipc: int = 1,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        arch: NetSpec = "convnet",
        arch_kwargs: dict[str, Any] | None = None,
        init: Literal["real", "noise"] = "real",
        outer_loop: int | None = None,
        inner_loop: int | None = None,
        lr_img: float = 0.1,
        momentum_img: float = 0.5,
        lr_net: float = 0.01,
        momentum_net: float = 0.5,
        batch_real: int = 256,
        batch_train: int = 256,
        distance: Metric = "ours",
        class_mode: ClassMode = "auto",
        bf16_real: bool = False,
        compile_real: bool = False,
        real_chunk: int | None = None,
        bf16_inner: bool = False,
        compile_inner: bool = False,
        image_every_n_steps: int = 100,
        save_every_n_steps: int = 100,
        condensed_path: str | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        for key in kwargs:  # an old key: one line naming its new place
            raise CvlabError(moved_argument_line(key) if key in MOVED_TO_EVALUATION
                             else f"DatasetCondensation has no argument {key!r}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        if ipc < 1:
            raise CvlabError(f"ipc must be >= 1; got {ipc}")
        if (outer_loop is None or inner_loop is None) and ipc not in PAPER_LOOPS:
            raise CvlabError(
                f"no paper schedule for ipc {ipc} (known: {sorted(PAPER_LOOPS)}); "
                "set --model.init_args.outer_loop and --model.init_args.inner_loop"
            )
        self.outer_loop = outer_loop or PAPER_LOOPS[ipc][0]
        self.inner_loop = inner_loop if inner_loop is not None else PAPER_LOOPS[ipc][1]
        check_matchable(self.make_net(), distance)
        resolve_class_mode(class_mode, torch.device("cpu"))  # a bad value fails here, not mid-run
        self._engine_: _Engine | None = None  # built on first use, on the module's device; not a submodule
        self.real: ClassBalancedImages | None = None  # the training images per class (setup)
        # S: (K * ipc, C, H, W), class-major ([0]*ipc, [1]*ipc, ...), [0, 1] pixel space (not clamped)
        self.images = nn.Parameter(torch.zeros(num_classes * ipc, in_channels, image_size, image_size))
        self.register_buffer("labels", torch.arange(num_classes).repeat_interleave(ipc), persistent=False)
        # std ** 2 per channel (set at setup): scales the pixel-space image gradient (pixel_preconditioner)
        self.register_buffer("_precondition", pixel_preconditioner(std, in_channels), persistent=False)

    # --- data ------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        task = task_of(self._trainer)
        if task is None:
            raise CvlabError("DatasetCondensation needs a datamodule (--data ...) that offers its images per class")
        hp = self.hparams
        check_task("DatasetCondensation", task, num_classes=hp.num_classes, in_channels=hp.in_channels,
                   image_size=hp.image_size)
        if hp.get("mean") is None and task.mean is not None:
            hp["mean"], hp["std"] = list(task.mean), list(task.std)
        real = class_image_source(self.trainer.datamodule, "DatasetCondensation").class_images("train")
        least = int(real.counts.min())
        if least < hp.ipc:
            k = int(real.counts.argmin())
            raise CvlabError(
                f"ipc {hp.ipc} is larger than the {least} real training images of class {k}; "
                f"lower --model.init_args.ipc to at most {least}"
            )
        self.real = real.to(self.device)  # uint8 images stay uint8; drawn as [0, 1] floats
        self._batch_real = min(hp.batch_real, least)  # equal per-class batches for vmap
        self._precondition = pixel_preconditioner(hp.std, hp.in_channels).to(self.device)
        if hp.condensed_path:
            with torch.no_grad():
                self.images.copy_(load_condensed(hp.condensed_path)["images"].to(self.device))
        elif stage == "fit" and self.global_step == 0:
            self._init_images()

    def _sample_real(self, n: int, key: tuple[int, ...]) -> Tensor:
        """``n`` distinct random real images per class, [0, 1] pixels ``(K, n, C, H, W)``, seeded by ``key``
        (the same on all ranks)."""
        return self.real.draw(n, fold_seed(self.hparams.seed, *key))

    def _init_images(self) -> None:
        hp = self.hparams
        with torch.no_grad():
            if hp.init == "real":
                x = self._sample_real(hp.ipc, (-1,))  # (K, ipc, C, H, W)
            else:  # standard normal in the normalised space, as the paper's code
                g = torch.Generator(device=self.device).manual_seed(fold_seed(hp.seed, -2))
                u = torch.randn(self.images.shape, generator=g, device=self.device)
                x = u if hp.mean is None else denormalize(u, hp.mean, hp.std)
            self.images.copy_(x.reshape(self.images.shape))

    # --- the algorithm ---------------------------------------------------------------------------
    def make_net(self, key: int | None = None) -> PixelNet:
        """A new matching-architecture network with the input normalisation inside; seeded by
        ``(seed, key)`` when ``key`` is given (the same on every rank), else from the global generator."""
        hp = self.hparams

        def build() -> PixelNet:
            return create_pixel_net(hp.arch, hp.num_classes, hp.in_channels, hp.image_size, hp.get("mean"),
                                    hp.get("std"), **(hp.arch_kwargs or {}))

        if key is None:
            return build()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(fold_seed(hp.seed, key, 7))
            return build()

    @property
    def _engine(self) -> _Engine:
        if self._engine_ is None:
            hp = self.hparams
            mode = resolve_class_mode(hp.class_mode, self.device)
            net = self.make_net().to(self.device)
            real = RealGradients(net, mode, bf16=hp.bf16_real, compile=hp.compile_real, chunk=hp.real_chunk)
            inner = torch.compile(net, dynamic=False) if hp.compile_inner else net
            self._engine_ = _Engine(net, real, mode, inner)
        return self._engine_

    def _fresh_net(self, it: int) -> nn.Module:
        """A randomly initialised network, identical on every rank (seeded by the iteration)."""
        net = self._engine.net
        net.load_state_dict(self.make_net(it).state_dict())
        return net.train()

    def _my_classes(self) -> Tensor:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        return torch.arange(rank, self.hparams.num_classes, world, device=self.device)

    def _freeze_batchnorm(self, net: nn.Module, key: tuple[int, ...]) -> None:
        """BatchNorm nets (paper, Sec. 3): statistics from 16 real images per class, then frozen.
        Exact batch statistics (``momentum=None``), where the public code keeps momentum 0.1 (module docstring)."""
        bns = [m for m in net.modules() if isinstance(m, _BN)]
        if not bns:
            return
        x = self._sample_real(min(16, self._batch_real), (*key, 3)).flatten(0, 1)
        momenta = [m.momentum for m in bns]
        with torch.no_grad():
            for m in bns:
                m.reset_running_stats()
                m.momentum = None  # cumulative average: the exact statistics of this real batch
                m.train()
            net(x)
        for m, mom in zip(bns, momenta):
            m.momentum = mom
            m.eval()

    def match(self, net: nn.Module, key: tuple[int, ...]) -> Tensor:
        """Eq. (10) for this rank's classes; sets ``images.grad`` (summed over ranks, scaled by ``std ** 2``
        per channel). Returns D."""
        hp = self.hparams
        real_grads, mode = self._engine.real, self._engine.mode
        cls = self._my_classes()  # (k,)
        params = {n: p.detach() for n, p in net.named_parameters()}
        buffers = dict(net.named_buffers())
        x_real = self._sample_real(self._batch_real, key)[cls]  # (k, B, C, H, W)
        y_real = cls[:, None].expand(-1, x_real.shape[1])
        x_syn = self.images.view(hp.num_classes, hp.ipc, *self.images.shape[1:])[cls]  # (k, ipc, C, H, W)
        y_syn = cls[:, None].expand(-1, hp.ipc)
        g_real = real_grads(params, buffers, x_real, y_real)
        with torch.enable_grad():
            loss = match_loss(net, params, buffers, g_real, x_syn, y_syn, hp.distance, mode)
        (grad_img,) = torch.autograd.grad(loss, self.images)
        if dist.is_available() and dist.is_initialized() and self.trainer.world_size > 1:
            both = torch.cat([grad_img.flatten(), loss.detach()[None]])
            dist.all_reduce(both)  # sum over ranks: each rank holds its classes' part
            grad_img, loss = both[:-1].view_as(grad_img), both[-1]
        self.images.grad = grad_img * self._precondition  # the normalised-space step (pixel_preconditioner)
        return loss.detach()

    def train_net(self, opt: torch.optim.Optimizer, key: tuple[int, ...]) -> None:
        """``inner_loop`` epochs of SGD of the engine's network (the one :meth:`_fresh_net` returns) on the
        (detached) synthetic set, seeded shuffles."""
        hp, engine = self.hparams, self._engine
        g = torch.Generator(device=self.device).manual_seed(fold_seed(hp.seed, *key, 5))
        engine.net.train()
        train_on_set(engine.inner, opt, self.images.detach(), self.labels, self.inner_loop, hp.batch_train, g,
                     bf16=hp.bf16_inner)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        hp = self.hparams
        it = self.global_step  # one training step = one outer iteration
        opt_img = self.optimizers()
        net = self._fresh_net(it)  # theta_0 ~ P_theta
        opt_net = torch.optim.SGD(net.parameters(), lr=hp.lr_net, momentum=hp.momentum_net)
        total = torch.zeros((), device=self.device)
        for ol in range(self.outer_loop):
            self._freeze_batchnorm(net, (it, ol))
            total = total + self.match(net, (it, ol))  # match
            if ol < self.outer_loop - 1:
                opt_img.optimizer.step()  # update S (inner steps do not count as global steps)
                self.train_net(opt_net, (it, ol))  # train theta on S
            else:
                opt_img.step()  # update S; global_step += 1
        loss = total / (hp.num_classes * self.outer_loop)  # the DC code's reported average
        self.log("condense/match_loss", loss, prog_bar=True)
        return {"loss": loss}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([self.images], lr=self.hparams.lr_img, momentum=self.hparams.momentum_img)

    # --- artifacts --------------------------------------------------------------------------------
    def images01(self) -> Tensor:
        """The condensed images clamped to [0, 1] (for viewing; the networks train on them unclamped)."""
        return self.images.detach().clamp(0, 1)

    def condensed_set(self) -> tuple[Tensor, Tensor]:
        """``(images, labels)``: the condensed set as the networks see it, [0, 1] pixel space (not clamped)."""
        return self.images.detach(), self.labels

    def _save(self) -> None:
        if not self.trainer.is_global_zero:
            return
        hp = self.hparams
        nrow = hp.ipc if hp.ipc > 1 else hp.num_classes  # one row per class (ipc 1: one row)
        log_image_grid(self.trainer, "condense/images", self.images01(), nrow=nrow)
        atomic_torch_save(
            {
                "images": self.images.detach().cpu(),  # [0, 1] pixel space, not clamped: what the networks see
                "space": "pixels",
                "images01": self.images01().cpu(),  # clamped to [0, 1]
                "labels": self.labels.cpu(),
                "mean": list(hp.mean) if hp.get("mean") is not None else None,
                "std": list(hp.std) if hp.get("std") is not None else None,
                "step": int(self.global_step),
                "config": {k: v for k, v in dict(hp).items()
                           if isinstance(v, (int, float, str, bool, list, dict, type(None)))},
            },
            Path(self.trainer.default_root_dir) / "condensed.pt",
        )

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = self.global_step
        if step % self.hparams.image_every_n_steps == 0 or step % self.hparams.save_every_n_steps == 0:
            self._save()

    def on_train_end(self) -> None:
        self._save()

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Nothing per batch: the evaluation protocol is the ``CondensationEvaluation`` callback's (test epoch end)."""
