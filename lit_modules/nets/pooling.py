"""2x2 pooling layers that return the stock layers' numbers faster on a CPU.

* :class:`MaxPool2x2`: ``nn.MaxPool2d(2)`` (LeNet-5, the Madry MNIST net, ConvNet with max pooling), whose forward
  without autograd is an elementwise maximum of four strided views: 5-9x faster than the CPU ``max_pool2d``
  kernel, which finds the argmax indices even when no gradient will ask for them (a teacher labelling a
  student's batch, validation, the attacks' clean pass).
* :class:`AvgPool2x2`: ``nn.AvgPool2d(2, 2)`` written as a reshape and a mean under ``torch.compile``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MaxPool2x2(nn.MaxPool2d):
    """``nn.MaxPool2d(2)`` (floor mode: an odd last row/column is dropped), the same numbers and gradients.

    When autograd will not need the argmax (no grad mode, or an input that does not require grad) on a CPU
    tensor in eager mode, the output is ``max(max(a, b), max(c, d))`` over the four strided 2x2 views: the same
    values, NaN propagated as ``max_pool2d`` does (docs/PERFORMANCE.md, ZSKD: a KD student step). Otherwise
    (also under ``torch.compile`` and ``torch.jit.trace``) it is the stock layer, so the gradient keeps
    ``max_pool2d``'s tie rule (the first maximum in scan order, which matters: a constant image region gives
    equal activations). Its state dict is the stock layer's (none).
    """

    def __init__(self) -> None:
        super().__init__(kernel_size=2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        if (x.requires_grad and torch.is_grad_enabled()) or x.device.type != "cpu" or x.dim() not in (3, 4) \
                or torch.compiler.is_compiling() or torch.jit.is_tracing():  # a trace holds one graph for any device
            return F.max_pool2d(x, 2, 2)
        h, w = 2 * (x.shape[-2] // 2), 2 * (x.shape[-1] // 2)
        top = torch.maximum(x[..., 0:h:2, 0:w:2], x[..., 0:h:2, 1:w:2])
        return torch.maximum(top, torch.maximum(x[..., 1:h:2, 0:w:2], x[..., 1:h:2, 1:w:2]))


class AvgPool2x2(nn.Module):
    """``nn.AvgPool2d(2, 2)`` (floor mode: an odd last row/column is dropped) as a reshape and a mean.

    The same numbers; its backward is a broadcast, which ``torch.compile`` fuses into the norm's
    backward as plain vector code, where ``avg_pool2d_backward``'s index arithmetic made the fused
    layer-1 kernel of the DC real gradients 3x slower (docs/PERFORMANCE.md, Dataset Condensation).
    Outside ``torch.compile`` it calls ``F.avg_pool2d``: in eager mode a reduction over the strided
    view is ~3x slower than the stock kernel.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not torch.compiler.is_compiling() and x.dim() in (3, 4):
            return F.avg_pool2d(x, 2)  # eager: the stock kernel is ~3x faster than the reduction below
        *lead, h, w = x.shape
        h2, w2 = h // 2, w // 2
        x = x[..., : 2 * h2, : 2 * w2]
        return x.reshape(*lead, h2, 2, w2, 2).mean((-3, -1))
