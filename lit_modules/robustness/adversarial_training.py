"""Adversarial training of any cvlab network: clean, FGSM-AT, PGD-AT, fast-AT and Gray-box Adversarial Training.

:class:`AdversarialTraining` is a :class:`lit_modules.ClassifierModule` whose ``training_step`` trains on the
adversaries of its ``adversary``, a small strategy object with its own hyper-parameters (``craft(model, x, y,
eps)``, how many of a batch it attacks, the loss), built from the attack registry
(:func:`lit_modules.robustness.attacks.make_attack`); every checkpoint is a teacher for every method.

- :class:`CleanTraining`: cross-entropy on clean images (the undefended baseline).
- :class:`FGSMTraining` (FGSM-AT; Goodfellow et al. 2015, Kurakin et al., "Adversarial Machine Learning at Scale",
  ICLR 2017, arXiv 1611.01236): in each batch a fraction ``adv_ratio`` (k of m images) is replaced by FGSM
  adversaries of the current model, and the loss is Kurakin et al.'s mixed loss
  ``(sum_clean CE + adv_weight * sum_adv CE) / (m - k + adv_weight * k)``.
- :class:`PGDTraining` (PGD-AT; Madry et al., ICLR 2018, arXiv 1706.06083): every image replaced by its PGD
  adversary (``steps`` steps of ``alpha`` from a random start), plain CE.
- :class:`FastTraining` (RS-FGSM, "fast is better than free"; Wong, Rice, Kolter, ICLR 2020, arXiv 2001.03994):
  every image replaced by one FGSM step of ``alpha`` (default 1.25 eps: 0.375 at MNIST's eps 0.3) from a uniform
  random start in the eps ball, projected back onto the ball; true labels, plain CE. With Wong's one-cycle lr
  (``lr_schedule: cyclic``) and robust validation (below) to catch catastrophic overfitting.

:class:`GrayBoxAdversarialTraining` (GAT; Vivek B.S., Mopuri, Babu, ECCV 2018, arXiv 1808.01753) is its own system:
FGSM-AT's adversary, but a share of each batch's adversaries is crafted on a *bag of snapshots* of the model taken
earlier in the same run, so the model cannot escape its adversaries by learning to make its own gradients weak.
``AdversarialTrainer`` (``regime: clean | fgsm | pgd | fast | gat``) is the old name, kept one release.

Choices where the GAT paper's text could not be checked (all configurable):

- adversary: :class:`FGSMTraining` with ``labels: predicted`` (the crafting model's own predictions: no label
  leaking) and ``random_eps``: per-image eps uniform in (0, eps] (FGSM-AT uses the same adversary, so the two
  systems differ only in the crafting model).
- loss: ``adv_ratio`` 0.5 and ``adv_weight`` 0.3 (Kurakin et al.'s k = m / 2 and lambda = 0.3); the
  adversarial images are the first ``round(adv_ratio * m)`` of each device's batch (batches are shuffled).
- snapshots (``snapshot_steps``): ``0``: one at the end of every ``snapshot_every`` epochs (taken at the epoch's
  last training batch, so the epoch's checkpoint holds it); ``n > 0``: one of the model at every global step
  that is a positive multiple of ``n`` (taken before that step's adversaries are crafted: the snapshot of step
  k holds the weights after k updates), so several per epoch from the first steps of training, before a
  single-step defence has learned to mask its gradients (FGSM-AT on MNIST masks within its first epoch).
- the bag (``bag_size``, ``bag_refresh``): ``fifo`` keeps the latest snapshots; ``reservoir`` a uniform sample
  of all taken so far (early ones stay); ``first`` the first ``bag_size`` (see :class:`SnapshotBag`).
- seeding (``snapshot_share``): of each batch's ``k`` adversaries, the first ``round(snapshot_share * k)`` are
  crafted on one snapshot drawn uniformly from the bag, the rest on the current model; the draw comes from a
  generator seeded by ``(seed, global_step)``, so every device draws the same snapshot and a resumed run draws
  what the uninterrupted one would have. ``last_seed`` records the step and bag index of the last draw.
- warm-up: while the bag is empty (and, with epoch snapshots, for the first ``warmup_epochs``, default
  ``snapshot_every``) GAT is FGSM-AT on the current model; with epoch snapshots ``warmup_epochs: 0`` and an
  empty bag is an error (nothing to seed from).

The snapshots live in the checkpoint (``on_save_checkpoint``), so a resumed run keeps its bag.

Robust validation (any regime, ``robust_val_images > 0``): the first ``robust_val_images`` validation images are
attacked by PGD (``robust_val_steps`` steps of ``robust_val_alpha``, ``robust_val_restarts`` random starts drawn
from a generator seeded by ``seed``, so every validation sees the same images and the same starts) and the
accuracy is logged as ``val/robust_acc`` (``ModelCheckpoint``/``EarlyStopping`` can monitor it; ``mode: max``).
With ``restore_best: true`` the module keeps the weights of the best ``val/robust_acc`` so far (in memory and in
the checkpoint, so resume keeps them) and loads them back when training ends, so **the final weights** (what
``test`` after ``fit`` evaluates) **are the restored best-robust-on-validation weights**, not the last step's;
``val/robust_acc_best`` and ``val/best_epoch`` record which. ``last.ckpt`` keeps the last step's weights (it is
for resuming) with the best ones under ``robust_best``.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from cvlab.errors import CvlabError
from cvlab.seeding import mix_seed
from lit_modules.classifier import ClassifierModule
from lit_modules.nets import InputNormalization
from lit_modules.robustness.attacks import Model, check_eps, make_attack

Regime = Literal["clean", "fgsm", "pgd", "fast", "gat"]


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


BagRefresh = Literal["fifo", "reservoir", "first"]


class SnapshotBag:
    """Up to ``size`` snapshots of a network (detached state_dict copies), each tagged with the epoch and the
    global step it was taken at, refreshed by ``refresh``:

    - ``fifo``: the latest ``size`` (oldest dropped first);
    - ``reservoir``: a uniform sample of every snapshot taken so far (Vitter's algorithm R; the n-th snapshot
      replaces a random slot with probability size / n, drawn from a generator seeded by ``(seed, n)``, so a
      resumed run keeps what the uninterrupted one keeps): early snapshots stay in the bag all run long;
    - ``first``: the first ``size`` snapshots, kept for the whole run.
    """

    def __init__(self, size: int, refresh: BagRefresh = "fifo", seed: int = 0) -> None:
        if size < 1:
            raise CvlabError(f"bag_size must be >= 1, got {size}")
        if refresh not in ("fifo", "reservoir", "first"):
            raise CvlabError(f"bag_refresh must be fifo, reservoir or first; got {refresh!r}")
        self.size, self.refresh, self.seed = size, refresh, seed
        self.snapshots: list[dict[str, Tensor]] = []
        self.epochs: list[int] = []
        self.steps: list[int] = []
        self.taken = 0  # snapshots offered to the bag so far (kept or not)
        self.last_step = -1  # the global step of the last one offered

    def __len__(self) -> int:
        return len(self.snapshots)

    def add(self, net: nn.Module, epoch: int, step: int = -1) -> None:
        self.taken += 1
        self.last_step = step
        slot = len(self.snapshots)  # a free slot: append
        if slot >= self.size:
            if self.refresh == "first":
                return
            if self.refresh == "fifo":
                self.snapshots.pop(0), self.epochs.pop(0), self.steps.pop(0)
                slot = self.size - 1
            else:  # reservoir: keep the n-th snapshot with probability size / n, in a uniformly drawn slot
                g = torch.Generator().manual_seed(mix_seed(self.seed, self.taken))
                slot = int(torch.randint(self.taken, (), generator=g))
                if slot >= self.size:
                    return
                self.snapshots.pop(slot), self.epochs.pop(slot), self.steps.pop(slot)
        self.snapshots.insert(slot, {k: v.detach().clone() for k, v in net.state_dict().items()})
        self.epochs.insert(slot, epoch)
        self.steps.insert(slot, step)

    def get(self, i: int) -> dict[str, Tensor]:
        if not self.snapshots:
            raise EmptyBagError(
                "the GAT snapshot bag is empty: no snapshot has been taken yet (one is taken every snapshot_every "
                "epochs); use warmup_epochs >= snapshot_every, or resume from a checkpoint that has snapshots"
            )
        return self.snapshots[i]

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": list(self.epochs), "steps": list(self.steps), "taken": self.taken,
                "last_step": self.last_step,
                "snapshots": [{k: v.cpu() for k, v in s.items()} for s in self.snapshots]}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str = "cpu") -> None:
        self.epochs = [int(e) for e in state["epochs"]]
        self.steps = [int(e) for e in state.get("steps", [-1] * len(self.epochs))]
        self.taken = int(state.get("taken", len(self.epochs)))
        self.last_step = int(state.get("last_step", -1))
        self.snapshots = [{k: v.to(device) for k, v in s.items()} for s in state["snapshots"]]


# --- the training adversaries: one small object per regime ---------------------------------------------------------


class TrainingAdversary:
    """How a training batch is attacked: the first :meth:`count` images of each batch are replaced by
    :meth:`craft`'s adversaries and :meth:`loss` reduces the per-image cross-entropy. Hyper-parameters are the
    constructor's (plain values, so a checkpoint stores them as :meth:`config`)."""

    def count(self, m: int) -> int:
        """How many of a batch of ``m`` images are attacked (the first ones; batches are shuffled)."""
        return m

    def craft(self, model: Model, x: Tensor, y: Tensor, eps: float, eps_max: float) -> Tensor:
        """Adversarial pixels of ``x`` against ``model`` at this step's ``eps`` (``eps_max``: the run's full eps,
        which the step sizes are given for)."""
        raise NotImplementedError

    def loss(self, losses: Tensor, k: int) -> Tensor:
        """The batch loss from per-image CE ``losses (m,)``, of which the first ``k`` are adversarial."""
        return losses.mean()

    def config(self) -> dict[str, Any]:
        """``{class_path, init_args}``: LightningCLI's form, what the system's hyper-parameters hold."""
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": dict(vars(self))}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class CleanTraining(TrainingAdversary):
    """No adversary: cross-entropy on clean images (the undefended baseline)."""

    def count(self, m: int) -> int:
        return 0


