"""Gradient matching, the math of "Dataset Condensation with Gradient Matching"
(Zhao, Mopuri & Bilen, ICLR 2021, https://arxiv.org/abs/2006.05929), Eq. (10) and Sec. 3.

Pure functions: the layer-wise distance between two gradients, and the per-class gradients of the
cross-entropy of every class at once (``vmap`` over classes of ``torch.func.grad``), which is the
batched form of the paper's loop ``for c in classes``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from datamodules.errors import CvlabError

Metric = Literal["ours", "mse", "cos"]
Grads = Mapping[str, Tensor] | Sequence[Tensor]

_EPS = 1e-6  # as the DC code, added to the product of norms


def _values(g: Grads) -> list[Tensor]:
    return list(g.values()) if isinstance(g, Mapping) else list(g)


def gradient_match_distance(g_syn: Grads, g_real: Grads, metric: Metric = "ours", batched: bool = False) -> Tensor:
    """Distance between two lists of parameter gradients (same order and shapes).

    ``ours`` (the paper's Eq. 10): for every weight tensor, view it as ``(out, -1)`` rows and sum
    ``1 - cos(row_syn, row_real)`` over the output rows; 1-D tensors (biases, norm scales) are
    ignored. ``mse``: squared Euclidean distance of the flattened, concatenated gradients. ``cos``:
    ``1 - cos`` of the whole concatenated vectors.

    ``batched=True``: every tensor has a leading class axis ``(K, *shape)``; the K per-class
    distances are summed (the paper's sum over classes). Returns a scalar.
    """
    gs, gr = _values(g_syn), _values(g_real)
    if len(gs) != len(gr):
        raise ValueError(f"{len(gs)} synthetic gradients vs {len(gr)} real ones")
    lead = 1 if batched else 0
    if metric == "ours":
        total = gs[0].new_zeros(())
        for s, r in zip(gs, gr):
            if s.dim() - lead <= 1:  # bias / norm parameter: ignored as in the paper
                continue
            s = s.flatten(lead + 1)  # (K, out, in*kh*kw) or (out, in*kh*kw)
            r = r.flatten(lead + 1)
            cos = (s * r).sum(-1) / (s.norm(dim=-1) * r.norm(dim=-1) + _EPS)
            total = total + (1 - cos).sum()
        return total
    s = torch.cat([t.flatten(lead) for t in gs], dim=-1)  # (K, P) or (P,)
    r = torch.cat([t.flatten(lead) for t in gr], dim=-1)
    if metric == "mse":
        return ((s - r) ** 2).sum()
    if metric == "cos":
        return (1 - (s * r).sum(-1) / (s.norm(dim=-1) * r.norm(dim=-1) + _EPS)).sum()
    raise ValueError(f"unknown distance {metric!r}; expected ours, mse or cos")


def check_matchable(net: nn.Module, metric: Metric = "ours") -> None:
    """Fail with one line when ``net`` has no gradients that the distance could compare."""
    params = [p for p in net.parameters() if p.requires_grad]
    if not params:
        raise CvlabError(
            f"{type(net).__name__} has no trainable parameters, so it has no gradients to match; "
            "pick an architecture with weights (e.g. --model.init_args.arch convnet)"
        )
    if metric == "ours" and all(p.dim() <= 1 for p in params):
        raise CvlabError(
            f"{type(net).__name__} has only 1-D parameters (biases/norms), which the 'ours' distance "
            "ignores; use --model.init_args.distance mse or an architecture with weight matrices"
        )


def class_gradients(
    net: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor, y: Tensor
) -> dict[str, Tensor]:
    """Gradients of the mean cross-entropy of each class, all classes at once.

    ``x``: ``(K, B, C, H, W)`` (B images of class ``y[k]``), ``y``: ``(K, B)``. Returns
    ``{name: (K, *param.shape)}``. ``vmap`` over the class axis folds it into the batch of every
    convolution, so K classes cost one big forward/backward instead of K small ones. Exact for
    networks without cross-sample coupling (instance/group/layer norm, or BatchNorm in eval mode).
    Differentiable with respect to ``x`` (regular autograd sees through ``torch.func``).
    """

    def loss(p: dict[str, Tensor], xc: Tensor, yc: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(net, (p, buffers), (xc,)), yc)

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)


def class_gradients_loop(
    net: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor, y: Tensor, create_graph: bool
) -> dict[str, Tensor]:
    """Reference for :func:`class_gradients`: the paper's Python loop over classes (slower)."""
    names = list(params)
    params = {n: v if v.requires_grad else v.detach().requires_grad_() for n, v in params.items()}
    values = list(params.values())
    out: list[tuple[Tensor, ...]] = []
    for k in range(x.shape[0]):
        with torch.enable_grad():  # like torch.func.grad, works under an outer no_grad
            loss = F.cross_entropy(functional_call(net, (params, buffers), (x[k],)), y[k])
            out.append(torch.autograd.grad(loss, values, create_graph=create_graph))
    return {n: torch.stack([g[i] for g in out]) for i, n in enumerate(names)}
