"""Gray-box evaluation (Vivek B.S., Mopuri, Babu, ECCV 2018, arXiv 1808.01753, section 3).

An adversarially trained model can look robust to white-box attacks because it learned to make its own
gradients weak. Gray-box attacks craft the adversaries on *other versions of the model*: snapshots of the
same training run (intermediate epochs) and models of the same architecture trained from another seed;
black-box attacks craft them on an undefended model. The model is as robust as its worst case.

:class:`GrayBoxEvaluation` is a Lightning callback that

- keeps a snapshot of the network after every training epoch (at the epoch's last batch, so the epoch's
  checkpoint holds it; the snapshots are the callback's state in the checkpoint, so resume restores them);
- during ``test`` attacks the final model with white-box FGSM, I-FGSM and PGD, with gray-box adversaries
  crafted on every earlier snapshot (the last epoch's snapshot is the final model itself), and with
  adversaries transferred from ``sources`` (checkpoints or any teacher: undefended models for the
  black-box attack, independently seeded models of the same architecture for gray-box);
- logs ``test/acc_<attack>``, ``test/acc_graybox_e<epoch>_<attack>``, ``test/acc_transfer_<i>_<attack>``,
  the worst gray-box/transfer case ``test/acc_graybox_worst`` and the worst of everything ``test/acc_worst``;
  the white-box attacks are FGSM, I-FGSM, PGD-40 (``pgd``) and the stronger PGD with restarts
  (``pgd<steps>x<restarts>``, default ``pgd50x10``: 50 steps of 0.01 from 10 random starts, per image the worst
  start; Wong et al.'s and Madry et al.'s MNIST evaluation), all restarts of a batch run as one batch;
- flags gradient masking: ``test/masking_gap`` = FGSM accuracy - the lowest white-box PGD accuracy, and
  ``test/masked`` = 1 when that gap exceeds ``masking_threshold`` (default 0.2, i.e. 20 points: a model whose
  single-step accuracy is that far above its iterative accuracy defends against the single step by weak
  gradients, not by robustness; Madry's and Wong's robust MNIST models sit about 5 points apart, FGSM-AT's
  masked ones 30-90 points), see :func:`gradient_masking`;
  draws the curve of accuracy over snapshots (``images/graybox_curve.png``) and a grid of clean images and
  their white-box PGD adversaries with the predictions (``images/adversarial_examples``).

As a *stage*: ``cvlab test --config <the training config> --ckpt_path <its checkpoint>`` restores the
snapshots from the checkpoint and evaluates (any ``sources`` given on the command line). ``cvlab validate`` runs
the same report on the validation split (``val/acc_*``): recipes and GAT's snapshot policy are chosen on it.
Snapshots equal to the evaluated weights are skipped (the final model is not its own gray-box source; with
``restore_best`` the final weights can be an earlier epoch's).
Needs ``Trainer(inference_mode=False)``. Counts are summed on each device and reduced once at the end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn

from cvlab.errors import CvlabError
from cvlab.image_log import log_image_grid
from lit_modules.robustness.adversarial_training import SnapshotModel
from lit_modules.robustness.attacks import Attack, check_eps, make_attack

AttackName = Literal["fgsm", "ifgsm", "pgd"]
GRAYBOX_ATTACKS = ("fgsm", "ifgsm", "pgd")  # the white-box suite's attacks that can also be crafted on a snapshot


def attack_suite(eps: float, ifgsm_steps: int, pgd_steps: int, pgd_alpha: float | None,
                 pgd_restarts: int, strong_steps: int = 0, strong_alpha: float | None = 0.01,
                 strong_restarts: int = 10) -> dict[str, Attack]:
    """The white-box attacks by name, their budgets bound (true labels; pixels are [0, 1] by contract); with
    ``strong_steps > 0`` also ``pgd<strong_steps>x<strong_restarts>`` (restarts batched together)."""
    suite = {
        "fgsm": make_attack("fgsm", eps),
        "ifgsm": make_attack("ifgsm", eps, steps=ifgsm_steps),
        "pgd": make_attack("pgd", eps, steps=pgd_steps, alpha=pgd_alpha, restarts=pgd_restarts),
    }
    if strong_steps > 0:
        suite[f"pgd{strong_steps}x{strong_restarts}"] = make_attack("pgd", eps, steps=strong_steps,
                                                                    alpha=strong_alpha, restarts=strong_restarts)
    return suite


def gradient_masking(acc_fgsm: float, acc_pgd: float, threshold: float = 0.2) -> tuple[float, bool]:
    """``(gap, masked)``: the gap ``acc_fgsm - acc_pgd`` between single-step and iterative white-box accuracy,
    and whether it exceeds ``threshold``. An iterative attack of the same budget finds at least what one step
    finds on a smooth model, a little more near the boundary; a gap of tens of points means the single step
    was misled by the model's gradient at the clean point (gradient masking; Athalye et al., ICML 2018;
    Tramer et al., ICLR 2018). ``gradient_masking(0.9, 0.05)`` is ``(0.85, True)``; ``(0.95, 0.89)`` is not.
    """
    gap = acc_fgsm - acc_pgd
    return gap, gap > threshold


def correct(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Number of images ``model`` classifies right, as a 0-dim tensor on the device (no host sync)."""
    was = [(m, m.training) for m in model.modules()]
    for m, _ in was:
        m.training = False
    try:
        with torch.no_grad():
            return (model(x).argmax(-1) == y).sum()
    finally:
        for m, mode in was:
            m.training = mode