class FGSMTraining(TrainingAdversary):
    """FGSM-AT (Goodfellow et al., ICLR 2015; Kurakin et al., "Adversarial Machine Learning at Scale", ICLR 2017,
    arXiv 1611.01236): a fraction ``adv_ratio`` of each batch (k of m) replaced by FGSM adversaries, and Kurakin's
    mixed loss ``(sum_clean CE + adv_weight * sum_adv CE) / (m - k + adv_weight * k)``.

    Args:
        adv_ratio: the fraction of each batch replaced by adversaries (Kurakin's k / m).
        adv_weight: the weight lambda of the adversarial images in the mixed loss.
        labels: ``predicted`` (the crafting model's own predictions: no label leaking) or ``true``.
        random_eps: a per-image eps uniform in (0, eps] instead of eps.
    """

    def __init__(self, adv_ratio: float = 0.5, adv_weight: float = 0.3,
                 labels: Literal["predicted", "true"] = "predicted", random_eps: bool = True) -> None:
        if not 0.0 < adv_ratio <= 1.0 or adv_weight < 0:
            raise CvlabError(f"need 0 < adv_ratio <= 1 and adv_weight >= 0; got {adv_ratio}, {adv_weight}")
        if labels not in ("predicted", "true"):
            raise CvlabError(f"FGSM labels must be predicted or true; got {labels!r}")
        self.adv_ratio, self.adv_weight, self.labels, self.random_eps = adv_ratio, adv_weight, labels, random_eps

    def count(self, m: int) -> int:
        return max(1, round(self.adv_ratio * m))

    def craft(self, model: Model, x: Tensor, y: Tensor, eps: float, eps_max: float) -> Tensor:
        attack = make_attack("fgsm", eps, random_eps=self.random_eps)
        return attack(model, x, None if self.labels == "predicted" else y)

    def loss(self, losses: Tensor, k: int) -> Tensor:
        m, w = losses.shape[0], self.adv_weight
        return (w * losses[:k].sum() + losses[k:].sum()) / (w * k + (m - k))


