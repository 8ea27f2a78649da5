"""Data-free universal adversarial perturbations: one Linf-bounded perturbation per budget that fools a frozen model
on every image, learned on Data Impressions, on real training images, from the network alone (the data-free
GD-UAP baseline, below), or not at all (the random-noise control).

"Data Impressions: Mining Deep Models to Extract Samples for Data-free Applications", Nayak, Mopuri, Jain,
Chakraborty, TPAMI 2022: the impressions of a model stand in for its training data when crafting a UAP. The
objective is the fooling loss of Mopuri et al. (NAG, CVPR 2018; AAA, ECCV 2018), ``-log(1 - p_c(x + v))`` with
``c`` the model's prediction on the clean image (:func:`lit_modules.robustness.uap_objective.fooling_loss`; the
reason is in its docstring).

The algorithm, for every budget ``eps_e`` at once (batched: one perturbation per budget, a whole batch of images
per step, ``E x B`` forward passes in one call):

1. **perturb**: ``x_e = x + P(v_e)`` with ``P`` the projection onto the Linf ball of radius ``eps_e`` intersected
   with ``x + d in [0, 1]`` (:func:`lit_modules.robustness.uap_objective.project_linf_box`);
2. **fool**: minimise the mean fooling loss over the batch, summed over budgets (independent: ``v_e`` only
   touches its own copy of the batch, and Adam is element-wise);
3. **project**: after each Adam step, ``v_e`` back onto its Linf ball.

``v_e = eps_e * w_e`` with ``w_e`` in ``[-1, 1]`` (the parameter), so one learning rate moves every budget by the
same share of its ball and projecting ``v_e`` onto its ball is clamping ``w_e``. Under DDP ``w`` is an ordinary
parameter: its gradient is all-reduced (averaged), so with the per-rank batch mean every rank takes the step the
single process takes on the union of their batches.

**The data-free baseline** (``objective: feature_activation``, GD-UAP: Mopuri, Ganeshan, Babu, TPAMI 2018, arXiv
1801.08092) needs neither images nor impressions: the perturbation alone goes through the network and step 2
becomes *inflate*: minimise ``-sum_i log ||relu(f_i)||_2`` over the network's convolutional layers
(:func:`lit_modules.robustness.uap_objective.feature_activation_loss`). "Alone" as in the authors' code: their
data-free variant feeds a zero image plus ``v`` in the network's mean-subtracted input space, i.e. the mean image
plus ``v``; here the network's normalised input is ``v / std`` (``v`` itself for a network fed raw pixels). As
there, ``v`` starts uniform in the ball and (``saturation_rescale``) is halved when more than half of it sits on
the ball's edge and that share stopped changing (:func:`lit_modules.robustness.uap_objective.rescale_saturated`).
Its training data is :class:`datamodules.data_free.DataFreeDataModule` (``steps_per_epoch`` steps, no images; its
task gives the validation and test images); the fooling objective needs images (a
:class:`datamodules.transfer_sets.TransferSetDataModule` pool). Either one with the other's data is a one-line error.

Validation: fooling rate on the task's held-out training images. Test: fooling rate on the real test set of
each learned ``v_e`` and of random sign noise of the same Linf norm (``eps_e * sign(N(0, 1))``, the control).
Metrics ``{val,test}/fooling_rate_<eps>`` and ``test/noise_fooling_rate_<eps>``; the perturbations are logged as
an image (``uap/perturbations``: one column per budget, grey = 0, white = +eps, black = -eps) and as perturbed
test images (``uap/examples``).
"""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import Metric

from cvlab.errors import CvlabError
from cvlab.image_log import log_image_grid
from cvlab.task import check_task, task_of
from datamodules.data_free import DataFreeDataModule
from lit_modules.robustness.uap_objective import (
    check_budgets,
    feature_activation_loss,
    fooling_loss,
    project_linf_box,
    random_sign_noise,
    rescale_saturated,
)
from lit_modules.teacher import TeacherArg, load_teacher

OBJECTIVES = ("fooling", "feature_activation")


def check_objective_data(objective: str, data_free: bool, what: str) -> None:
    """The fooling objective needs training images, the feature-activation one none; one-line error otherwise."""
    if objective == "fooling" and data_free:
        raise CvlabError(f"objective 'fooling' learns on images but the training data is {what} (no images); give "
                         "a TransferSetDataModule pool (impressions or real images), or use objective: "
                         "feature_activation")
    if objective == "feature_activation" and not data_free:
        raise CvlabError(f"objective 'feature_activation' is data-free and would ignore the training images of {what}; "
                         "use data: datamodules.data_free.DataFreeDataModule (its task gives the validation and test "
                         "images)")


