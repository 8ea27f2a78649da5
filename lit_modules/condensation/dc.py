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

Departure (BatchNorm networks only; the default ConvNet uses instance norm): before each match the
BatchNorm statistics are the *exact* mean and variance of 16 real images per class, then frozen. The
public code runs the same batch once in train mode with PyTorch's default momentum 0.1 from freshly
reset running statistics, which leaves ``0.9 * (0, 1) + 0.1 * batch`` (mostly the reset values).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from cvlab.artifacts import atomic_torch_save
from cvlab.errors import CvlabError
from cvlab.image_log import log_image_grid
from cvlab.image_ops import to_float
from cvlab.seeding import fold_seed
from cvlab.task import check_task, task_of
from lit_modules.condensation.dc_eval import EvalRecipe, herding_subset, random_subset, train_and_test
from lit_modules.condensation.gradient_matching import (
    ClassMode,
    Metric,
    RealGradients,
    check_matchable,
    match_loss,
    resolve_class_mode,
)
from lit_modules.nets import NetSpec, create_net, net_name

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


def load_condensed(path: str | Path) -> dict[str, Any]:
    """Read a ``condensed.pt`` written by :class:`DatasetCondensation` (``weights_only=True``)."""
    return torch.load(path, map_location="cpu", weights_only=True)


