"""The evaluation protocol of Dataset Condensation as a Lightning callback, wired by config:

    trainer:
      callbacks:
        - class_path: lit_modules.condensation.CondensationEvaluation
          init_args: {archs: [convnet, lenet5], baselines: [random, herding]}

At the end of ``test`` (run after ``fit`` by the CLI, or ``cvlab test`` on a ``condensed.pt``) it trains
``num_nets`` fresh networks of each of ``archs`` on the condensed set and on each baseline with the paper's
recipe (:mod:`lit_modules.condensation.dc_eval`) and logs their test accuracy (``eval/*``). Every set is
[0, 1] pixels; each network normalises its input with the system's ``mean``/``std``.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor

from cvlab.errors import CvlabError
from datamodules.class_balanced import ClassBalancedImages, class_image_source
from lit_modules.condensation.dc import DatasetCondensation
from lit_modules.condensation.dc_eval import EvalRecipe, herding_subset, random_subset, train_and_test
from lit_modules.nets import NetSpec, net_name

BASELINES = ("random", "herding", "whole")


class CondensationEvaluation(L.Callback):
    """Train fresh networks on the condensed set and on baselines; log their test accuracy.

    Args:
        num_nets: networks per architecture and set (paper: 100; the DC code's default 20).
        archs: the evaluation architectures (default ``[convnet]``); the system's ``arch_kwargs`` apply to
            its own ``arch``.
        epochs, lr, batch_size, augment, parallel, compile: the recipe (:class:`EvalRecipe`).
        baselines: any of ``random`` (ipc random real images per class), ``herding`` and ``whole`` (the
            whole training set); default ``[random, herding]``.
        herding_pool: real examples per class considered by herding (None: all); herding uses the
            penultimate features of a randomly initialised network of the system's ``arch`` (seeded).
        test_size: test images used (None: the whole test split; else the first N).
        condensed: evaluate the condensed set (False: only the baselines, e.g. to add one to a finished run).
        whole_epochs, whole_nets: the ``whole`` baseline's budget (the full training set is large).
        seed: seeds the networks, shuffles and subsets (None: the system's ``seed``).
    """

    def __init__(
        self,
        num_nets: int = 10,
        archs: list[NetSpec] | None = None,
        epochs: int = 300,
        augment: str = "none",
        lr: float = 0.01,
        batch_size: int = 256,
        baselines: list[str] | None = None,
        herding_pool: int | None = None,
        test_size: int | None = None,
        parallel: str = "auto",
        compile: bool = False,
        condensed: bool = True,
        whole_epochs: int = 2,
        whole_nets: int = 1,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.num_nets, self.epochs, self.augment, self.lr, self.batch_size = num_nets, epochs, augment, lr, batch_size
        self.archs: list[NetSpec] = archs or ["convnet"]
        self.baselines = list(baselines) if baselines is not None else ["random", "herding"]
        unknown = [b for b in self.baselines if b not in BASELINES]
        if unknown:
            raise CvlabError(f"unknown evaluation baseline(s) {unknown}; expected any of {list(BASELINES)}")
        if not condensed and not self.baselines:
            raise CvlabError("condensed is false and baselines is empty: the test stage would evaluate nothing; "
                             "set --trainer.callbacks.init_args.baselines '[random]' (or herding, whole)")
        EvalRecipe(parallel=parallel, compile=compile)  # a bad value fails here, not after condensing
        self.herding_pool, self.test_size, self.parallel, self.compile = herding_pool, test_size, parallel, compile
        self.condensed, self.whole_epochs, self.whole_nets, self.seed = condensed, whole_epochs, whole_nets, seed

    def recipe(self, whole: bool = False) -> EvalRecipe:
        return EvalRecipe(epochs=self.whole_epochs if whole else self.epochs, lr=self.lr, batch_size=self.batch_size,
                          augment=self.augment, parallel=self.parallel, compile=self.compile)

    # --- the sets ---------------------------------------------------------------------------------
    def evaluation_sets(self, system: DatasetCondensation, seed: int) -> dict[str, tuple[Tensor, Tensor]]:
        """``{name: ([0, 1] images, labels)}``: the condensed set and the requested baselines."""
        hp, real = system.hparams, _real(system)
        sets = {"dc": system.condensed_set()} if self.condensed else {}
        if "random" in self.baselines:
            idx = random_subset(real.labels, hp.ipc, hp.num_classes, seed=seed)
            sets["random"] = (real.pixels(idx), real.labels[idx])
        if "herding" in self.baselines:
            sets["herding"] = self._herding_set(system, real)
        if "whole" in self.baselines:
            sets["whole"] = (real.pixels(torch.arange(real.labels.numel(), device=real.device)), real.labels)
        return sets

    @torch.no_grad()
    def _herding_set(self, system: DatasetCondensation, real: ClassBalancedImages) -> tuple[Tensor, Tensor]:
        hp = system.hparams
        pool = real.table if self.herding_pool is None else real.table[:, : self.herding_pool]
        pool = pool[pool >= 0]  # (n,) training indices
        net = system.make_net(-1).to(real.device).eval()
        feats = torch.cat([net.forward_features(real.pixels(pool[i : i + 1000])) for i in range(0, pool.numel(), 1000)])
        sel = pool[herding_subset(feats, real.labels[pool], hp.ipc, hp.num_classes)]
        return real.pixels(sel), real.labels[sel]

    # --- the protocol -------------------------------------------------------------------------------
    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(pl_module, DatasetCondensation):
            raise CvlabError(f"CondensationEvaluation evaluates a DatasetCondensation system, not "
                             f"{type(pl_module).__name__}; remove it from trainer.callbacks")
        hp = pl_module.hparams
        seed = hp.seed if self.seed is None else self.seed
        test = class_image_source(trainer.datamodule, "CondensationEvaluation").class_images("test")
        n = min(self.test_size or test.labels.numel(), test.labels.numel())
        idx = torch.arange(n)
        test_x, test_y = test.pixels(idx).to(pl_module.device), test.labels[idx].to(pl_module.device)
        show = trainer.is_global_zero and trainer.progress_bar_callback is not None
        for name, (x, y) in self.evaluation_sets(pl_module, seed).items():
            whole = name == "whole"
            for arch in self.archs:
                kw = (hp.arch_kwargs or {}) if arch == hp.arch else {}
                acc = train_and_test(
                    x, y, test_x, test_y, arch, hp.num_classes, kw,
                    num_nets=self.whole_nets if whole else self.num_nets, recipe=self.recipe(whole), seed=seed,
                    progress=f"eval {name} {arch}" if show else None, mean=hp.get("mean"), std=hp.get("std"),
                )
                self._log(pl_module, name, arch, acc, x.shape[0], show)

    def _log(self, pl_module: L.LightningModule, name: str, arch: NetSpec, acc: Tensor, n: int, show: bool) -> None:
        mean = acc.mean() * 100
        std = acc.std(unbiased=False) * 100 if acc.numel() > 1 else acc.new_zeros(())
        if show:
            print(f"cvlab dc eval: {name} {arch}: {mean.item():.2f} +- {std.item():.2f} % "
                  f"({acc.numel()} nets, {n} training images)", flush=True)
        label = net_name(arch).rsplit(".", 1)[-1]
        pl_module.log(f"eval/{name}_{label}_acc_mean", mean)
        pl_module.log(f"eval/{name}_{label}_acc_std", std)
        if name == "dc" and arch == self.archs[0]:
            pl_module.log("eval/acc_mean", mean)
            pl_module.log("eval/acc_std", std)

    def state_dict(self) -> dict[str, Any]:
        return {}


def _real(system: DatasetCondensation) -> ClassBalancedImages:
    if system.real is None:
        raise CvlabError("CondensationEvaluation runs after the system's setup (trainer.test), which reads the "
                         "training images per class")
    return system.real
