"""Gradient-leakage attack stage: reconstruct private examples from their shared gradient.

* DLG: "Deep Leakage from Gradients", Zhu, Liu, Han, NeurIPS 2019: optimise a dummy input and dummy
  soft-label logits so that their gradient matches the shared one (L-BFGS, lr 1).
* iDLG: "iDLG: Improved Deep Leakage from Gradients", Zhao, Mopuri, Bilen, arXiv 2001.02610: read the
  label off the last layer's weight gradient (Sec. 3.1), then optimise the input only.

``cvlab predict``: every batch holds ``T`` independent trials (a fresh victim network seeded by the
trial's global index, its private examples, a dummy start), attacked together in one vectorised
computation; :class:`cvlab.artifacts.ShardWriter` stores the per-trial results and, at the end, rank 0 writes
``attack/*`` summary metrics to ``<run folder>/metrics.json`` and a grid of originals over reconstructions.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvlab.artifacts import all_shards_on_rank_zero, check_manifest, merge_metrics, shard_folder, with_shard_writer
from cvlab.image_log import log_image_grid
from cvlab.seeding import mix_seed
from cvlab.task import check_task, task_of
from lit_modules.leakage.batched_optim import BatchedResult, batched_adam, batched_lbfgs
from lit_modules.leakage.gradient_leakage import (
    Method,
    SharedVictim,
    StackedVictims,
    attack_objective,
    check_label_extraction_assumptions,
    extract_labels_from_gradients,
    label_multiset_accuracy,
    match_reconstructions,
    psnr,
)
from lit_modules.nets import NetSpec, create_net
from lit_modules.teacher import TeacherArg, load_teacher


class LeakageAttack(L.LightningModule):
    """The attack stage; its arguments are the config (defaults: the papers' MNIST setting).

    Args:
        method: ``idlg`` (extracted label, optimise the input) or ``dlg`` (input and soft label jointly).
        optimizer: ``lbfgs`` (the papers': torch's L-BFGS without line search) or ``adam``.
        iterations: optimiser steps per trial (L-BFGS: ``optimizer.step`` calls, each up to ``max_iter``
            inner iterations, as in the papers' code; Adam: updates).
        lr: step size (1 for L-BFGS in the papers; Adam wants about 0.1).
        max_iter, history_size: torch's L-BFGS settings (its defaults, which the papers kept).
        stop_loss: a trial stops once its gradient distance is below this (the papers' 1e-6).
        arch, arch_kwargs: the victim, a zoo name or ``{class_path: ..., init_args: ...}``, freshly
            initialised per trial (the papers; ``init_range`` U(-0.5, 0.5) for the zoo's nets).
        victim: instead, a trained network (:class:`lit_modules.teacher.TeacherSpec` or a checkpoint path),
            attacked in every trial with its own weights and input contract (the shared gradient is of its
            normalised input, the reconstruction is in pixels).
        num_classes: the victim's classes (default: the datamodule's).
        success_mse: a reconstruction with MSE (pixels in [0, 1]) below this counts as a success.
        seed: with the trial index, seeds each trial's victim and dummy start.
        grid_trials: trials shown in the logged grid of originals over reconstructions.
    """

    def __init__(
        self,
        method: Method = "idlg",
        optimizer: Literal["lbfgs", "adam"] = "lbfgs",
        iterations: int = 300,
        lr: float = 1.0,
        max_iter: int = 20,
        history_size: int = 100,
        stop_loss: float = 1e-6,
        arch: NetSpec = "lenet_sigmoid",
        arch_kwargs: dict[str, Any] | None = None,
        victim: TeacherArg | None = None,
        num_classes: int | None = None,
        success_mse: float = 1e-3,
        seed: int = 0,
        grid_trials: int = 10,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        default_kwargs = {"init_range": 0.5} if isinstance(arch, str) else {}
        self.arch_kwargs = dict(arch_kwargs) if arch_kwargs is not None else default_kwargs
        self.victim = None if victim is None else load_teacher(victim)
        self._t0 = 0.0

    # --- setup ---------------------------------------------------------------------------------------
    def configure_callbacks(self) -> list[L.Callback]:
        """Results go to shards: add a :class:`ShardWriter` unless the trainer has one."""
        return with_shard_writer(self._trainer)

    def setup(self, stage: str) -> None:
        if stage != "predict":
            return
        dm, task = self.trainer.datamodule, task_of(self.trainer)
        if self.hparams.num_classes is None:
            self.hparams.num_classes = task.num_classes
        check_task("the attack", task, num_classes=self.hparams.num_classes)
        if self.victim is not None:
            shape = self.victim.input_shape
            check_task(f"victim {self.victim.spec.weights}", task, "set the source's image_size / channels to match",
                       num_classes=self.victim.num_classes, in_channels=None if shape is None else shape[0],
                       image_size=None if shape is None else shape[-1])
        if self.trainer.is_global_zero:  # a shard folder holds the results of one config only
            fp = {**{f"model.{k}": v for k, v in self.hparams.items() if k != "grid_trials"},
                  **{f"data.{k}": v for k, v in getattr(dm, "hparams", {}).items()
                     if k not in ("trials_per_batch", "num_trials")},
                  "data.source": type(getattr(dm, "source", dm)).__name__}
            check_manifest(shard_folder(self.trainer), fp)
        self.trainer.strategy.barrier()

    def on_predict_start(self) -> None:
        self._t0 = time.perf_counter()

    # --- one batch of trials -----------------------------------------------------------------------------
    def make_victims(self, trials: Tensor, shape: tuple[int, ...]) -> tuple[StackedVictims, Tensor]:
        """A fresh victim network and a dummy start per trial, both seeded by the trial's global index."""
        B, C, H, _ = shape
        K = self.hparams.num_classes
        n_z = B * C * H * H + (B * K if self.hparams.method == "dlg" else 0)
        nets, z0 = [], []
        for t in trials.tolist():  # set-up only: T small networks
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(mix_seed(self.hparams.seed, t))
                if self.victim is None:
                    nets.append(create_net(self.hparams.arch, K, C, H, **self.arch_kwargs))
                z0.append(torch.randn(n_z))  # dummy x ~ N(0, 1) (and DLG's label logits)
        if self.victim is not None:  # one trained network, attacked in every trial (normalisation inside)
            base = nn.Sequential(self.victim.normalization, self.victim.net)
            z0 = torch.stack(z0).to(self.device)
            if isinstance(self.victim.net, torch.jit.ScriptModule):
                return SharedVictim(base.to(self.device), len(z0)), z0
            return StackedVictims.from_nets([base.to(self.device)] * len(z0)), z0
        return StackedVictims.from_nets([n.to(self.device) for n in nets]), torch.stack(z0).to(self.device)

    def attack(self, victims: StackedVictims, shared: list[Tensor], z0: Tensor,
               shape: tuple[int, ...]) -> tuple[BatchedResult, Tensor]:
        """The attacker's side: from the shared gradients and the architecture only. Returns the
        optimiser's result and the labels it attributes (extracted for iDLG, argmax of the soft label for DLG)."""
        hp, B, K = self.hparams, shape[0], self.hparams.num_classes
        labels = None
        if hp.method == "idlg":
            fc_grad = shared[list(victims.params).index(victims.fc_weight)]  # (T, K, D)
            labels = extract_labels_from_gradients(fc_grad, B)  # (T, B)
        objective = attack_objective(victims, shared, shape, hp.method, labels, K)
        bar = self._progress(z0.shape[0])
        kw = dict(steps=hp.iterations, lr=hp.lr, stop_loss=hp.stop_loss, progress=bar)
        if hp.optimizer == "lbfgs":
            res = batched_lbfgs(objective, z0, max_iter=hp.max_iter, history_size=hp.history_size, **kw)
        else:
            res = batched_adam(objective, z0, **kw)
        n_x = B * int(torch.Size(shape[1:]).numel())
        pred = labels if labels is not None else res.z[:, n_x:].view(-1, B, K).argmax(-1)
        return res, pred

    def predict_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        trials, images, labels = batch  # (T,), uint8 (T, B, C, H, W), (T, B)
        T, B, C, H, W = images.shape
        K = self.hparams.num_classes
        x = images.float() / 255  # the papers attack raw pixels in [0, 1]
        with torch.enable_grad():
            victims, z0 = self.make_victims(trials, (B, C, H, W))
            if self.hparams.method == "idlg" and batch_idx == 0:
                net = victims.base
                check_label_extraction_assumptions(net, torch.randn(4, C, H, W, device=self.device))
            # the victim's side: gradients of its loss on the private examples are shared
            shared = [g.detach() for g in victims.gradients(x, F.one_hot(labels, K).to(x.dtype))]
            res, pred = self.attack(victims, shared, z0, (B, C, H, W))
        recon = res.z[:, : B * C * H * W].view(T, B, C, H, W)
        mse = match_reconstructions(recon, x).mean(1)  # (T,)
        ticks = torch.linspace(0, self.hparams.iterations, 11, device=self.device).round().long()
        true_set = F.one_hot(labels, K).sum(1) > 0
        return {
            "index": trials, "label": labels, "pred_label": pred,
            "label_acc": label_multiset_accuracy(pred, labels, K),
            "label_set_ok": ((F.one_hot(pred, K).sum(1) > 0) == true_set).all(1),
            "mse": mse, "psnr": psnr(mse), "success": mse < self.hparams.success_mse,
            "loss": res.loss, "evals": res.evals, "steps": res.steps,
            "curve": res.curve[:, ticks], "curve_steps": ticks.expand(T, -1),
            "reconstruction": recon.float(), "original": images,
        }

    def _progress(self, n: int):
        if not self.trainer.is_global_zero or self.trainer.progress_bar_callback is None:
            return None
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="trials finished", leave=False, dynamic_ncols=True)

        def update(ticks: int, running: int) -> None:
            bar.n = n - running
            bar.set_postfix(evals=ticks, refresh=True)
            if running == 0:
                bar.close()

        return update

    # --- summary -------------------------------------------------------------------------------------------
    def on_predict_end(self) -> None:
        r = all_shards_on_rank_zero(self.trainer)
        if r is None:
            return
        metrics = summarize(r)
        metrics["attack/wall_s"] = time.perf_counter() - self._t0
        merge_metrics(Path(self.trainer.default_root_dir) / "metrics.json", metrics)
        n = min(self.hparams.grid_trials, r["index"].numel())
        orig = r["original"][:n].flatten(0, 1).float() / 255
        rec = r["reconstruction"][:n].flatten(0, 1).clamp(0, 1)
        log_image_grid(self.trainer, "attack/originals_over_reconstructions", torch.cat([orig, rec]),
                       nrow=orig.shape[0])


def summarize(r: dict[str, Tensor]) -> dict[str, float]:
    """Per-trial results (from the shards) -> the ``attack/*`` metrics."""
    out = {
        "attack/num_trials": float(r["index"].numel()),
        "attack/label_acc": r["label_acc"].float().mean().item(),
        "attack/label_set_acc": r["label_set_ok"].float().mean().item(),
        "attack/success_rate": r["success"].float().mean().item(),
        "attack/mse_mean": r["mse"].mean().item(),
        "attack/mse_median": r["mse"].median().item(),
        "attack/psnr_mean": r["psnr"].mean().item(),
        "attack/psnr_median": r["psnr"].median().item(),
        "attack/evals_mean": r["evals"].float().mean().item(),
        "attack/loss_median": r["loss"].median().item(),
    }
    for j, k in enumerate(r["curve_steps"][0].tolist()):
        out[f"attack/loss_median_step_{k:04d}"] = r["curve"][:, j].median().item()
    return out