class GrayBoxEvaluation(L.Callback):
    """Snapshots every epoch; white-box, gray-box and transfer attacks on the final model at ``test``.

    Args:
        eps: the Linf budget in [0, 1] pixel units; ``None``: the model's ``eps`` hyper-parameter (an
            :class:`AdversarialTraining`'s), else an error.
        ifgsm_steps: I-FGSM steps (step eps / steps).
        pgd_steps, pgd_alpha, pgd_restarts: the white-box PGD (Madry's MNIST evaluation: 40 steps of 0.01;
            ``pgd_alpha`` ``None``: 2.5 * eps / steps).
        graybox_attacks: attacks crafted on each snapshot and each source.
        sources: checkpoints (or teacher paths) to transfer from: undefended / independently seeded models.
        pictures: clean/adversarial pairs drawn from the first test batch (0: none).
        strong_steps, strong_alpha, strong_restarts: the stronger white-box PGD (``0`` steps: off); default
            50 steps of 0.01 from 10 random starts (Wong et al.'s / Madry et al.'s MNIST evaluation).
        masking_threshold: the FGSM - PGD accuracy gap above which the model is flagged as gradient-masked.
    """

    def __init__(
        self,
        eps: float | None = None,
        ifgsm_steps: int = 10,
        pgd_steps: int = 40,
        pgd_alpha: float | None = 0.01,
        pgd_restarts: int = 1,
        graybox_attacks: list[AttackName] | None = None,
        sources: list[str] | None = None,
        pictures: int = 10,
        strong_steps: int = 50,
        strong_alpha: float | None = 0.01,
        strong_restarts: int = 10,
        masking_threshold: float = 0.2,
    ) -> None:
        if eps is not None:
            check_eps(eps)
        if strong_steps < 0 or strong_restarts < 1:
            raise CvlabError(f"need strong_steps >= 0 and strong_restarts >= 1, got {strong_steps}, {strong_restarts}")
        self.eps = eps
        self._budget = (ifgsm_steps, pgd_steps, pgd_alpha, pgd_restarts, strong_steps, strong_alpha, strong_restarts)
        self.masking_threshold = masking_threshold
        self._stage = "test"
        self.attacks: dict[str, Attack] = {}
        self.graybox_attacks = list(graybox_attacks or ["fgsm", "ifgsm"])
        unknown = [a for a in self.graybox_attacks if a not in GRAYBOX_ATTACKS]
        if unknown:
            raise CvlabError(f"graybox_attacks {unknown} unknown; available: {', '.join(GRAYBOX_ATTACKS)}")
        self.sources = list(sources or [])
        self.pictures = pictures
        self.epochs: list[int] = []
        self.snapshots: list[dict[str, Tensor]] = []
        self._counts: Tensor | None = None
        self._names: list[str] = []

    # --- snapshots ----------------------------------------------------------------------------------------

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if batch_idx + 1 == trainer.num_training_batches:
            self.snapshots.append({k: v.detach().to("cpu", copy=True) for k, v in pl_module.net.state_dict().items()})
            self.epochs.append(trainer.current_epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": list(self.epochs), "snapshots": self.snapshots}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epochs = [int(e) for e in state_dict["epochs"]]
        self.snapshots = list(state_dict["snapshots"])

    # --- evaluation -----------------------------------------------------------------------------------------

    def _crafting_models(self, pl_module: L.LightningModule) -> list[tuple[str, nn.Module]]:
        from lit_modules.teacher import load_teacher

        dev = pl_module.device
        final = pl_module.net.state_dict()

        def is_final(s: dict[str, Tensor]) -> bool:  # the evaluated weights are not their own gray-box source
            return all(torch.equal(v.cpu(), final[k].detach().cpu()) for k, v in s.items())

        models = [(f"graybox_e{e}", SnapshotModel(pl_module.net, pl_module.normalize,
                                                   {k: v.to(dev) for k, v in s.items()}))
                  for e, s in zip(self.epochs, self.snapshots) if not is_final(s)]
        models += [(f"transfer_{i}", load_teacher(p).to(dev)) for i, p in enumerate(self.sources)]
        return models

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate":  # `cvlab validate`: the report on the validation split
            self._stage = "val"
            self.on_test_epoch_start(trainer, pl_module, stage="val")

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.state.fn == "validate":
            self.on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self.on_test_epoch_end(trainer, pl_module)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str = "test") -> None:
        self._stage = stage
        if torch.is_inference_mode_enabled():
            raise CvlabError("gray-box evaluation attacks the model: run with --trainer.inference_mode=false")
        if self.eps is None:
            self.eps = pl_module.hparams.get("eps")
            if self.eps is None:
                raise CvlabError(f"GrayBoxEvaluation needs eps: give it, or train with a model that has an eps "
                                 f"hyper-parameter ({type(pl_module).__name__} has none)")
            check_eps(self.eps)
        self.attacks = attack_suite(self.eps, *self._budget)
        self._models = self._crafting_models(pl_module)
        self._names = ["clean", *self.attacks] + [f"{name}_{a}" for name, _ in self._models
                                                  for a in self.graybox_attacks]
        self._counts = torch.zeros(len(self._names) + 1, device=pl_module.device)  # + the number of images

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch[0], batch[1]
        counts = [correct(pl_module, x, y)]
        for name, attack in self.attacks.items():
            x_adv = attack(pl_module, x, y)
            counts.append(correct(pl_module, x_adv, y))
            if name == "pgd" and batch_idx == 0 and self.pictures > 0:
                self._draw(trainer, pl_module, x[: self.pictures], x_adv[: self.pictures], y[: self.pictures])
        for _, source in self._models:
            for a in self.graybox_attacks:
                counts.append(correct(pl_module, self.attacks[a](source, x, y), y))
        counts.append(torch.tensor(x.shape[0], device=x.device))
        self._counts += torch.stack(counts).float()

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        counts = trainer.strategy.reduce(self._counts, reduce_op="sum")
        acc = (counts[:-1] / counts[-1].clamp_min(1)).tolist()  # one host sync per test run
        results = dict(zip(self._names, acc))
        st = self._stage
        pl_module.log(f"{st}/graybox_images", counts[-1].item(), sync_dist=False)
        for name, a in results.items():
            if name != "clean" or st == "val":
                pl_module.log(f"{st}/acc_{name}", a, sync_dist=False)
        gray = [a for name, a in results.items() if name.startswith(("graybox_", "transfer_"))]
        if gray:
            pl_module.log(f"{st}/acc_graybox_worst", min(gray), sync_dist=False)
        pl_module.log(f"{st}/acc_worst", min(a for name, a in results.items() if name != "clean"), sync_dist=False)
        pgd_accs = [a for name, a in results.items() if name.startswith("pgd")]
        gap, masked = gradient_masking(results["fgsm"], min(pgd_accs), self.masking_threshold)
        pl_module.log(f"{st}/masking_gap", gap, sync_dist=False)
        pl_module.log(f"{st}/masked", float(masked), sync_dist=False)
        if trainer.is_global_zero:
            self._plot(trainer, results)

    # --- pictures -------------------------------------------------------------------------------------------

    def _draw(self, trainer: L.Trainer, pl_module: L.LightningModule, x: Tensor, x_adv: Tensor, y: Tensor) -> None:
        with torch.no_grad():
            p_clean = pl_module(x).argmax(-1).tolist()
            p_adv = pl_module(x_adv).argmax(-1).tolist()
        caption = (f"top: clean (predicted {p_clean}); bottom: PGD eps {self.eps:.3g} (predicted {p_adv}); "
                   f"labels {y.tolist()}")
        log_image_grid(trainer, "test/adversarial_examples", torch.cat([x, x_adv]), nrow=x.shape[0], caption=caption)
        if trainer.is_global_zero:
            out = Path(trainer.default_root_dir) / "images" / "adversarial_examples.txt"
            out.write_text(caption + "\n")

    def _plot(self, trainer: L.Trainer, results: dict[str, float]) -> None:
        epochs = [e for e in self.epochs if f"graybox_e{e}_{self.graybox_attacks[0]}" in results]
        if not epochs:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        for a in self.graybox_attacks:
            ax.plot(epochs, [results[f"graybox_e{e}_{a}"] for e in epochs], marker="o", label=f"gray-box {a}")
        for a in self.attacks:
            ax.axhline(results[a], linestyle="--", linewidth=0.8, label=f"white-box {a}",
                       color=f"C{3 + list(self.attacks).index(a)}")
        ax.set_xticks(epochs)
        ax.set_xlabel("epoch of the snapshot the adversaries are crafted on")
        ax.set_ylabel("accuracy of the final model")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = Path(trainer.default_root_dir) / "images" / "graybox_curve.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.log_image(key="test/graybox_curve", images=[str(path)])
