"""The network zoo: every registered net builds, runs and honours the ClassifierNet contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cvlab.errors import CvlabError
from lit_modules.nets import ClassifierNet, available_nets, create_net

NUM_CLASSES = 7
INPUTS = [(1, 28), (1, 32), (3, 28), (3, 32)]  # (in_channels, image_size)
# Deep variants only differ from a shallower sibling in depth (resnet34 ~ resnet18, resnet44/56 ~
# resnet20/32, wrn40_2 ~ wrn16_2), so they run one input; the siblings run all four (2 CPU cores).
HEAVY = {"resnet34", "resnet44", "resnet56", "wrn40_2"}
MEDIUM = {"resnet18"}  # ~0.56 GFLOPs per image: runs (1, 28) and (3, 32) only
CASES = [
    (name, c, s)
    for name in available_nets()
    for c, s in ([(3, 32)] if name in HEAVY else [(1, 28), (3, 32)] if name in MEDIUM else INPUTS)
]


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_registry_lists_every_family() -> None:
    names = set(available_nets())
    expected = {
        "lenet5", "lenet5_half", "lenet_sigmoid", "alexnet_cifar", "alexnet_cifar_half",
        "resnet18", "resnet34", "resnet20", "resnet32", "resnet44", "resnet56",
        "wrn16_2", "wrn40_2", "convnet", "madry_mnist",
    }  # fmt: skip
    assert expected <= names


@pytest.mark.parametrize(("name", "in_channels", "image_size"), CASES)
def test_forward_contract(name: str, in_channels: int, image_size: int) -> None:
    torch.manual_seed(0)
    net = create_net(name, num_classes=NUM_CLASSES, in_channels=in_channels, image_size=image_size)
    assert isinstance(net, ClassifierNet)
    assert isinstance(net.get_classifier(), nn.Linear)
    assert net.get_classifier() is net.fc
    x = torch.randn(2, in_channels, image_size, image_size)
    net.eval()
    with torch.no_grad():
        out = net(x)
        feats = net.forward_features(x)
        again = net.get_classifier()(feats)
    assert out.shape == (2, NUM_CLASSES)
    assert feats.ndim == 2 and feats.shape[0] == 2
    assert feats.shape[1] == net.fc.in_features
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, again)


@pytest.mark.parametrize("name", ["lenet5", "resnet20", "wrn16_2", "alexnet_cifar_half", "convnet"])
def test_trains_one_step(name: str) -> None:
    net = create_net(name, num_classes=NUM_CLASSES, in_channels=3, image_size=32).train()
    loss = nn.functional.cross_entropy(net(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1]))
    loss.backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("lenet5", 61_706), ("lenet5_half", 35_820), ("resnet20", 269_722), ("resnet32", 464_154)],
)
def test_exact_param_counts(name: str, expected: int) -> None:
    in_channels = 1 if name.startswith("lenet") else 3
    assert n_params(create_net(name, num_classes=10, in_channels=in_channels, image_size=32)) == expected


def test_madry_mnist_matches_the_challenge_model() -> None:
    # 5x5x1x32+32, 5x5x32x64+64, 3136x1024+1024, 1024x10+10 (Madry et al.'s MNIST challenge model)
    net = create_net("madry_mnist", num_classes=10, in_channels=1, image_size=28)
    assert n_params(net) == 832 + 51_264 + 3_212_288 + 10_250
    assert net.forward_features(torch.rand(2, 1, 28, 28)).shape == (2, 1024)


@pytest.mark.parametrize(("name", "lo", "hi"), [("resnet18", 11.1e6, 11.2e6), ("wrn40_2", 2.2e6, 2.3e6)])
def test_approx_param_counts(name: str, lo: float, hi: float) -> None:
    assert lo < n_params(create_net(name, num_classes=10, in_channels=3, image_size=32)) < hi


def test_lenet5_flatten_follows_image_size() -> None:
    assert create_net("lenet5", in_channels=1, image_size=32).head[0].in_features == 400
    assert create_net("lenet5", in_channels=1, image_size=28).head[0].in_features == 256


@pytest.mark.parametrize(("image_size", "features"), [(32, 768), (28, 588)])
def test_lenet_sigmoid_victim(image_size: int, features: int) -> None:
    torch.manual_seed(0)
    net = create_net("lenet_sigmoid", num_classes=10, in_channels=3, image_size=image_size)
    for p in net.parameters():
        assert p.min() >= -0.5 and p.max() <= 0.5
    assert net.fc.in_features == features
    feats = net.forward_features(torch.randn(2, 3, image_size, image_size))
    assert feats.shape == (2, features)
    assert (feats >= 0).all()


def test_lenet_sigmoid_init_range() -> None:
    net = create_net("lenet_sigmoid", in_channels=3, init_range=0.1)
    assert max(p.abs().max().item() for p in net.parameters()) <= 0.1


def test_unknown_name_lists_available() -> None:
    with pytest.raises(CvlabError, match="available:.*lenet5.*resnet20"):
        create_net("no_such_net")


@pytest.mark.parametrize("norm", ["instancenorm", "batchnorm", "layernorm", "groupnorm", "none"])
@pytest.mark.parametrize("pooling", ["avgpooling", "maxpooling", "none"])
@pytest.mark.parametrize(("in_channels", "image_size"), [(1, 28), (3, 32)])
def test_convnet_variants(norm: str, pooling: str, in_channels: int, image_size: int) -> None:
    net = create_net(
        "convnet", num_classes=10, in_channels=in_channels, image_size=image_size,
        width=16, norm=norm, pooling=pooling,
    )  # fmt: skip
    side = 4 if pooling != "none" else 32  # 28x28 is padded to 32 by the first conv
    assert net.fc.in_features == 16 * side * side
    out = net(torch.randn(2, in_channels, image_size, image_size))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


# compiled_form: the code path taken under torch.compile (forced here in eager by patching is_compiling)
@pytest.mark.parametrize("compiled_form", [False, True], ids=["eager", "compiled-form"])
@pytest.mark.parametrize("side", [8, 7])  # even; odd (floor mode drops the last row/column)
def test_convnet_avgpool_equals_avg_pool2d_with_gradients(side: int, compiled_form: bool, monkeypatch) -> None:
    from lit_modules.nets.pooling import AvgPool2x2

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiled_form)
    x = torch.randn(3, 5, side, side + 1, requires_grad=True)
    out = AvgPool2x2()(x)
    ref = torch.nn.functional.avg_pool2d(x, 2, 2)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, x, g)
    (want,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("side", [8, 7])  # even; odd (floor mode drops the last row/column)
def test_maxpool2x2_equals_max_pool2d_values_and_gradients(side: int) -> None:
    """The fast no-grad path gives max_pool2d's values (ties, NaN, 3-D input); with grad it is the stock layer, whose
    gradient sends a tie to the first maximum; LeNet-5, the Madry net and ConvNet(maxpooling) use it, with the stock
    layer's outputs."""
    from lit_modules.nets.pooling import MaxPool2x2

    torch.manual_seed(0)
    x = torch.randn(3, 5, side, side + 1).relu()  # many ties at 0
    x[0, 0, :2, :2] = 0.5  # a positive tie
    x[1, 2, 2, 3] = float("nan")
    pool = MaxPool2x2()
    with torch.no_grad():
        fast = pool(x)
    assert torch.equal(fast.isnan(), F.max_pool2d(x, 2).isnan()) and fast.isnan().sum() == 1
    assert torch.equal(fast.nan_to_num(), F.max_pool2d(x, 2).nan_to_num())
    assert torch.equal(pool(x[0]), F.max_pool2d(x[0], 2))  # (C, H, W) and an input without grad, grad mode on
    xg = x.nan_to_num().requires_grad_(True)
    out = pool(xg)
    (got,) = torch.autograd.grad(out, xg, torch.ones_like(out))
    assert got[0, 0, :2, :2].tolist() == [[1.0, 0.0], [0.0, 0.0]]  # the first maximum takes a tie's gradient
    (want,) = torch.autograd.grad(F.max_pool2d(xg, 2), xg, torch.ones_like(out))
    assert torch.equal(got, want)
    images = torch.rand(4, 1, 28, 28)
    for name in ("lenet5", "lenet5_half", "madry_mnist"):
        net = create_net(name, in_channels=1, image_size=28)
        assert sum(isinstance(m, MaxPool2x2) for m in net.modules()) == 2, name
        with torch.no_grad():
            a = net(images)
        for m in net.modules():
            if isinstance(m, MaxPool2x2):
                m.forward = lambda t: F.max_pool2d(t, 2, 2)  # the stock layer
        with torch.no_grad():
            assert torch.equal(a, net(images)), name
    net = create_net("convnet", in_channels=1, image_size=28, pooling="maxpooling")
    assert any(isinstance(m, MaxPool2x2) for m in net.modules())


