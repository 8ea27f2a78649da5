"""Gradient matching, the math of "Dataset Condensation with Gradient Matching"
(Zhao, Mopuri & Bilen, ICLR 2021, https://arxiv.org/abs/2006.05929), Eq. (10) and Sec. 3.

Pure functions: the layer-wise distance between two gradients, and the per-class gradients of the
cross-entropy of every class at once (``vmap`` over classes of ``torch.func.grad``), which is the
batched form of the paper's loop ``for c in classes``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from cvlab.errors import CvlabError

Metric = Literal["ours", "mse", "cos"]
ClassMode = Literal["auto", "batched", "loop"]
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


def resolve_class_mode(mode: ClassMode, device: torch.device) -> Literal["batched", "loop"]:
    """``auto``: one vmapped computation on accelerators, the per-class loop on CPU.

    Measured on a 2-core CPU (docs/PERFORMANCE.md): vmapping 10 classes x 256 real images turns
    every activation into a 2,560-image tensor (12 GB peak, page-fault bound) and was 2.5x slower
    than ten 256-image passes, which stay in cache; on a GPU one launch per layer wins.
    """
    if mode == "auto":
        return "batched" if device.type != "cpu" else "loop"
    if mode not in ("batched", "loop"):
        raise CvlabError(f"class mode must be auto, batched or loop; got {mode!r}")
    return mode


class RealGradients:
    """The matching targets: per-class gradients of the real batches, without a graph.

    ``net`` is a fixed template module: the parameters of each fresh network are passed in with
    :func:`torch.func.functional_call`, so a compiled function is traced once and reused for every
    outer iteration. Options, none of which changes the math:

    - ``mode``: ``batched`` (vmap over classes, :func:`class_gradients`) or ``loop`` (one call per class
      of the same ``torch.func.grad`` function);
    - ``bf16``: bf16 autocast of the forward/backward (results returned in float32); the synthetic
      branch, whose second-order gradients reach the images, stays float32;
    - ``compile``: ``torch.compile`` the per-class gradient function (fuses the norm, activation and
      pooling passes around the convolutions; the first call compiles, ~20-40 s on CPU);
    - ``chunk``: pass each class's real batch through in chunks of this many images and sum the
      chunk gradients weighted by their share of the batch (the same mean gradient, up to float
      summation order; smaller activations stay in cache on a CPU). Exact for networks without
      cross-sample coupling: per-sample norms (ConvNet's instance norm) or BatchNorm in eval mode,
      which is how condensation uses BatchNorm; a BatchNorm in training mode is refused.
    """

    def __init__(self, net: nn.Module, mode: Literal["batched", "loop"] = "loop", bf16: bool = False,
                 compile: bool = False, chunk: int | None = None) -> None:
        if chunk is not None and chunk < 1:
            raise CvlabError(f"real-gradient chunk must be a positive number of images or None; got {chunk}")
        def loss(p: dict[str, Tensor], b: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
            return F.cross_entropy(functional_call(net, (p, b), (x,)), y)

        fn: Callable[..., dict[str, Tensor]] = grad(loss)
        if mode == "batched":
            fn = vmap(fn, in_dims=(None, None, 0, 0))
        self.fn = torch.compile(fn, dynamic=False) if compile else fn
        self.mode, self.bf16, self.chunk, self.net = mode, bf16, chunk, net

    @torch.no_grad()
    def __call__(
        self, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor, y: Tensor
    ) -> dict[str, Tensor]:
        """``x (K, B, C, H, W)``, ``y (K, B)`` -> ``{name: (K, *param.shape)}`` float32."""
        params = {n: p.detach() for n, p in params.items()}
        b = x.shape[1]
        step = b if self.chunk is None else min(self.chunk, b)
        if step < b and any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in self.net.modules()):
            raise CvlabError("real-gradient chunks would change the statistics of a BatchNorm in training mode; "
                             "put BatchNorm in eval mode (as condensation does) or leave chunk unset")
        out: dict[str, Tensor] = {}
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            for i in range(0, b, step):
                xc, yc = x[:, i : i + step], y[:, i : i + step]
                if self.mode == "batched":
                    part = self.fn(params, buffers, xc, yc)
                else:
                    each = [self.fn(params, buffers, xc[k], yc[k]) for k in range(x.shape[0])]
                    part = {n: torch.stack([g[n] for g in each]) for n in each[0]}
                w = xc.shape[1] / b  # each chunk's mean gradient, weighted by its share of the batch
                for n, g in part.items():
                    g = g.float()
                    out[n] = g.mul_(w) if n not in out else out[n].add_(g, alpha=w)
        return out


def match_loss(
    net: nn.Module,
    params: dict[str, Tensor],
    buffers: dict[str, Tensor],
    g_real: Mapping[str, Tensor],
    x_syn: Tensor,
    y_syn: Tensor,
    metric: Metric = "ours",
    mode: Literal["batched", "loop"] = "batched",
) -> Tensor:
    """Eq. (10) summed over classes: ``D(grad L(S_c), g_real[c])``, differentiable w.r.t. ``x_syn (K, ipc, ...)``."""
    if mode == "batched":
        g_syn = class_gradients(net, params, buffers, x_syn, y_syn)
    else:
        g_syn = class_gradients_loop(net, params, buffers, x_syn, y_syn, create_graph=True)
    return gradient_match_distance(g_syn, g_real, metric, batched=True)