class FoolingRate(Metric):
    """Per-budget fooling rate with sum-reduced states: ``fooled (E,)`` and ``total``."""

    full_state_update = False

    def __init__(self, num_budgets: int) -> None:
        super().__init__()
        self.add_state("fooled", default=torch.zeros(num_budgets), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(()), dist_reduce_fx="sum")

    def update(self, clean_pred: Tensor, adv_pred: Tensor) -> None:  # (B,), (E, B)
        self.fooled += (adv_pred != clean_pred).sum(-1).float()
        self.total += clean_pred.numel()

    def compute(self) -> Tensor:
        return self.fooled / self.total.clamp_min(1)


class UniversalPerturbation(L.LightningModule):
    """Learn one universal perturbation per Linf budget against a frozen model (``cvlab fit``), test its fooling rate.

    Args:
        model: the network to fool, frozen: a cvlab checkpoint or TorchScript path, or a
            :class:`lit_modules.teacher.TeacherSpec` (its input contract gives the perturbation's shape).
        budgets: Linf budgets, each in [0, 1] (fractions of the pixel range): one perturbation per budget.
        lr: Adam learning rate on ``w = v / eps`` (a share of the ball per step).
        noise_seed: seeds the same-norm random-noise control.
        examples: perturbed test images logged per budget (0: none).
        objective: ``fooling`` (learned on images: impressions or real, ``-log(1 - p_c)``) or ``feature_activation``
            (data-free GD-UAP: no images; its data is a ``DataFreeDataModule``).
        saturation_rescale: halve ``v_e`` when it saturates (GD-UAP's rescaling; any objective).
    """

    def __init__(
        self,
        model: TeacherArg,
        budgets: list[float] = [0.1, 0.2, 0.3],  # noqa: B006  (a CLI default, never mutated)
        lr: float = 0.01,
        noise_seed: int = 0,
        examples: int = 8,
        objective: Literal["fooling", "feature_activation"] = "fooling",
        saturation_rescale: bool = False,
    ) -> None:
        super().__init__()
        check_budgets(budgets)
        if objective not in OBJECTIVES:
            raise CvlabError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
        self.save_hyperparameters()
        self.model = load_teacher(model)
        shape = self.model.input_shape
        if shape is None:
            raise CvlabError(f"model {model} has no input contract (in_channels, image_size); "
                             "give a TeacherSpec with them")
        self.register_buffer("eps", torch.tensor(budgets, dtype=torch.float32))  # (E,)
        # (E, C, H, W), v = eps * w; GD-UAP starts uniform in the ball (at 0 its loss may have no gradient)
        w0 = torch.rand(len(budgets), *shape) * 2 - 1 if objective == "feature_activation" else None
        self.w = nn.Parameter(torch.zeros(len(budgets), *shape) if w0 is None else w0)
        self.register_buffer("saturation", torch.zeros(len(budgets)), persistent=False)  # (E,) for the rescaling
        g = torch.Generator().manual_seed(noise_seed)
        self.register_buffer("noise", random_sign_noise((len(budgets), *shape), self.eps, g), persistent=False)
        self.val_fooling, self.test_fooling, self.test_noise = (FoolingRate(len(budgets)) for _ in range(3))

    # --- the perturbation ----------------------------------------------------------------------------------
    @property
    def perturbation(self) -> Tensor:
        """The universal perturbations ``v (E, C, H, W)``, each inside its Linf ball."""
        return self.eps.view(-1, 1, 1, 1) * self.w

    def perturb(self, x: Tensor, v: Tensor) -> Tensor:
        """``x (B, C, H, W)`` pixels, ``v (E, C, H, W)`` -> ``(E, B, C, H, W)``: each ``x + P(v_e)`` in [0, 1]."""
        return x.unsqueeze(0) + project_linf_box(v.unsqueeze(1), x.unsqueeze(0), self.eps.view(-1, 1, 1, 1, 1))

    def predict_perturbed(self, x: Tensor, v: Tensor) -> Tensor:
        """The model's logits ``(E, B, K)`` on every perturbed copy of the batch, in one forward pass."""
        xp = self.perturb(x, v)  # (E, B, C, H, W)
        return self.model(xp.flatten(0, 1)).unflatten(0, xp.shape[:2])

    def data_free_input(self, v: Tensor) -> Tensor:
        """The perturbations alone ``v (E, C, H, W)`` in the network's normalised input space: ``v / std`` (the
        mean image plus ``v``, normalised; ``v`` for a network fed raw pixels)."""
        std = self.model.normalization.std
        return v if std is None else v / std

    def setup(self, stage: str) -> None:
        task = task_of(self._trainer)
        if task is not None:
            check_task(f"model {self.hparams.model}", task, "use impressions and a test set of the model's own task",
                       num_classes=self.model.num_classes)
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if stage == "fit" and dm is not None:
            check_objective_data(self.hparams.objective, isinstance(dm, DataFreeDataModule), type(dm).__name__)

    # --- fit: perturb, fool, project -------------------------------------------------------------------------
    def training_step(self, batch: tuple[Tensor, Tensor] | int, batch_idx: int) -> Tensor:
        check_objective_data(self.hparams.objective, isinstance(batch, int), f"{type(batch).__name__} batches")
        if self.hparams.objective == "feature_activation":
            loss = feature_activation_loss(self.model.net, self.data_free_input(self.perturbation)).sum()  # (E,) summed
            self.log("train/loss", loss, prog_bar=True)
            if self.hparams.saturation_rescale:  # the share of v on the ball's edge, as of the previous step
                self.log("train/saturation", self.saturation.mean())
            return loss
        x, _ = batch  # labels unused: impressions have none, real images are fooled w.r.t. the model's prediction
        with torch.no_grad():
            clean = self.model(x).argmax(-1)  # (B,)
        logits = self.predict_perturbed(x, self.perturbation)  # (E, B, K)
        loss = fooling_loss(logits, clean.expand(len(self.eps), -1)).mean(1).sum()
        fooled = (logits.argmax(-1) != clean).float().mean()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/fooling_rate", fooled, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        with torch.no_grad():
            self.w.clamp_(-1.0, 1.0)  # v_e back onto its Linf ball of radius eps_e
            if self.hparams.saturation_rescale:
                w, self.saturation = rescale_saturated(self.w, self.saturation)
                self.w.copy_(w)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([self.w], lr=self.hparams.lr)

    # --- evaluation ------------------------------------------------------------------------------------------
    def _names(self, prefix: str) -> list[str]:
        return [f"{prefix}_{b:g}" for b in self.hparams.budgets]

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, _ = batch
        clean = self.model(x).argmax(-1)
        self.val_fooling.update(clean, self.predict_perturbed(x, self.perturbation).argmax(-1))

    def on_validation_epoch_end(self) -> None:
        rates = self.val_fooling.compute()
        for name, r in zip(self._names("val/fooling_rate"), rates, strict=True):
            self.log(name, r)
        self.log("val/fooling_rate", rates.mean(), prog_bar=True)
        self.val_fooling.reset()

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, _ = batch
        clean = self.model(x).argmax(-1)
        self.test_fooling.update(clean, self.predict_perturbed(x, self.perturbation).argmax(-1))
        self.test_noise.update(clean, self.predict_perturbed(x, self.noise).argmax(-1))
        n = self.hparams.examples
        if batch_idx == 0 and n:
            shown = torch.cat([x[:n].unsqueeze(0), self.perturb(x[:n], self.perturbation)]).flatten(0, 1)
            log_image_grid(self.trainer, "uap/examples", shown, nrow=min(n, x.shape[0]),
                           caption="row 1: clean test images; then one row per budget " + str(self.hparams.budgets))

    def on_test_epoch_end(self) -> None:
        for metric, prefix in ((self.test_fooling, "test/fooling_rate"), (self.test_noise, "test/noise_fooling_rate")):
            rates = metric.compute()
            for name, r in zip(self._names(prefix), rates, strict=True):
                self.log(name, r)
            metric.reset()

    def on_train_end(self) -> None:
        self._log_perturbations()

    def on_test_end(self) -> None:
        self._log_perturbations()

    def _log_perturbations(self) -> None:
        # w in [-1, 1] -> [0, 1]: grey is no change, white +eps_e, black -eps_e (each budget on its own scale)
        log_image_grid(self.trainer, "uap/perturbations", (0.5 + 0.5 * self.w.detach()).float(), nrow=len(self.eps),
                       caption="one per budget " + str(self.hparams.budgets) + "; grey 0, white +eps, black -eps")
