"""Attribution methods: maps at the input's size, non-negative after the ReLU, ours equal to grad-cam's on a tiny
model, one-line errors for a layer name that does not exist."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cvlab.errors import CvlabError
from lit_modules.explanation.attribution import ATTRIBUTIONS, attribute, find_layer
from lit_modules.explanation.volume import normalize_attribution


class Tiny(nn.Module):
    """conv-BN-ReLU, strided conv-ReLU, pool, linear: 3 x 12 x 12 -> 4 classes (not in-place, as grad-cam needs)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
            nn.Conv2d(5, 6, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


@pytest.fixture
def tiny() -> nn.Module:
    torch.manual_seed(0)
    m = Tiny()
    with torch.no_grad():  # non-trivial BN statistics, so FullGrad's effective BN bias is tested
        m.features[1].running_mean.uniform_(-0.5, 0.5)
        m.features[1].running_var.uniform_(0.5, 2.0)
        m.features[1].bias.uniform_(-0.5, 0.5)
    return m.eval()


def _x() -> torch.Tensor:
    return torch.rand(3, 3, 12, 12, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method", sorted(ATTRIBUTIONS))
def test_every_method_gives_input_sized_nonnegative_maps(tiny: nn.Module, method: str) -> None:
    x, target = _x(), torch.tensor([0, 2, 3])
    maps = attribute(method, tiny, x, target, layer="features.3", batch_size=4)
    assert maps.shape == (3, 12, 12)
    assert torch.isfinite(maps).all()
    a = normalize_attribution(maps)
    assert (a >= 0).all() and (a <= 1).all()
    assert (a.flatten(1).amax(1) > 0).all(), f"{method}: an all-zero map"


def test_batched_maps_equal_one_image_at_a_time(tiny: nn.Module) -> None:
    x, target = _x(), torch.tensor([0, 2, 3])
    for method in ("gradcampp", "scorecam", "fullgrad", "guided_backprop", "occlusion"):
        batched = attribute(method, tiny, x, target, layer="features.3", batch_size=5)
        single = torch.cat([attribute(method, tiny, x[i:i + 1], target[i:i + 1], layer="features.3")
                            for i in range(3)])
        torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4, msg=method)


def test_ours_equal_grad_cam_package(tiny: nn.Module) -> None:
    from pytorch_grad_cam import FullGrad, GradCAMPlusPlus, ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    x, target = _x(), torch.tensor([0, 2, 3])
    layer = tiny.features[3]
    targets = [ClassifierOutputTarget(int(t)) for t in target]
    for ours, theirs in (("gradcampp", GradCAMPlusPlus), ("scorecam", ScoreCAM), ("fullgrad", FullGrad)):
        cam = theirs(model=tiny, target_layers=[layer] if ours != "fullgrad" else [])
        if ours == "scorecam":
            cam.batch_size = 4
        ref = torch.from_numpy(cam(input_tensor=x.clone(), targets=targets))  # (B, H, W), min-max scaled
        mine = normalize_attribution(attribute(ours, tiny, x, target, layer=layer, batch_size=7))
        torch.testing.assert_close(mine, ref, atol=2e-5, rtol=1e-4, msg=ours)


def test_captum_gradcam_is_relu_of_weighted_activations(tiny: nn.Module) -> None:
    # the layer is 6 x 6; Grad-CAM with the paper's ReLU, upsampled: equal to our plain Grad-CAM up to scale
    from lit_modules.explanation.attribution import gradcam_plain

    x, target = _x(), torch.tensor([1, 1, 2])
    a = normalize_attribution(attribute("gradcam", tiny, x, target, layer="features.3"))
    b = normalize_attribution(gradcam_plain(tiny, x, target, tiny.features[3]))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_unknown_layer_lists_close_names(tiny: nn.Module) -> None:
    with pytest.raises(CvlabError, match=r"no layer 'features.33' in Tiny; closest: features.3") as e:
        find_layer(tiny, "features.33")
    assert "\n" not in str(e.value)
    assert find_layer(tiny, None) is tiny.features[3]  # default: the last Conv2d
    with pytest.raises(CvlabError, match="unknown attribution methods"):
        attribute("lime", tiny, _x(), torch.zeros(3, dtype=torch.long))


def test_inplace_relu_after_the_layer_changes_nothing(tiny: nn.Module) -> None:
    """The hooked outputs are differentiated before a downstream in-place ReLU touches them."""
    import copy

    inplace = copy.deepcopy(tiny)
    inplace.features[2] = nn.ReLU(inplace=True)
    inplace.features[4] = nn.ReLU(inplace=True)
    x, target = _x(), torch.tensor([0, 2, 3])
    for method in ("gradcampp", "fullgrad"):
        torch.testing.assert_close(attribute(method, inplace, x, target, layer="features.3"),
                                   attribute(method, tiny, x, target, layer="features.3"), msg=method)
