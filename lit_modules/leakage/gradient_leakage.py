"""The math of gradient leakage, batched over independent trials (leading dimension ``T``).

* DLG: "Deep Leakage from Gradients", Zhu, Liu, Han, NeurIPS 2019 (arXiv 1906.08935).
* iDLG: "iDLG: Improved Deep Leakage from Gradients", Zhao, Mopuri, Bilen, arXiv 2001.02610.

Threat model: a victim computes the gradient of its training loss on private examples and shares it;
the attacker knows the architecture and the weights (:class:`StackedVictims`) and the shared gradient,
never the examples. The attacker finds dummy inputs whose gradient matches (:func:`gradient_distance`),
with the label extracted from the gradient (iDLG, :func:`extract_labels_from_gradients`) or optimised as
soft-label logits jointly with the input (DLG).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from cvlab.errors import CvlabError
from lit_modules.nets import classifier_layer, features_and_logits

Method = Literal["idlg", "dlg"]


class VictimAssumptionError(CvlabError):
    """The victim breaks iDLG's assumption (a final linear layer fed by non-negative activations)."""


# --- label extraction (iDLG, Sec. 3.1) ---------------------------------------------------------------
def extract_labels_from_gradients(fc_weight_grad: Tensor, batch_size: int = 1) -> Tensor:
    """Labels from the gradient of the last linear layer's weight, ``(..., K, D)`` -> ``(..., batch_size)``.

    With cross-entropy, ``dL/dW_k = (p_k - y_k) h`` summed over the batch; with non-negative features
    ``h`` only the rows of classes in the batch can have a negative sum, so for one example the label is
    ``argmin_k sum_j dL/dW_kj`` (iDLG). For ``batch_size > 1`` (an extension): the classes with a negative
    row sum, most negative first; when fewer than ``batch_size`` rows are negative, the remaining
    labels repeat the most negative class (a count estimate, not guaranteed).
    """
    if fc_weight_grad.dim() < 2:
        raise ValueError(f"expected a weight gradient (..., K, D), got shape {tuple(fc_weight_grad.shape)}")
    rows = fc_weight_grad.sum(-1)  # (..., K)
    order = rows.argsort(-1)  # most negative first
    n_neg = (rows < 0).sum(-1, keepdim=True).clamp(1, batch_size)  # (..., 1)
    j = torch.arange(batch_size, device=rows.device)
    ranked = order[..., j.clamp(max=rows.shape[-1] - 1)]  # (..., B)
    return torch.where(j < n_neg, ranked, order[..., :1])


def check_label_extraction_assumptions(net: nn.Module, example: Tensor) -> None:
    """Raise :class:`VictimAssumptionError` unless ``net(x) == fc(features(x))`` with a linear ``fc`` and
    non-negative features on ``example`` ``(B, C, H, W)``: the conditions of iDLG's label extraction."""
    name = type(net).__name__
    fc = classifier_layer(net)
    if fc is None:
        raise VictimAssumptionError(
            f"victim {name} has no final linear layer: iDLG reads the label from that layer's weight gradient; "
            "use a network that ends in an nn.Linear (e.g. the zoo's lenet_sigmoid) or method: dlg"
        )
    with torch.no_grad():
        try:
            h, out = features_and_logits(net, example)
        except TypeError as e:
            raise VictimAssumptionError(
                f"victim {name}: {e}, so iDLG's conditions cannot be checked; use method: dlg") from None
        if not torch.allclose(out, fc(h), atol=1e-5, rtol=1e-4):
            raise VictimAssumptionError(
                f"victim {name}'s output is not its final linear layer applied to its features: the linear layer "
                "must be its last operation for iDLG's label extraction; use method: dlg"
            )
        if h.min() < 0:
            raise VictimAssumptionError(
                f"victim {name} feeds negative activations (min {h.min().item():.3g}) into its last layer: iDLG's "
                "label extraction needs non-negative ones (sigmoid, ReLU); use such a victim or method: dlg"
            )


