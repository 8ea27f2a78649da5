"""Adversarial training of any cvlab network: clean, FGSM-AT, PGD-AT and Gray-box Adversarial Training.

:class:`AdversarialTrainer` is a :class:`lit_modules.ClassifierModule` whose ``training_step`` trains on
adversarial examples; ``regime`` picks the adversary, so the four regimes are one config key apart and
every checkpoint is a teacher for every method.

- ``clean``: cross-entropy on clean images (the undefended baseline).
- ``fgsm`` (FGSM-AT; Goodfellow et al. 2015, Kurakin et al., "Adversarial Machine Learning at Scale", ICLR
  2017, arXiv 1611.01236): in each batch a fraction ``adv_ratio`` (k of m images) is replaced by FGSM
  adversaries of the current model, and the loss is Kurakin et al.'s mixed loss
  ``(sum_clean CE + adv_weight * sum_adv CE) / (m - k + adv_weight * k)``.
- ``pgd`` (PGD-AT; Madry et al., ICLR 2018, arXiv 1706.06083): every image replaced by its PGD adversary
  (``pgd_steps`` steps of ``pgd_alpha`` from a random start), plain CE.
- ``gat`` (Gray-box Adversarial Training; Vivek B.S., Mopuri, Babu, ECCV 2018, arXiv 1808.01753): as FGSM-AT,
  but each batch's adversaries are seeded from a model drawn from {the current model} + a *bag of snapshots*
  of the model taken earlier in the same run, so the model cannot escape its adversaries by learning to make
  its own gradients weak.

Choices where the GAT paper's text could not be checked (all configurable):

- adversary: FGSM with ``fgsm_labels: predicted`` (the crafting model's own predictions: no label leaking)
  and ``random_eps``: per-image eps uniform in (0, eps] (FGSM-AT uses the same adversary, so the two
  regimes differ only in the crafting model).
- loss: ``adv_ratio`` 0.5 and ``adv_weight`` 0.3 (Kurakin et al.'s k = m / 2 and lambda = 0.3); the
  adversarial images are the first ``round(adv_ratio * m)`` of each device's batch (batches are shuffled).
- snapshots: one at the end of every ``snapshot_every`` epochs (taken at the epoch's last training batch,
  so the epoch's checkpoint holds it); the bag keeps the latest ``bag_size`` (oldest dropped first).
- sampling: per batch, the current model with probability ``current_prob``, else a snapshot drawn
  uniformly from the bag; the draw comes from a generator seeded by ``(seed, global_step)``, so every
  device draws the same model and a resumed run draws what the uninterrupted one would have.
- warm-up: until the first snapshot exists (the first ``snapshot_every`` epochs) GAT is FGSM-AT on the
  current model; ``warmup_epochs: 0`` with an empty bag is an error (nothing to seed from).

The snapshots live in the checkpoint (``on_save_checkpoint``), so a resumed run keeps its bag.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from cvlab.errors import CvlabError
from lit_modules.classifier import ClassifierModule
from lit_modules.nets import InputNormalization
from lit_modules.robustness.attacks import check_eps, fgsm, pgd

Regime = Literal["clean", "fgsm", "pgd", "gat"]


class SnapshotModel(nn.Module):
    """Pixels -> logits of ``net`` with other weights ``state`` (a snapshot), through ``normalize``.

    Shares ``net``'s code and reads the snapshot with ``torch.func.functional_call``: no copy of the network.
    """

    def __init__(self, net: nn.Module, normalize: InputNormalization, state: dict[str, Tensor]) -> None:
        super().__init__()
        self.net, self.normalize = net, normalize
        self.state = state

    def forward(self, x: Tensor) -> Tensor:
        return functional_call(self.net, self.state, (self.normalize(x),))


class EmptyBagError(CvlabError):
    """A snapshot was asked for before any was taken."""


class SnapshotBag:
    """The latest ``size`` snapshots of a network (state_dict copies, detached), oldest dropped first."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise CvlabError(f"bag_size must be >= 1, got {size}")
        self.size = size
        self.snapshots: list[dict[str, Tensor]] = []
        self.epochs: list[int] = []

    def __len__(self) -> int:
        return len(self.snapshots)

    def add(self, net: nn.Module, epoch: int) -> None:
        self.snapshots.append({k: v.detach().clone() for k, v in net.state_dict().items()})
        self.epochs.append(epoch)
        if len(self.snapshots) > self.size:
            self.snapshots.pop(0)
            self.epochs.pop(0)

    def get(self, i: int) -> dict[str, Tensor]:
        if not self.snapshots:
            raise EmptyBagError(
                "the GAT snapshot bag is empty: no snapshot has been taken yet (one is taken every snapshot_every "
                "epochs); use warmup_epochs >= snapshot_every, or resume from a checkpoint that has snapshots"
            )
        return self.snapshots[i]

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": list(self.epochs), "snapshots": [{k: v.cpu() for k, v in s.items()} for s in self.snapshots]}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str = "cpu") -> None:
        self.epochs = [int(e) for e in state["epochs"]]
        self.snapshots = [{k: v.to(device) for k, v in s.items()} for s in state["snapshots"]]


