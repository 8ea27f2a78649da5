"""Attribution maps, batched over images, for the context vs object study (Lost in Context, ICVGIP 2024).

Every method is a function ``(model, x, target, layer, batch_size) -> (B, H, W)`` float maps at the input's
spatial size, registered in :data:`ATTRIBUTIONS` by name; :func:`attribute` picks one. ``x`` is ``(B, C, H, W)``
[0, 1] pixels (the network normalises inside), ``target`` ``(B,)`` the class each map explains.

* captum: ``gradcam`` (LayerGradCam with the paper's ReLU, upsampled bilinearly to the input size),
  ``guided_backprop``, ``integrated_gradients``, ``saliency``, ``occlusion`` (pixel maps summed over channels;
  Occlusion evaluates ``batch_size`` perturbed inputs at a time);
* written here, batched, equal to the ``grad-cam`` package (``tests/test_explanation_attribution.py``):
  ``gradcampp`` (GradCAM++, Chattopadhyay et al. 2018, eq. 19), ``scorecam`` (Wang et al. 2020; the masked
  inputs of all images and channels go through the model ``batch_size`` at a time) and ``fullgrad``
  (Srinivas & Fleuret 2019, every Conv2d / BatchNorm2d bias). They return grad-cam's map before its last
  min-max scaling, which :func:`lit_modules.explanation.volume.normalize_attribution` applies.

A target layer is named as in ``model.named_modules()``; ``None`` takes the last ``Conv2d``. The model must be
in eval mode (BatchNorm statistics make a batch's maps independent of each other).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvlab.errors import CvlabError

AttributionName = Literal["gradcam", "gradcampp", "scorecam", "fullgrad", "guided_backprop", "integrated_gradients",
                          "saliency", "occlusion"]
Attribution = Callable[[nn.Module, Tensor, Tensor, nn.Module, int], Tensor]


def find_layer(model: nn.Module, name: str | None) -> nn.Module:
    """The module called ``name`` in ``model.named_modules()``; ``None``: the last ``Conv2d``. An unknown name
    raises one line listing the closest names."""
    modules = dict(model.named_modules())
    if name is None:
        convs = [m for m in modules.values() if isinstance(m, nn.Conv2d)]
        if not convs:
            raise CvlabError(f"{type(model).__name__} has no Conv2d layer: name a target layer for the CAM methods")
        return convs[-1]
    if name not in modules or name == "":
        close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.4)
        hint = f"closest: {', '.join(close)}" if close else f"layers are e.g. {', '.join(list(modules)[1:6])}"
        raise CvlabError(f"no layer {name!r} in {type(model).__name__}; {hint}")
    return modules[name]


def _upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """``(B, h, w)`` -> ``(B, H, W)``, bilinear with pixel centres (OpenCV's INTER_LINEAR, as grad-cam resizes)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def _minmax(maps: Tensor, eps: float = 1e-7) -> Tensor:
    """grad-cam's ``scale_cam_image``: ``(m - min) / (max - min + eps)`` over the last two dims."""
    lo = maps.amin((-2, -1), keepdim=True)
    m = maps - lo
    return m / (m.amax((-2, -1), keepdim=True) + eps)


def _activations_and_grads(model: nn.Module, x: Tensor, target: Tensor, layers: list[nn.Module],
                           input_grad: bool = False) -> tuple[list[Tensor], list[Tensor], Tensor | None]:
    """One forward and one backward of ``sum_b logit[b, target_b]``: each layer's output and its gradient (the
    backward stops at the deepest layer asked for); the input gradient too if asked.

    Each hooked layer passes a clone downstream, so an in-place op after it (``ReLU(inplace=True)``) modifies the
    clone and the output we differentiate keeps its values."""
    outs: list[Tensor | None] = [None] * len(layers)

    def hook(i: int) -> Callable:
        def fwd(_m: nn.Module, _inp: tuple, out: Tensor) -> Tensor:
            outs[i] = out
            return out.clone()
        return fwd

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)  # so that every layer output is on the graph
            logits = model(xg)
            if any(o is None for o in outs):
                raise CvlabError("a target layer was not used by the forward pass")
            score = logits.gather(1, target[:, None]).sum()
            grads = torch.autograd.grad(score, [*outs, *([xg] if input_grad else [])], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    grads = [torch.zeros_like(o) if g is None else g for o, g in zip([*outs, xg], grads)]
    acts = [o.detach() for o in outs]  # type: ignore[union-attr]
    return acts, grads[: len(layers)], (grads[-1] if input_grad else None)


# --- CAM family, written here ----------------------------------------------------------------------------------
def gradcam_pp(model: nn.Module, x: Tensor, target: Tensor, layer: nn.Module, batch_size: int = 64) -> Tensor:
    """GradCAM++: ``w_k = sum_ij relu(g) a_ij``, ``a = g^2 / (2 g^2 + sum_ij(A) g^3 + 1e-6)`` (0 where g = 0);
    map = resize(minmax(relu(sum_k w_k A_k))). ``(B, H, W)``."""
    (act,), (g,), _ = _activations_and_grads(model, x, target, [layer])
    g2 = g * g
    sum_act = act.sum((2, 3), keepdim=True)
    aij = g2 / (2 * g2 + sum_act * g2 * g + 1e-6)
    aij = torch.where(g != 0, aij, torch.zeros_like(aij))
    w = (g.clamp_min(0) * aij).sum((2, 3))  # (B, K)
    cam = torch.einsum("bk,bkhw->bhw", w, act).clamp_min(0)
    return _upsample(_minmax(cam), x.shape[-2:])


def gradcam_plain(model: nn.Module, x: Tensor, target: Tensor, layer: nn.Module, batch_size: int = 64) -> Tensor:
    """Grad-CAM without captum (mean gradient weights), for comparisons: resize(minmax(relu(sum_k w_k A_k)))."""
    (act,), (g,), _ = _activations_and_grads(model, x, target, [layer])
    cam = torch.einsum("bk,bkhw->bhw", g.mean((2, 3)), act).clamp_min(0)
    return _upsample(_minmax(cam), x.shape[-2:])


def score_cam(model: nn.Module, x: Tensor, target: Tensor, layer: nn.Module, batch_size: int = 64) -> Tensor:
    """Score-CAM: each activation channel, upsampled (align_corners, as grad-cam) and min-max scaled, masks the
    input; the softmax over channels of the target logits of the masked inputs weighs the channels.

    All images x channels masked inputs go through the model ``batch_size`` at a time. ``(B, H, W)``."""
    feats: list[Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: feats.append(out.detach().clone()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    act = feats[0]  # (B, K, h, w)
    b, k = act.shape[:2]
    with torch.no_grad():
        up = F.interpolate(act, size=x.shape[-2:], mode="bilinear", align_corners=True)  # (B, K, H, W)
        flat = up.flatten(2)
        lo, hi = flat.amin(-1)[..., None, None], flat.amax(-1)[..., None, None]
        up = (up - lo) / (hi - lo + 1e-8)
        tgt = target.repeat_interleave(k)  # (B K,)
        scores = torch.empty(b * k, device=x.device, dtype=x.dtype)
        for s in range(0, b * k, batch_size):  # internal batching over (image, channel) pairs
            idx = torch.arange(s, min(s + batch_size, b * k), device=x.device)
            masked = x[idx // k] * up.view(b * k, 1, *x.shape[-2:])[idx]
            scores[s:s + idx.numel()] = model(masked).gather(1, tgt[idx, None])[:, 0]
        w = scores.view(b, k).softmax(-1)
        cam = torch.einsum("bk,bkhw->bhw", w, act).clamp_min(0)
    return _upsample(_minmax(cam), x.shape[-2:])


def _bias_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m) in (nn.Conv2d, nn.BatchNorm2d) and m.bias is not None]


def _effective_bias(layer: nn.Module) -> Tensor:
    if isinstance(layer, nn.BatchNorm2d):  # the bias of the affine map BN computes in eval mode
        return layer.bias - layer.running_mean * layer.weight / torch.sqrt(layer.running_var + layer.eps)
    return layer.bias


def full_grad(model: nn.Module, x: Tensor, target: Tensor, layer: nn.Module | None = None,
              batch_size: int = 64) -> Tensor:
    """FullGrad: ``sum_c scale(|x_c grad_c|) + sum_layers sum_c scale(|b_c grad_c|)``, each map min-max scaled
    at its own resolution then resized (grad-cam's order), over every Conv2d / BatchNorm2d with a bias
    (``layer`` is ignored). ``(B, H, W)``."""
    layers = _bias_layers(model)
    if not layers:
        raise CvlabError(f"FullGrad needs Conv2d / BatchNorm2d layers with biases; {type(model).__name__} has none")
    _, grads, gx = _activations_and_grads(model, x, target, layers, input_grad=True)
    size = x.shape[-2:]
    total = _upsample(_minmax((gx * x).abs()).flatten(0, 1), size).view(x.shape).sum(1)
    for lay, g in zip(layers, grads):
        bias = _effective_bias(lay).detach()[None, :, None, None]
        m = _minmax((bias * g).abs())  # (B, C, h, w), each channel scaled on its own
        total = total + _upsample(m.sum(1), size)  # bilinear resizing is linear: sum the channels first
    return total


# --- captum ----------------------------------------------------------------------------------------------------
def captum_gradcam(model: nn.Module, x: Tensor, target: Tensor, layer: nn.Module, batch_size: int = 64) -> Tensor:
    """captum ``LayerGradCam`` with ``relu_attributions=True`` (the paper's ReLU), upsampled bilinearly."""
    from captum.attr import LayerGradCam

    with torch.enable_grad():
        a = LayerGradCam(model, layer).attribute(x, target=target, relu_attributions=True)  # (B, 1, h, w)
    return _upsample(a[:, 0].detach(), x.shape[-2:])


def _pixel_map(a: Tensor) -> Tensor:
    return a.detach().sum(1)  # (B, C, H, W) -> (B, H, W): signed sum over channels (the ReLU comes after)


def guided_backprop(model: nn.Module, x: Tensor, target: Tensor, layer: nn.Module, batch_size: int = 64) -> Tensor:
    """captum ``GuidedBackprop`` (the network's ``nn.ReLU`` modules pass positive gradients only)."""
    from captum.attr import GuidedBackprop

    with torch.enable_grad():
        return _pixel_map(GuidedBackprop(model).attribute(x.detach().requires_grad_(True), target=target))


def integrated_gradients(model: nn.Module, x: Tensor, target: Tensor, layer: nn.Module,
                         batch_size: int = 64) -> Tensor:
    """captum ``IntegratedGradients`` from a black image, 32 steps, ``batch_size`` images per internal pass."""
    from captum.attr import IntegratedGradients

    with torch.enable_grad():
        a = IntegratedGradients(model).attribute(x, target=target, n_steps=32,
                                                 internal_batch_size=max(batch_size, x.shape[0]))
    return _pixel_map(a)


def saliency(model: nn.Module, x: Tensor, target: Tensor, layer: nn.Module, batch_size: int = 64) -> Tensor:
    """captum ``Saliency``: ``|d logit / d x|`` (absolute), summed over channels."""
    from captum.attr import Saliency

    with torch.enable_grad():
        return _pixel_map(Saliency(model).attribute(x.detach().requires_grad_(True), target=target))


def occlusion(model: nn.Module, x: Tensor, target: Tensor, layer: nn.Module, batch_size: int = 64) -> Tensor:
    """captum ``Occlusion``: a black window 1/8 of the side (stride half that) over all channels; the drop in the
    target logit. ``batch_size`` perturbed inputs per forward."""
    from captum.attr import Occlusion

    c, h, w = x.shape[1:]
    win = (c, max(h // 8, 1), max(w // 8, 1))
    stride = (c, max(h // 16, 1), max(w // 16, 1))
    with torch.no_grad():
        a = Occlusion(model).attribute(x, target=target, sliding_window_shapes=win, strides=stride,
                                       perturbations_per_eval=max(1, batch_size // x.shape[0]))
    return _pixel_map(a)


ATTRIBUTIONS: dict[str, Attribution] = {
    "gradcam": captum_gradcam,
    "gradcampp": gradcam_pp,
    "scorecam": score_cam,
    "fullgrad": full_grad,
    "guided_backprop": guided_backprop,
    "integrated_gradients": integrated_gradients,
    "saliency": saliency,
    "occlusion": occlusion,
}


def check_methods(methods: list[str]) -> None:
    unknown = [m for m in methods if m not in ATTRIBUTIONS]
    if unknown:
        raise CvlabError(f"unknown attribution methods {unknown}; choose from {', '.join(ATTRIBUTIONS)}")


def attribute(method: str, model: nn.Module, x: Tensor, target: Tensor, layer: nn.Module | str | None = None,
              batch_size: int = 64) -> Tensor:
    """Maps ``(B, H, W)`` of ``method`` for ``model`` on ``x`` ``(B, C, H, W)`` explaining classes ``target``."""
    check_methods([method])
    if not isinstance(layer, nn.Module):
        layer = find_layer(model, layer)
    return ATTRIBUTIONS[method](model, x, target.to(x.device).long(), layer, batch_size)