class PGDTraining(TrainingAdversary):
    """PGD-AT (Madry et al., ICLR 2018, arXiv 1706.06083): every image replaced by its PGD adversary (``steps``
    steps of ``alpha`` from a random start; alpha ``None``: ``2.5 * eps / steps``; Madry's MNIST: 40 of 0.01),
    plain CE. Under an eps ramp the step scales with eps."""

    def __init__(self, steps: int = 40, alpha: float | None = 0.01) -> None:
        if steps < 1:
            raise CvlabError(f"PGD-AT needs steps >= 1; got {steps}")
        self.steps, self.alpha = steps, alpha

    def craft(self, model: Model, x: Tensor, y: Tensor, eps: float, eps_max: float) -> Tensor:
        alpha = None if self.alpha is None else self.alpha * eps / eps_max if eps_max > 0 else self.alpha
        return make_attack("pgd", eps, steps=self.steps, alpha=alpha)(model, x, y)


class FastTraining(TrainingAdversary):
    """Fast AT, RS-FGSM ("fast is better than free"; Wong, Rice, Kolter, ICLR 2020, arXiv 2001.03994): every image
    replaced by one FGSM step of ``alpha`` (``None``: 1.25 eps, 0.375 at MNIST's eps 0.3) from a uniform random start
    in the eps ball, projected back onto the ball; true labels, plain CE. With Wong's one-cycle lr
    (``lr_schedule: cyclic``) and robust validation to catch catastrophic overfitting."""

    def __init__(self, alpha: float | None = None) -> None:
        self.alpha = alpha

    def craft(self, model: Model, x: Tensor, y: Tensor, eps: float, eps_max: float) -> Tensor:
        alpha = 1.25 * eps if self.alpha is None else self.alpha * eps / eps_max if eps_max > 0 else 0.0
        return make_attack("pgd", eps, steps=1, alpha=alpha)(model, x, y)