class DatasetCondensation(L.LightningModule):
    """Learn ``ipc`` synthetic images per class by gradient matching (see the module docstring).

    Args:
        ipc: images per class.
        num_classes, in_channels, image_size: the task (checked against the datamodule).
        arch, arch_kwargs: the matching network, a name from :func:`lit_modules.nets.available_nets` or any
            ``nn.Module`` as ``{class_path, init_args}`` (it must work with ``torch.func``: no in-place
            buffer updates outside BatchNorm).
        init: ``real`` (random real images) or ``noise`` (standard normal in normalised space).
        outer_loop, inner_loop: default: the paper's per ipc (1: (1, 1), 10: (10, 50), 50: (50, 10)).
        lr_img, momentum_img: SGD on the images. lr_net, momentum_net, batch_train: SGD on the network.
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
        eval_*: the evaluation protocol run by ``test`` (after ``fit`` by default): ``eval_num_nets``
            fresh networks of each of ``eval_archs`` trained with the paper's recipe on the condensed
            set and on each of ``eval_baselines`` (``random``, ``herding``, ``whole``).
        herding_pool: real examples per class considered by herding (None: all); herding uses the
            penultimate features of a randomly initialised ``arch`` network (seeded).
        eval_test_size: test images used by the protocol (None: the whole test set; the first N).
        eval_parallel, eval_compile: how the evaluation networks train (``EvalRecipe.parallel``:
            ``vmap`` all at once, ``loop`` one at a time, ``auto`` vmap on CUDA only) and whether the
            loop's per-network step is ``torch.compile``d (``experiments/dc/cpu.yaml`` turns it on).
        eval_condensed: evaluate the condensed set (False: only ``eval_baselines``, e.g. to add a
            baseline to a finished run with ``cvlab test --model.init_args.condensed_path ...``).
        condensed_path: a ``condensed.pt`` to start from / evaluate (``cvlab test`` without fitting).
        whole_epochs, whole_nets: the ``whole`` baseline's budget (the full training set is large).
        seed: seeds image init, the fresh networks, the real batches and the evaluation.
    """

    def __init__(
        self,
        ipc: int = 1,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
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
        eval_num_nets: int = 10,
        eval_archs: list[NetSpec] | None = None,
        eval_epochs: int = 300,
        eval_augment: str = "none",
        eval_lr: float = 0.01,
        eval_batch_size: int = 256,
        eval_baselines: list[str] | None = None,
        herding_pool: int | None = None,
        eval_test_size: int | None = None,
        eval_parallel: str = "auto",
        eval_compile: bool = False,
        eval_condensed: bool = True,
        condensed_path: str | None = None,
        whole_epochs: int = 2,
        whole_nets: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__()
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
        self.eval_archs = eval_archs or ["convnet"]
        self.eval_baselines = eval_baselines if eval_baselines is not None else ["random", "herding"]
        check_matchable(self._make_net(), distance)
        resolve_class_mode(class_mode, torch.device("cpu"))  # a bad value fails here, not mid-run
        EvalRecipe(parallel=eval_parallel, compile=eval_compile)  # likewise for the evaluation options
        if not eval_condensed and eval_baselines == []:
            raise CvlabError("eval_condensed is false and eval_baselines is empty: the test stage would evaluate "
                             "nothing; set --model.init_args.eval_baselines '[random]' (or herding, whole)")
        self._engine_: _Engine | None = None  # built on first use, on the module's device; not a submodule
        # S: (K * ipc, C, H, W), class-major ([0]*ipc, [1]*ipc, ...), normalised pixel space
        self.images = nn.Parameter(torch.zeros(num_classes * ipc, in_channels, image_size, image_size))
        self.register_buffer("labels", torch.arange(num_classes).repeat_interleave(ipc), persistent=False)

    # --- data ------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is None:
            raise CvlabError("DatasetCondensation needs a datamodule (--data ...) with train_x / train_y tensors")
        dm.setup(stage)
        hp = self.hparams
        check_task("DatasetCondensation", task_of(self.trainer), num_classes=hp.num_classes,
                   in_channels=hp.in_channels, image_size=hp.image_size)
        self.dm = dm
        y = dm.train_y
        counts = torch.bincount(y, minlength=hp.num_classes)  # (K,)
        if int(counts.min()) < hp.ipc:
            k = int(counts.argmin())
            raise CvlabError(
                f"ipc {hp.ipc} is larger than the {int(counts[k])} real training images of class {k}; "
                f"lower --model.init_args.ipc to at most {int(counts.min())}"
            )
        # (K, Nmax) table of training indices per class, padded with -1
        order = torch.argsort(y, stable=True)
        nmax = int(counts.max())
        table = torch.full((hp.num_classes, nmax), -1, dtype=torch.long)
        pos = torch.arange(y.numel()) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        table[y[order], pos] = order
        self._class_table = table.to(self.device)
        self._train_x = dm.train_x.to(self.device)  # uint8 (N, C, H, W)
        self._batch_real = min(hp.batch_real, int(counts.min()))  # equal per-class batches for vmap
        if hp.condensed_path:
            with torch.no_grad():
                self.images.copy_(load_condensed(hp.condensed_path)["images"].to(self.device))
        elif stage == "fit" and self.global_step == 0:
            self._init_images()

    def _real(self, idx: Tensor) -> Tensor:
        """uint8 training images at ``idx`` (any shape) -> normalised float ``(*idx.shape, C, H, W)``."""
        x = self.dm.normalize(to_float(self._train_x[idx.flatten()]))
        return x.view(*idx.shape, *x.shape[1:])

    def _sample_real(self, n: int, key: tuple[int, ...]) -> Tensor:
        """``n`` distinct random real images per class: ``(K, n, C, H, W)``, seeded by ``key`` (same on all ranks)."""
        g = torch.Generator(device=self.device).manual_seed(fold_seed(self.hparams.seed, *key))
        u = torch.rand(self._class_table.shape, generator=g, device=self.device)
        u = u.masked_fill(self._class_table < 0, 2.0)  # padding is never picked
        pick = u.topk(n, dim=1, largest=False).indices  # (K, n)
        return self._real(self._class_table.gather(1, pick))

    def _init_images(self) -> None:
        hp = self.hparams
        with torch.no_grad():
            if hp.init == "real":
                x = self._sample_real(hp.ipc, (-1,))  # (K, ipc, C, H, W)
            else:
                g = torch.Generator(device=self.device).manual_seed(fold_seed(hp.seed, -2))
                x = torch.randn(self.images.shape, generator=g, device=self.device)
            self.images.copy_(x.reshape(self.images.shape))

    # --- the algorithm ---------------------------------------------------------------------------
    def _make_net(self) -> nn.Module:
        hp = self.hparams
        return create_net(hp.arch, hp.num_classes, hp.in_channels, hp.image_size, **(hp.arch_kwargs or {}))

    @property
    def _engine(self) -> _Engine:
        if self._engine_ is None:
            hp = self.hparams
            mode = resolve_class_mode(hp.class_mode, self.device)
            net = self._make_net().to(self.device)
            real = RealGradients(net, mode, bf16=hp.bf16_real, compile=hp.compile_real, chunk=hp.real_chunk)
            inner = torch.compile(net, dynamic=False) if hp.compile_inner else net
            self._engine_ = _Engine(net, real, mode, inner)
        return self._engine_

    def _fresh_net(self, it: int) -> nn.Module:
        """A randomly initialised network, identical on every rank (seeded by the iteration)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(fold_seed(self.hparams.seed, it, 7))
            fresh = self._make_net()
        net = self._engine.net
        net.load_state_dict(fresh.state_dict())
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
        """Eq. (10) for this rank's classes; sets ``images.grad`` (summed over ranks). Returns D."""
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
        self.images.grad = grad_img
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
        return self.dm.denormalize(self.images.detach()).clamp(0, 1)

    def _save(self) -> None:
        if not self.trainer.is_global_zero:
            return
        hp = self.hparams
        nrow = hp.ipc if hp.ipc > 1 else hp.num_classes  # one row per class (ipc 1: one row)
        log_image_grid(self.trainer, "condense/images", self.images01(), nrow=nrow)
        atomic_torch_save(
            {
                "images": self.images.detach().cpu(),  # normalised, what the networks see
                "images01": self.images01().cpu(),  # [0, 1] pixels
                "labels": self.labels.cpu(),
                "mean": list(self.dm.mean),
                "std": list(self.dm.std),
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

    # --- evaluation protocol (the ``test`` stage) ---------------------------------------------------
    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Nothing per batch: the protocol trains networks in :meth:`on_test_epoch_end`."""

    def evaluation_sets(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{name: (normalised images, labels)}``: the condensed set and the requested baselines."""
        hp, dm = self.hparams, self.dm
        sets = {"dc": (self.images.detach(), self.labels)} if hp.eval_condensed else {}
        y = dm.train_y.to(self.device)
        if "random" in self.eval_baselines:
            idx = random_subset(y, hp.ipc, hp.num_classes, seed=hp.seed)
            sets["random"] = (self._real(idx), y[idx])
        if "herding" in self.eval_baselines:
            sets["herding"] = self._herding_set(y)
        if "whole" in self.eval_baselines:
            sets["whole"] = (self._real(torch.arange(y.numel(), device=self.device)), y)
        return sets

    @torch.no_grad()
    def _herding_set(self, y: Tensor) -> tuple[Tensor, Tensor]:
        hp = self.hparams
        pool = self._class_table if hp.herding_pool is None else self._class_table[:, : hp.herding_pool]
        pool = pool[pool >= 0]  # (n,) training indices
        net = self._fresh_net(-1).eval()
        feats = torch.cat([net.forward_features(self._real(pool[i : i + 1000])) for i in range(0, pool.numel(), 1000)])
        sel = pool[herding_subset(feats, y[pool], hp.ipc, hp.num_classes)]
        return self._real(sel), y[sel]

    def on_test_epoch_end(self) -> None:
        hp, dm = self.hparams, self.dm
        n = hp.eval_test_size or dm.test_x.shape[0]
        test_x = dm.normalize(to_float(dm.test_x[:n].to(self.device)))
        test_y = dm.test_y[:n].to(self.device)
        for name, (x, y) in self.evaluation_sets().items():
            whole = name == "whole"
            recipe = EvalRecipe(
                epochs=hp.whole_epochs if whole else hp.eval_epochs, lr=hp.eval_lr,
                batch_size=hp.eval_batch_size, augment=hp.eval_augment,
                parallel=hp.eval_parallel, compile=hp.eval_compile,
            )
            for arch in self.eval_archs:
                kw = (hp.arch_kwargs or {}) if arch == hp.arch else {}
                show = self.trainer.is_global_zero and self.trainer.progress_bar_callback is not None
                acc = train_and_test(
                    x, y, test_x, test_y, arch, hp.num_classes, kw,
                    num_nets=hp.whole_nets if whole else hp.eval_num_nets, recipe=recipe, seed=hp.seed,
                    progress=f"eval {name} {arch}" if show else None,
                )
                mean, std = acc.mean() * 100, (acc.std(unbiased=False) * 100 if acc.numel() > 1 else acc.new_zeros(()))
                if show:
                    print(f"cvlab dc eval: {name} {arch}: {mean.item():.2f} +- {std.item():.2f} % "
                          f"({acc.numel()} nets, {x.shape[0]} training images)", flush=True)
                label = net_name(arch).rsplit(".", 1)[-1]
                self.log(f"eval/{name}_{label}_acc_mean", mean)
                self.log(f"eval/{name}_{label}_acc_std", std)
                if name == "dc" and arch == self.eval_archs[0]:
                    self.log("eval/acc_mean", mean)
                    self.log("eval/acc_std", std)