class AdversarialTrainer(ClassifierModule):
    """Adversarial training of any network (see the module docstring for the regimes and GAT's choices).

    Args:
        regime: ``clean``, ``fgsm`` (FGSM-AT), ``pgd`` (PGD-AT) or ``gat``.
        eps: the Linf budget in [0, 1] pixel units (0.3 MNIST, 0.1/0.2 Fashion-MNIST, 8/255 CIFAR-10).
        adv_ratio: FGSM-AT / GAT: fraction of each batch replaced by adversaries (Kurakin's k / m).
        adv_weight: FGSM-AT / GAT: weight lambda of the adversarial images in the mixed loss.
        fgsm_labels: ``predicted`` (the crafting model's predictions) or ``true`` labels for FGSM.
        random_eps: FGSM with a per-image eps uniform in (0, eps] instead of eps.
        pgd_steps, pgd_alpha: PGD-AT's adversary (alpha default ``2.5 * eps / pgd_steps``; Madry's MNIST: 40
            steps of 0.01).
        snapshot_every: GAT: epochs between snapshots.
        bag_size: GAT: snapshots kept.
        current_prob: GAT: probability of seeding a batch's adversaries from the current model.
        warmup_epochs: GAT: epochs of FGSM-AT on the current model before the bag is used (``None``:
            ``snapshot_every``, when the first snapshot exists).
        seed: GAT: seed of the per-step model draw.
        eps_warmup_epochs: the training adversary's eps grows linearly from 0 to ``eps`` over this many epochs
            (0: the full eps from the first step); a small network trained by PGD at MNIST's eps 0.3 from the
            first step can stay at chance (LeNet-5, 3 epochs: 11% accuracy).
        **kwargs: :class:`ClassifierModule`'s arguments (``arch``, optimizer, schedule, ...).
    """

    def __init__(
        self,
        regime: Regime = "fgsm",
        eps: float = 0.3,
        adv_ratio: float = 0.5,
        adv_weight: float = 0.3,
        fgsm_labels: Literal["predicted", "true"] = "predicted",
        random_eps: bool = True,
        pgd_steps: int = 40,
        pgd_alpha: float | None = 0.01,
        snapshot_every: int = 1,
        bag_size: int = 5,
        current_prob: float = 0.5,
        warmup_epochs: int | None = None,
        seed: int = 0,
        eps_warmup_epochs: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if regime not in ("clean", "fgsm", "pgd", "gat"):
            raise CvlabError(f"regime must be one of clean, fgsm, pgd, gat; got {regime!r}")
        check_eps(eps)
        if not 0.0 < adv_ratio <= 1.0 or adv_weight < 0 or not 0.0 <= current_prob <= 1.0:
            raise CvlabError(f"need 0 < adv_ratio <= 1, adv_weight >= 0, 0 <= current_prob <= 1; got "
                             f"{adv_ratio}, {adv_weight}, {current_prob}")
        self.bag = SnapshotBag(bag_size)
        self._epoch_t0 = 0.0
        self._epoch_s: float | None = None

    # --- the adversary of each regime -------------------------------------------------------------------

    def seed_model(self) -> tuple[nn.Module, int]:
        """GAT: the model this batch's adversaries are crafted on, and its bag index (-1: the current model)."""
        hp = self.hparams
        warmup = hp.snapshot_every if hp.warmup_epochs is None else hp.warmup_epochs
        if self.current_epoch < warmup:
            return self, -1
        if len(self.bag) == 0:
            self.bag.get(0)  # raises EmptyBagError with what to do
        g = torch.Generator().manual_seed(hp.seed * 1_000_003 + self.global_step)  # CPU: no device sync
        if torch.rand((), generator=g).item() < hp.current_prob:
            return self, -1
        i = int(torch.randint(len(self.bag), (), generator=g))
        return SnapshotModel(self.net, self.normalize, self.bag.get(i)), i

    def train_eps(self) -> float:
        """This step's eps: ``eps``, ramped up linearly over the first ``eps_warmup_epochs``."""
        hp = self.hparams
        if hp.eps_warmup_epochs <= 0 or self._trainer is None:
            return hp.eps
        ramp = (self.global_step + 1) / (hp.eps_warmup_epochs * max(1, self.trainer.num_training_batches))
        return hp.eps * min(1.0, ramp)

    def craft(self, x: Tensor, y: Tensor) -> Tensor:
        """Adversarial pixels of ``x`` for this step's regime (gradients of the crafting model only)."""
        hp = self.hparams
        eps = self.train_eps()
        if hp.regime == "pgd":
            alpha = None if hp.pgd_alpha is None else hp.pgd_alpha * eps / hp.eps if hp.eps > 0 else hp.pgd_alpha
            return pgd(self, x, y, eps, alpha=alpha, steps=hp.pgd_steps, check=False)
        model, _ = self.seed_model() if hp.regime == "gat" else (self, -1)
        labels = None if hp.fgsm_labels == "predicted" else y
        return fgsm(model, x, labels, eps, random_eps=hp.random_eps, check=False)

    # --- training -----------------------------------------------------------------------------------------

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        hp = self.hparams
        if hp.regime == "clean":
            return super().training_step(batch, batch_idx)
        x, y = batch
        m = x.shape[0]
        k = m if hp.regime == "pgd" else max(1, round(hp.adv_ratio * m))
        x = torch.cat([self.craft(x[:k], y[:k]), x[k:]])  # adversaries first, then the clean rest
        losses = F.cross_entropy(self(x), y, reduction="none", label_smoothing=hp.label_smoothing)  # (m,)
        if hp.regime == "pgd":
            loss = losses.mean()
        else:  # Kurakin et al.'s mixed loss
            loss = (hp.adv_weight * losses[:k].sum() + losses[k:].sum()) / (hp.adv_weight * k + (m - k))
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_epoch_start(self) -> None:
        self._epoch_t0 = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # the epoch's last batch, before validation and the epoch's checkpoint: the checkpoint holds the snapshot
        if batch_idx + 1 != self.trainer.num_training_batches:
            return
        self._epoch_s = time.perf_counter() - self._epoch_t0
        if self.hparams.regime == "gat" and (self.current_epoch + 1) % self.hparams.snapshot_every == 0:
            self.bag.add(self.net, self.current_epoch)

    def on_train_epoch_end(self) -> None:
        if self._epoch_s is not None:
            self.log("train/epoch_s", self._epoch_s)  # training batches only (no validation), this device

    # --- checkpoints ----------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["gat_bag"] = self.bag.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "gat_bag" in checkpoint:
            self.bag.load_state_dict(checkpoint["gat_bag"], device=self.device)

    def on_fit_start(self) -> None:
        # a bag restored before the module moved to its device
        self.bag.snapshots = [{k: v.to(self.device) for k, v in s.items()} for s in self.bag.snapshots]