# --- victims -----------------------------------------------------------------------------------------
@dataclass
class StackedVictims:
    """``T`` networks of one architecture, their parameters stacked ``(T, ...)``, called with ``vmap``."""

    base: nn.Module  # the architecture (its own weights are never used)
    params: dict[str, Tensor]  # name -> (T, ...)
    fc_weight: str  # the name of the final linear layer's weight

    @classmethod
    def from_nets(cls, nets: Sequence[nn.Module]) -> StackedVictims:
        if isinstance(nets[0], torch.jit.ScriptModule):
            raise VictimAssumptionError(
                "a TorchScript victim cannot be attacked here: the batched attack calls the victim functionally "
                "(torch.func), which TorchScript does not support; give the network's class and a state_dict"
            )
        params, _ = stack_module_state(list(nets))
        layer = classifier_layer(nets[0])
        if layer is None:
            raise VictimAssumptionError(
                f"victim {type(nets[0]).__name__} has no final nn.Linear (iDLG reads labels from it)")
        fc = layer.weight
        name = next(n for n, p in nets[0].named_parameters() if p is fc)
        return cls(nets[0], {k: v.detach() for k, v in params.items()}, name)

    def select(self, ids: Tensor) -> StackedVictims:
        """The victims of trials ``ids``."""
        return StackedVictims(self.base, {k: v[ids] for k, v in self.params.items()}, self.fc_weight)

    def logits(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """``x`` ``(T, B, C, H, W)`` -> ``(T, B, K)``, trial ``t`` through network ``t``."""
        return vmap(lambda p, xi: functional_call(self.base, p, (xi,)))(params, x)

    def gradients(self, x: Tensor, soft_labels: Tensor, create_graph: bool = False) -> list[Tensor]:
        """Per-trial gradient of the mean cross-entropy over each trial's batch, ``[(T, ...)]`` per parameter.

        ``soft_labels`` ``(T, B, K)``: probabilities (one-hot for true or extracted labels).
        """
        params = {k: v.detach().requires_grad_(True) for k, v in self.params.items()}
        logp = self.logits(params, x).log_softmax(-1)
        loss = -(soft_labels * logp).sum(-1).mean(-1)  # (T,)
        # trials share no parameter, so the gradient of the sum is each trial's own gradient
        return list(torch.autograd.grad(loss.sum(), list(params.values()), create_graph=create_graph))


class SharedVictim:
    """One trained network attacked in ``T`` trials, for networks ``torch.func`` cannot call (TorchScript).

    The same interface as :class:`StackedVictims`; the forward pass is one batch over all trials, the
    per-trial gradients a loop over trials (the victim's weights are shared, so trials differ only in
    their inputs). Eager networks use :class:`StackedVictims` (vmap) instead.
    """

    def __init__(self, base: nn.Module, trials: int) -> None:
        self.base, self.trials = base, trials
        self.params = dict(base.named_parameters())
        for p in self.params.values():  # a frozen teacher as the victim: its weight gradients are what is shared
            p.requires_grad_(True)
        layer = classifier_layer(base)
        if layer is None:
            raise VictimAssumptionError(
                f"victim {type(base).__name__} has no final linear layer (iDLG reads labels from it)")
        ptr = layer.weight.data_ptr()
        self.fc_weight = next(n for n, p in self.params.items() if p.data_ptr() == ptr)

    def select(self, ids: Tensor) -> SharedVictim:
        return SharedVictim(self.base, int(ids.numel()))

    def logits(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        T, B = x.shape[:2]
        return self.base(x.flatten(0, 1)).view(T, B, -1)

    def gradients(self, x: Tensor, soft_labels: Tensor, create_graph: bool = False) -> list[Tensor]:
        params = list(self.params.values())
        loss = -(soft_labels * self.logits(self.params, x).log_softmax(-1)).sum(-1).mean(-1)  # (T,)
        per_trial = [torch.autograd.grad(loss[t], params, create_graph=create_graph, retain_graph=True)
                     for t in range(loss.shape[0])]  # a loop over trials: TorchScript takes no vmap
        return [torch.stack(g) for g in zip(*per_trial)]


def gradient_distance(dummy: Sequence[Tensor], target: Sequence[Tensor]) -> Tensor:
    """DLG's objective, ``sum_layers ||dummy - target||^2`` per trial: ``[(T, ...)]`` x2 -> ``(T,)``."""
    return sum(((a - b) ** 2).flatten(1).sum(1) for a, b in zip(dummy, target, strict=True))


def attack_objective(victims: StackedVictims, shared: Sequence[Tensor], shape: tuple[int, ...], method: Method,
                     labels: Tensor | None = None, num_classes: int = 10):
    """``objective(z, ids) -> (distance (n,), d distance / dz (n, P))`` for the batched optimisers
    (:mod:`lit_modules.leakage.batched_optim`), ``ids`` the trials in ``z``.

    ``z`` holds each trial's dummy batch ``(B, C, H, W)`` flattened, followed for DLG by its label
    logits ``(B, K)``; iDLG's fixed ``labels`` ``(T, B)`` come from :func:`extract_labels_from_gradients`.
    """
    B = shape[0]
    n_x = int(torch.Size(shape).numel())

    def objective(z: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        z = z.detach().requires_grad_(True)
        x = z[:, :n_x].view(-1, *shape)
        if method == "idlg":
            soft = F.one_hot(labels[ids], num_classes).to(z.dtype)
        else:
            soft = z[:, n_x:].view(-1, B, num_classes).softmax(-1)
        dummy = victims.select(ids).gradients(x, soft, create_graph=True)
        dist = gradient_distance(dummy, [g[ids] for g in shared])
        (grad,) = torch.autograd.grad(dist.sum(), z)
        return dist.detach(), grad

    return objective


# --- evaluation --------------------------------------------------------------------------------------
def label_multiset_accuracy(pred: Tensor, true: Tensor, num_classes: int) -> Tensor:
    """Fraction of each trial's labels recovered, order ignored: ``(T, B)`` x2 -> ``(T,)``."""
    pc = F.one_hot(pred, num_classes).sum(1)
    tc = F.one_hot(true, num_classes).sum(1)
    return torch.minimum(pc, tc).sum(1).to(torch.float32) / true.shape[1]


def match_reconstructions(recon: Tensor, original: Tensor) -> Tensor:
    """Per-trial MSE of each original to a reconstruction, matched greedily (order is not recoverable).

    ``(T, B, C, H, W)`` x2 -> ``(T, B)``; for ``B = 1`` simply the MSE.
    """
    T, B = recon.shape[:2]
    cost = ((original[:, :, None] - recon[:, None]) ** 2).flatten(3).mean(3)  # (T, B orig, B recon)
    out = torch.zeros(T, B, dtype=cost.dtype, device=cost.device)
    work = cost.clone()
    rows = torch.arange(T, device=cost.device)
    for _ in range(B):  # B is the victim's batch (1 in the papers), not the trials
        flat = work.flatten(1).argmin(1)
        i, j = flat // B, flat % B
        out[rows, i] = cost[rows, i, j]
        work[rows, i, :] = float("inf")
        work[rows, :, j] = float("inf")
    return out


def psnr(mse: Tensor, peak: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio in dB for images in ``[0, peak]``."""
    return 10 * torch.log10(peak**2 / mse.clamp_min(1e-12))