def as_adversary(spec: TrainingAdversary | dict[str, Any] | None, default: TrainingAdversary) -> TrainingAdversary:
    """A :class:`TrainingAdversary` from itself, from its :meth:`~TrainingAdversary.config` (hyper-parameters read
    back from a checkpoint) or ``None`` (``default``)."""
    if spec is None:
        return default
    if isinstance(spec, TrainingAdversary):
        return spec
    if isinstance(spec, dict) and "class_path" in spec:
        from lit_modules.nets.registry import import_class

        cls = import_class(str(spec["class_path"]))
        if isinstance(cls, type) and issubclass(cls, TrainingAdversary):
            return cls(**dict(spec.get("init_args") or {}))
    raise CvlabError(f"adversary must be a training adversary (CleanTraining, FGSMTraining, PGDTraining, "
                     f"FastTraining) or its {{class_path, init_args}}; got {spec!r}")


# --- the systems -----------------------------------------------------------------------------------------------------


class AdversarialTraining(ClassifierModule):
    """Adversarial training of any network: every batch attacked by ``adversary`` (see the module docstring).

    Args:
        adversary: the regime: :class:`CleanTraining`, :class:`FGSMTraining` (the default), :class:`PGDTraining`
            or :class:`FastTraining`, with its own hyper-parameters.
        eps: the Linf budget in [0, 1] pixel units (0.3 MNIST, 0.1/0.2 Fashion-MNIST, 8/255 CIFAR-10).
        eps_warmup_epochs: the training adversary's eps grows linearly from 0 to ``eps`` over this many epochs
            (0: the full eps from the first step); a small network trained by PGD at MNIST's eps 0.3 from the
            first step can stay at chance (LeNet-5, 3 epochs: 11% accuracy).
        seed: seeds the robust validation's random starts (and GAT's snapshot draws).
        robust_val_images: PGD-attack this many of the first validation images each validation and log
            ``val/robust_acc`` (0: off).
        robust_val_steps, robust_val_alpha, robust_val_restarts: that PGD (alpha ``None``: 2.5 * eps / steps).
        restore_best: keep the best ``val/robust_acc`` weights and load them back at the end of training
            (needs ``robust_val_images > 0``).
        **kwargs: :class:`ClassifierModule`'s arguments (``arch``, optimizer, schedule, ...).
    """

    def __init__(
        self,
        adversary: TrainingAdversary | None = None,
        eps: float = 0.3,
        eps_warmup_epochs: float = 0.0,
        seed: int = 0,
        robust_val_images: int = 0,
        robust_val_steps: int = 20,
        robust_val_alpha: float | None = None,
        robust_val_restarts: int = 1,
        restore_best: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.adversary = as_adversary(adversary, FGSMTraining())
        self.save_hyperparameters(ignore=["adversary"])
        self.hparams["adversary"] = self.adversary.config()  # plain values: checkpoints load weights-only
        if robust_val_images < 0 or robust_val_steps < 1 or robust_val_restarts < 1:
            raise CvlabError(f"need robust_val_images >= 0, robust_val_steps >= 1, robust_val_restarts >= 1; got "
                             f"{robust_val_images}, {robust_val_steps}, {robust_val_restarts}")
        if restore_best and robust_val_images == 0:
            raise CvlabError("restore_best keeps the best val/robust_acc weights: set robust_val_images > 0 too")
        check_eps(eps)
        self._epoch_t0 = 0.0
        self._epoch_s: float | None = None
        self._robust = torch.zeros(2)  # (correct, attacked) of this validation, on the module's device
        self.best_robust: dict[str, Any] | None = None  # {"acc", "epoch", "state"}: restore_best's weights

    def train_eps(self) -> float:
        """This step's eps: ``eps``, ramped up linearly over the first ``eps_warmup_epochs``."""
        hp = self.hparams
        if hp.eps_warmup_epochs <= 0 or self._trainer is None:
            return hp.eps
        ramp = (self.global_step + 1) / (hp.eps_warmup_epochs * max(1, self.trainer.num_training_batches))
        return hp.eps * min(1.0, ramp)

    def craft(self, x: Tensor, y: Tensor) -> Tensor:
        """Adversarial pixels of ``x`` for this step (gradients of the crafting model only)."""
        return self.adversary.craft(self, x, y, self.train_eps(), self.hparams.eps)

    # --- training -----------------------------------------------------------------------------------------

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        k = self.adversary.count(x.shape[0])
        if k == 0:
            return super().training_step(batch, batch_idx)
        x = torch.cat([self.craft(x[:k], y[:k]), x[k:]])  # adversaries first, then the clean rest
        losses = F.cross_entropy(self(x), y, reduction="none",
                                 label_smoothing=self.hparams.label_smoothing)  # (m,)
        loss = self.adversary.loss(losses, k)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_epoch_start(self) -> None:
        self._epoch_t0 = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx + 1 == self.trainer.num_training_batches:
            self._epoch_s = time.perf_counter() - self._epoch_t0

    def on_train_epoch_end(self) -> None:
        if self._epoch_s is not None:
            self.log("train/epoch_s", self._epoch_s)  # training batches only (no validation), this device

    # --- robust validation ----------------------------------------------------------------------------------

    def robust_val_attack(self, x: Tensor, y: Tensor, batch_idx: int) -> Tensor:
        """The robust validation's PGD adversaries of ``x`` (a fixed generator per batch: every validation
        attacks its images from the same random starts)."""
        hp = self.hparams
        g = torch.Generator(device=x.device).manual_seed(mix_seed(hp.seed, batch_idx))
        attack = make_attack("pgd", hp.eps, steps=hp.robust_val_steps, alpha=hp.robust_val_alpha,
                             restarts=hp.robust_val_restarts, generator=g)
        return attack(self, x, y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        n = self.hparams.robust_val_images
        if n == 0:
            return
        x, y = batch
        start = batch_idx * x.shape[0]  # validation batches are in order and of one size (the last may be short)
        if start >= n:
            return
        x, y = x[: n - start], y[: n - start]
        with torch.no_grad():
            hit = (self(self.robust_val_attack(x, y, batch_idx)).argmax(-1) == y).sum()
        n_seen = torch.tensor(float(y.shape[0]), device=x.device)
        self._robust = self._robust.to(x.device) + torch.stack([hit.float(), n_seen])

    def on_validation_epoch_end(self) -> None:
        if self.hparams.robust_val_images == 0:
            return
        counts = self._robust.to(self.device)
        if self._trainer is not None:
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        self._robust = torch.zeros(2, device=self.device)
        if float(counts[1]) == 0:
            return
        acc = float(counts[0] / counts[1])  # one host sync per validation
        self.log("val/robust_acc", acc, sync_dist=False)
        if not self.hparams.restore_best or (self._trainer is not None and self.trainer.sanity_checking):
            return
        if self.best_robust is None or acc > self.best_robust["acc"]:
            self.best_robust = {"acc": acc, "epoch": self.current_epoch,
                                "state": {k: v.detach().to("cpu", copy=True) for k, v in self.net.state_dict().items()}}
        self.log("val/robust_acc_best", self.best_robust["acc"], sync_dist=False)
        self.log("val/best_epoch", float(self.best_robust["epoch"]), sync_dist=False)

    def on_train_end(self) -> None:
        if self.hparams.restore_best and self.best_robust is not None:
            self.net.load_state_dict(self.best_robust["state"])  # the final weights: best val/robust_acc

    # --- checkpoints ----------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.best_robust is not None:
            checkpoint["robust_best"] = self.best_robust

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "robust_best" in checkpoint:
            self.best_robust = checkpoint["robust_best"]


class GrayBoxAdversarialTraining(AdversarialTraining):
    """Gray-box Adversarial Training (Vivek B.S., Mopuri, Babu, ECCV 2018, arXiv 1808.01753): ``adversary``'s
    adversaries (FGSM-AT's by default), a share of them crafted on a bag of snapshots of the same run (see the
    module docstring for the snapshot policy and the choices the paper's text leaves open).

    Args:
        adversary: the adversary crafted on the snapshots and the current model (default :class:`FGSMTraining`:
            random eps, predicted labels, half of each batch, weight 0.3).
        snapshot_steps: global steps between snapshots (0: epoch-end snapshots, every ``snapshot_every`` epochs).
        snapshot_every: with ``snapshot_steps: 0``: epochs between snapshots.
        bag_size: snapshots kept.
        bag_refresh: ``fifo`` (the latest), ``reservoir`` (a uniform sample of all) or ``first``.
        snapshot_share: share of each batch's adversaries crafted on a snapshot (the rest: the current model).
        warmup_epochs: with epoch snapshots: epochs of plain ``adversary`` training on the current model before the
            bag is used (``None``: ``snapshot_every``, when the first snapshot exists).
        **kwargs: :class:`AdversarialTraining`'s arguments (``eps``, ``seed``: the per-step snapshot draw, ...).
    """

    def __init__(
        self,
        adversary: TrainingAdversary | None = None,
        snapshot_steps: int = 0,
        snapshot_every: int = 1,
        bag_size: int = 5,
        bag_refresh: BagRefresh = "fifo",
        snapshot_share: float = 0.5,
        warmup_epochs: int | None = None,
        **kwargs: Any,
    ) -> None:
        if "current_prob" in kwargs:  # checkpoints before snapshot_share: a per-batch draw of the same expected share
            snapshot_share = 1.0 - float(kwargs.pop("current_prob"))
        super().__init__(adversary=adversary, **kwargs)
        self.hparams["snapshot_share"] = snapshot_share
        if not 0.0 <= snapshot_share <= 1.0:
            raise CvlabError(f"need 0 <= snapshot_share <= 1; got {snapshot_share}")
        if snapshot_steps < 0 or snapshot_every < 1:
            raise CvlabError(f"need snapshot_steps >= 0 and snapshot_every >= 1; got {snapshot_steps}, "
                             f"{snapshot_every}")
        self.bag = SnapshotBag(bag_size, bag_refresh, self.hparams.seed)
        self.last_seed: tuple[int, int] | None = None  # (global step, bag index) of the last snapshot drawn
        self.snapshots_on = True  # False only for the deprecated AdversarialTrainer's non-GAT regimes

    def seed_model(self) -> tuple[nn.Module, int]:
        """The snapshot this batch's snapshot share is crafted on, and its bag index; ``(self, -1)``: the
        current model (during the warm-up, or while the bag is empty with step snapshots)."""
        hp = self.hparams
        if hp.snapshot_steps == 0:
            warmup = hp.snapshot_every if hp.warmup_epochs is None else hp.warmup_epochs
            if self.current_epoch < warmup:
                return self, -1
            if len(self.bag) == 0:
                self.bag.get(0)  # raises EmptyBagError with what to do
        elif len(self.bag) == 0:
            return self, -1
        g = torch.Generator().manual_seed(mix_seed(hp.seed, self.global_step))  # CPU: no device sync
        i = int(torch.randint(len(self.bag), (), generator=g))
        self.last_seed = (self.global_step, i)
        return SnapshotModel(self.net, self.normalize, self.bag.get(i)), i

    def craft(self, x: Tensor, y: Tensor) -> Tensor:
        """The first ``round(snapshot_share * k)`` adversaries crafted on a snapshot, the rest on the current model."""
        if not self.snapshots_on:
            return super().craft(x, y)
        eps, eps_max = self.train_eps(), self.hparams.eps
        model, i = self.seed_model()
        if i < 0:
            return self.adversary.craft(self, x, y, eps, eps_max)
        ks = round(self.hparams.snapshot_share * x.shape[0])
        parts = [self.adversary.craft(model, x[:ks], y[:ks], eps, eps_max)] if ks > 0 else []
        if ks < x.shape[0]:
            parts.append(self.adversary.craft(self, x[ks:], y[ks:], eps, eps_max))
        return torch.cat(parts)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # step snapshots: the model at step k (after k updates), before step k crafts its adversaries
        k, n = self.global_step, self.hparams.snapshot_steps
        if self.snapshots_on and n > 0 and k > 0 and k % n == 0 and k != self.bag.last_step:
            self.bag.add(self.net, self.current_epoch, k)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # the epoch's last batch, before validation and the epoch's checkpoint: the checkpoint holds the snapshot
        super().on_train_batch_end(outputs, batch, batch_idx)
        hp = self.hparams
        if (self.snapshots_on and batch_idx + 1 == self.trainer.num_training_batches and hp.snapshot_steps == 0
                and (self.current_epoch + 1) % hp.snapshot_every == 0):
            self.bag.add(self.net, self.current_epoch, self.global_step)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["gat_bag"] = self.bag.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if "gat_bag" in checkpoint:
            self.bag.load_state_dict(checkpoint["gat_bag"], device=self.device)

    def on_fit_start(self) -> None:
        # a bag restored before the module moved to its device
        self.bag.snapshots = [{k: v.to(self.device) for k, v in s.items()} for s in self.bag.snapshots]


# --- the old name, one release ---------------------------------------------------------------------------------------

_NEW_NAMES = {"clean": "AdversarialTraining with adversary CleanTraining",
              "fgsm": "AdversarialTraining with adversary FGSMTraining",
              "pgd": "AdversarialTraining with adversary PGDTraining",
              "fast": "AdversarialTraining with adversary FastTraining",
              "gat": "GrayBoxAdversarialTraining"}


class AdversarialTrainer(GrayBoxAdversarialTraining):
    """Deprecated (one release): the old one-class system, ``regime`` choosing the adversary. ``regime: gat`` is
    :class:`GrayBoxAdversarialTraining`; the others are :class:`AdversarialTraining` with :class:`CleanTraining`,
    :class:`FGSMTraining`, :class:`PGDTraining` or :class:`FastTraining`. Old configs and checkpoints keep working
    (with a warning that names the new class)."""

    def __init__(
        self,
        regime: Regime = "fgsm",
        adv_ratio: float = 0.5,
        adv_weight: float = 0.3,
        fgsm_labels: Literal["predicted", "true"] = "predicted",
        random_eps: bool = True,
        pgd_steps: int = 40,
        pgd_alpha: float | None = 0.01,
        fast_alpha: float | None = None,
        **kwargs: Any,
    ) -> None:
        if regime not in _NEW_NAMES:
            raise CvlabError(f"regime must be one of clean, fgsm, pgd, fast, gat; got {regime!r}")
        warnings.warn(f"AdversarialTrainer is deprecated and goes in the next release; regime {regime!r} is now "
                      f"lit_modules.robustness.{_NEW_NAMES[regime]}", FutureWarning, stacklevel=2)
        kwargs.pop("adversary", None)  # a checkpoint of this class stores it too; the regime's arguments define it
        fgsm_at = FGSMTraining(adv_ratio, adv_weight, fgsm_labels, random_eps)
        adversary = {"clean": CleanTraining(), "fgsm": fgsm_at, "gat": fgsm_at,
                     "pgd": PGDTraining(pgd_steps, pgd_alpha), "fast": FastTraining(fast_alpha)}[regime]
        super().__init__(adversary=adversary, **kwargs)
        self.snapshots_on = regime == "gat"
