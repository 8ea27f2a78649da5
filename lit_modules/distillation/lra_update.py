"""The LRA student update: acquire on the new batch, retain on memory (pure functions on ``torch.func``).

Patel, Mopuri, Qiu, "Learning to Retain while Acquiring", CVPR 2023 (https://arxiv.org/abs/2302.14290),
Sec. 3.2 (meta-train = knowledge acquisition, meta-test = knowledge retention)::

    acquire:  theta' = theta - alpha * (grad L_acq(theta) + lambda * theta)     L_acq = KD on the new batch
    retain:   L_ret(theta') = KD on the memory batch at the adapted weights
    total:    J(theta) = w * L_ret(theta') + L_kd(theta)                        L_kd = KD on [new; memory]

    dJ/dtheta = g_kd + w * ((1 - alpha * lambda) v - alpha * H_acq v),
                v = grad L_ret(theta'),  H_acq = hess L_acq(theta)

``w`` is ``retain_weight``: 1 in the paper. With the L1 logit loss the retention gradient on one memory
slot (64 images) is about twice the norm of the KD gradient on 576 images (the sign gradients of few
samples cancel less), so at ``w = 1`` the update is dominated by fitting the replayed slot; see
docs/RESULTS.md for what that does to the student and for the weight used in the MNIST run.

``alpha`` is the inner learning rate (0.9), ``lambda`` the inner weight decay (5e-4 in the public code,
whose inner optimiser is a fresh SGD with weight decay: its first step is exactly this one).
``second_order`` computes the Hessian-vector product ``H_acq v`` by double backward through the inner
gradient; ``first_order`` drops that term (the inner gradient is treated as a constant, as in
first-order MAML), which costs about one extra small forward/backward over the baseline; ``none`` is
the plain KD step on [new; memory] (the adversarial DFKD baseline with replay). With an empty memory
every mode is the plain KD step on the new batch, as in the paper.

Note on the public code: it builds ``theta'`` with ``higher.innerloop_ctx(student, inner_opt)``, whose
default ``copy_initial_weights=True`` starts the inner loop from *detached copies* of the weights, so
the retention term's gradient lands on those copies and never reaches the student (higher issue #69).
Its student step is therefore plain KD on [new; memory], i.e. ``meta: none`` here. This module
implements the update as the paper writes it.

The pieces are computed explicitly rather than by differentiating through ``theta'`` so that, under
DDP, three averaged quantities (the inner gradient, ``v`` and ``H v``) make the update equal to the one
of a single process on the global batch: pass ``reduce=all_reduce_mean``. The networks are called with
:func:`torch.func.functional_call` on the *unwrapped* student and gradients are taken with
:func:`torch.autograd.grad` on explicit tensors, so nothing flows through the DDP wrapper.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from cvlab.distributed import Reduce, no_reduce
from lit_modules.distillation.lra_losses import l1_kd_loss

MetaMode = Literal["none", "first_order", "second_order"]
KDLoss = Callable[[Tensor, Tensor], Tensor]


def uses_batch_statistics(net: nn.Module) -> bool:
    """True when a layer normalises with statistics of the batch (BatchNorm in training mode): then a
    forward on ``[new; memory]`` is not the concatenation of forwards on ``new`` and on ``memory``."""
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats)
        for m in net.modules()
    )


@dataclass
class StudentGradients:
    """Gradients of the student's objective w.r.t. each parameter (averaged over ranks), and its losses
    on this rank: ``kd`` = KD(theta) on [new; memory]; ``acquire`` = KD(theta) on the new batch;
    ``retain`` = KD(theta') on memory (``None`` when there was no meta step)."""

    grads: dict[str, Tensor]
    kd: Tensor
    acquire: Tensor | None = None
    retain: Tensor | None = None


def kd_gradients(
    net: nn.Module,
    params: dict[str, Tensor],
    buffers: dict[str, Tensor],
    x: Tensor,
    t: Tensor,
    loss_fn: KDLoss = l1_kd_loss,
    reduce: Reduce = no_reduce,
) -> StudentGradients:
    """The plain KD step: ``grad loss_fn(S(x; theta), t)``. ``x (B, C, H, W)``, ``t (B, K)`` teacher logits."""
    names, theta = list(params), list(params.values())
    loss = loss_fn(functional_call(net, (params, buffers), (x,)), t)
    grads = reduce(list(torch.autograd.grad(loss, theta)))
    return StudentGradients(dict(zip(names, grads)), loss.detach())


def meta_gradients(
    net: nn.Module,
    params: dict[str, Tensor],
    buffers: dict[str, Tensor],
    x_new: Tensor,
    t_new: Tensor,
    x_mem: Tensor,
    t_mem: Tensor,
    mode: Literal["first_order", "second_order"] = "second_order",
    inner_lr: float = 0.9,
    inner_weight_decay: float = 0.0,
    loss_fn: KDLoss = l1_kd_loss,
    reduce: Reduce = no_reduce,
    retain_weight: float = 1.0,
) -> StudentGradients:
    """``dJ/dtheta`` of the module docstring. ``x_new (B, ...)``, ``x_mem (M, ...)``; ``t_*`` teacher logits.

    ``loss_fn`` must be a mean over rows (every KD loss here is). With a per-sample network (no
    batch statistics) KD on [new; memory] is ``(B * L_acq + M * L_mem) / (B + M)`` and its gradient
    is assembled from the two parts, so no forward is repeated; with BatchNorm in training mode
    the student sees the concatenated batch, as in the paper's code.
    """
    if mode not in ("first_order", "second_order"):
        raise ValueError(f"meta mode must be first_order or second_order, got {mode!r}")
    second = mode == "second_order"
    names, theta = list(params), list(params.values())
    B, M = x_new.shape[0], x_mem.shape[0]

    # acquire: the inner gradient on the new batch (kept differentiable for the second-order term)
    l_acq = loss_fn(functional_call(net, (params, buffers), (x_new,)), t_new)
    g_acq = torch.autograd.grad(l_acq, theta, create_graph=second)
    g_acq_value = [g.detach() for g in g_acq]
    # KD at theta on [new; memory]
    if uses_batch_statistics(net):
        x_all, t_all = torch.cat([x_new, x_mem]), torch.cat([t_new, t_mem])
        l_kd = loss_fn(functional_call(net, (params, buffers), (x_all,)), t_all)
        g_kd = list(torch.autograd.grad(l_kd, theta))
    else:
        l_mem = loss_fn(functional_call(net, (params, buffers), (x_mem,)), t_mem)
        g_mem = torch.autograd.grad(l_mem, theta)
        l_kd = (B * l_acq.detach() + M * l_mem.detach()) / (B + M)
        g_kd = [(B * ga + M * gm) / (B + M) for ga, gm in zip(g_acq_value, g_mem)]
    reduced = reduce(g_acq_value + g_kd)
    g_acq_value, g_kd = reduced[: len(theta)], reduced[len(theta) :]

    # the adapted weights theta' (one SGD step with weight decay), identical on every rank
    adapted = [
        (p.detach() - inner_lr * (g + inner_weight_decay * p.detach())).requires_grad_()
        for p, g in zip(theta, g_acq_value)
    ]
    # retain: KD on memory at theta'
    l_ret = loss_fn(functional_call(net, (dict(zip(names, adapted)), buffers), (x_mem,)), t_mem)
    v = reduce(list(torch.autograd.grad(l_ret, adapted)))

    shrink = 1.0 - inner_lr * inner_weight_decay  # d theta' / d theta without the Hessian term
    w = retain_weight
    total = [gk + (w * shrink) * vi for gk, vi in zip(g_kd, v)]
    if second:
        hv = hessian_vector_product(g_acq, theta, v)  # H_acq v on this rank's new batch
        total = [t - (w * inner_lr) * h for t, h in zip(total, reduce(hv))]
    return StudentGradients(dict(zip(names, total)), l_kd.detach(), l_acq.detach(), l_ret.detach())


def hessian_vector_product(grads: tuple[Tensor, ...], theta: list[Tensor], v: list[Tensor]) -> list[Tensor]:
    """``H v`` from gradients built with ``create_graph=True``: ``sum_i v_i * d grads_i / d theta``.

    Entries of ``grads`` that do not depend on ``theta`` differentiably contribute zero.
    """
    live = [i for i, g in enumerate(grads) if g.requires_grad]
    if not live:
        return [torch.zeros_like(p) for p in theta]
    hv = torch.autograd.grad(
        [grads[i] for i in live], theta, grad_outputs=[v[i] for i in live], allow_unused=True, materialize_grads=True
    )
    return list(hv)


def student_gradients(
    net: nn.Module,
    params: dict[str, Tensor],
    buffers: dict[str, Tensor],
    x_new: Tensor,
    t_new: Tensor,
    x_mem: Tensor | None,
    t_mem: Tensor | None,
    mode: MetaMode = "second_order",
    inner_lr: float = 0.9,
    inner_weight_decay: float = 0.0,
    loss_fn: KDLoss = l1_kd_loss,
    reduce: Reduce = no_reduce,
    retain_weight: float = 1.0,
) -> StudentGradients:
    """One student update's gradients: the meta update when there is memory and ``mode != "none"``;
    otherwise plain KD on [new; memory] (or on the new batch alone while the memory is empty)."""
    if x_mem is None or x_mem.shape[0] == 0:
        return kd_gradients(net, params, buffers, x_new, t_new, loss_fn, reduce)
    if mode == "none":
        return kd_gradients(net, params, buffers, torch.cat([x_new, x_mem]), torch.cat([t_new, t_mem]), loss_fn, reduce)
    return meta_gradients(net, params, buffers, x_new, t_new, x_mem, t_mem, mode, inner_lr, inner_weight_decay,
                          loss_fn, reduce, retain_weight)