@pytest.mark.parametrize("compiled_form", [False, True], ids=["eager", "compiled-form"])
@pytest.mark.parametrize(("c", "side", "pad"), [(1, 28, 3), (3, 32, 1), (2, 9, 1)])
def test_convnet_few_channel_conv_equals_conv2d_to_second_order(c: int, side: int, pad: int, compiled_form: bool,
                                                                monkeypatch) -> None:
    from lit_modules.nets.convnet import FewChannelConv2d

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiled_form)
    torch.manual_seed(0)
    ref = nn.Conv2d(c, 8, 3, padding=pad).double()
    mine = FewChannelConv2d(c, 8, 3, padding=pad).double()
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(4, c, side, side, dtype=torch.float64, requires_grad=True)
    a, b = mine(x), ref(x)
    torch.testing.assert_close(a, b)
    g = torch.randn_like(a)
    ga = torch.autograd.grad(a, [x, mine.weight, mine.bias], g, create_graph=True)
    gb = torch.autograd.grad(b, [x, ref.weight, ref.bias], g, create_graph=True)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v)
    # second order (the synthetic branch of gradient matching differentiates a weight gradient)
    (ha,) = torch.autograd.grad(ga[1].square().sum(), x)
    (hb,) = torch.autograd.grad(gb[1].square().sum(), x)
    torch.testing.assert_close(ha, hb)
    assert isinstance(create_net("convnet", in_channels=c, image_size=side).features[0], FewChannelConv2d)


def test_convnet_default_features() -> None:
    assert create_net("convnet", in_channels=3, image_size=32).fc.in_features == 2048


@pytest.mark.parametrize("act", ["relu", "sigmoid", "leakyrelu"])
def test_convnet_activations(act: str) -> None:
    net = create_net("convnet", in_channels=3, image_size=32, width=8, depth=2, act=act)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_convnet_rejects_unknown_options() -> None:
    with pytest.raises(CvlabError, match="norm"):
        create_net("convnet", norm="weird")
    with pytest.raises(CvlabError, match="pooling"):
        create_net("convnet", pooling="weird")


@pytest.mark.parametrize("name", ["alexnet_cifar", "wrn16_2"])
def test_dropout_kwarg(name: str) -> None:
    net = create_net(name, num_classes=10, in_channels=3, image_size=32, dropout=0.3)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_any_network_by_class_path() -> None:
    from cvlab.errors import CvlabError
    from lit_modules.nets import classifier_layer, create_generator, features_and_logits

    # a torchvision network: its own arguments in init_args; the shape arguments it does not name are not passed
    net = create_net({"class_path": "torchvision.models.resnet18", "init_args": {"num_classes": 7}}, num_classes=7)
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 7) and classifier_layer(net) is net.fc
    feats, logits = features_and_logits(net, torch.rand(2, 3, 32, 32))
    assert feats.shape == (2, 512) and torch.allclose(net.fc(feats), logits)
    # an outside class that names num_classes gets it from the task
    lenet = create_net({"class_path": "experiments.examples.outside_nets.BNLeNet5"}, num_classes=4, in_channels=1)
    assert lenet(torch.rand(2, 1, 32, 32)).shape == (2, 4)
    # generators likewise
    g = create_generator({"class_path": "lit_modules.nets.generator.DAFLGenerator", "init_args": {"widths": [8, 4]}},
                         latent_dim=8, out_channels=1, image_size=28)
    assert g(torch.randn(3, 8)).shape == (3, 1, 28, 28)
    with pytest.raises(CvlabError, match="cannot import 'nope'"):
        create_net({"class_path": "nope.Net"})
    with pytest.raises(CvlabError, match="built a int, not a torch nn.Module"):
        create_net({"class_path": "builtins.int"})
    with pytest.raises(CvlabError, match="a network is a registered name or"):
        create_net({"klass": "x"})
