"""The attacks of lit_modules.robustness.attacks: eps balls, worked answers, torchattacks equality, modes, errors."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_modules.nets import InputNormalization
from lit_modules.robustness.attacks import (
    AttackError,
    attack_names,
    check_attack_names,
    fgsm,
    ifgsm,
    make_attack,
    mifgsm,
    pgd,
    rfgsm,
    sign_noise,
    transfer,
)

EPS = 0.15  # the fixture model: clean 100%, FGSM ~73%, PGD-20 ~64% at this eps


class TinyNet(nn.Module):
    """Pixels in, normalisation inside; BatchNorm and dropout so that a mode slip would show."""

    def __init__(self, k: int = 4) -> None:
        super().__init__()
        self.normalize = InputNormalization([0.5], [0.25])
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                  nn.Dropout(0.3), nn.Linear(4 * 8 * 8, k))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(self.normalize(x))


def _blobs(n: int, k: int = 4, seed: int = 0) -> tuple[Tensor, Tensor]:
    """k classes of 1x8x8 images: a class prototype plus noise, clipped to [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(k, 1, 8, 8, generator=torch.Generator().manual_seed(123))
    y = torch.randint(0, k, (n,), generator=g)
    x = (protos[y] + 0.25 * torch.randn(n, 1, 8, 8, generator=g)).clamp(0, 1)
    return x, y


@pytest.fixture(scope="module")
def trained() -> TinyNet:
    torch.manual_seed(0)
    net = TinyNet()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x, y = _blobs(512)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval()


ATTACKS = {
    "fgsm": functools.partial(fgsm, eps=EPS),
    "fgsm_predicted": lambda m, x, y: fgsm(m, x, None, EPS),
    "fgsm_random_eps": functools.partial(fgsm, eps=EPS, random_eps=True),
    "rfgsm": functools.partial(rfgsm, eps=EPS),
    "ifgsm": functools.partial(ifgsm, eps=EPS, steps=5),
    "pgd": functools.partial(pgd, eps=EPS, steps=5, restarts=2),
    "mifgsm": functools.partial(mifgsm, eps=EPS, steps=5),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_stays_in_its_linf_ball_and_in_pixels(name: str, trained: TinyNet) -> None:
    x, y = _blobs(64, seed=1)
    x_adv = ATTACKS[name](trained, x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not torch.equal(x_adv, x), "the attack changed nothing"


def test_pgd_l2_stays_in_its_l2_ball(trained: TinyNet) -> None:
    x, y = _blobs(64, seed=1)
    x_adv = pgd(trained, x, y, eps=1.0, steps=5, norm="l2", restarts=2)
    assert (x_adv - x).flatten(1).norm(dim=1).max() <= 1.0 + 1e-5
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def _acc(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


def test_robust_accuracy_below_clean_and_pgd_at_least_as_strong_as_fgsm(trained: TinyNet) -> None:
    x, y = _blobs(256, seed=2)
    clean = _acc(trained, x, y)
    assert clean > 0.9, "the fixture model did not learn"
    accs = {name: _acc(trained, attack(trained, x, y), y) for name, attack in ATTACKS.items()}
    for name, acc in accs.items():
        assert acc <= clean, f"{name}: robust accuracy {acc} above clean {clean}"
    strong = pgd(trained, x, y, eps=EPS, steps=20)
    assert _acc(trained, strong, y) <= accs["fgsm"]
    assert _acc(trained, strong, y) < clean - 0.2, "PGD barely hurts an undefended model"
    # per sample, PGD's loss is at least FGSM's on almost every image
    with torch.no_grad():
        l_pgd = F.cross_entropy(trained(strong), y, reduction="none")
        l_fgsm = F.cross_entropy(trained(ATTACKS["fgsm"](trained, x, y)), y, reduction="none")
    assert (l_pgd >= l_fgsm - 1e-4).float().mean() > 0.95


def test_fgsm_worked_answer_on_a_linear_model() -> None:
    # logits = W x: for label 0 the CE gradient is (p - e_0) W = p_1 (W_1 - W_0) (two classes), so the step
    # is eps * sign(W_1 - W_0) per pixel
    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -1.0, 2.0, 0.5], [0.0, 1.0, -1.0, 1.5]]))
    model = nn.Sequential(nn.Flatten(), lin)
    x = torch.full((1, 1, 2, 2), 0.5)
    x_adv = fgsm(model, x, torch.tensor([0]), eps=0.25)
    torch.testing.assert_close(x_adv.flatten(), torch.tensor([0.25, 0.75, 0.25, 0.75]))
    # predicted labels: the model predicts 0 here (logits 1.25 vs 1.0), so the same answer
    torch.testing.assert_close(fgsm(model, x, None, eps=0.25), x_adv)
    # and the clip: at a pixel of 1 the +eps step stays at 1
    x1 = torch.ones(1, 1, 2, 2)
    assert fgsm(model, x1, torch.tensor([0]), eps=0.25).max() == 1.0


def test_equals_torchattacks_on_a_tiny_model(trained: TinyNet) -> None:
    torchattacks = pytest.importorskip("torchattacks")
    x, y = _blobs(32, seed=3)
    torch.manual_seed(7)
    theirs = torchattacks.PGD(trained, eps=EPS, alpha=0.02, steps=7, random_start=True)(x, y)
    torch.manual_seed(7)  # the same random start: one uniform_ draw over x's shape from the global generator
    ours = pgd(trained, x, y, eps=EPS, alpha=0.02, steps=7)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    theirs = torchattacks.PGD(trained, eps=EPS, alpha=0.02, steps=7, random_start=False)(x, y)
    torch.testing.assert_close(pgd(trained, x, y, eps=EPS, alpha=0.02, steps=7, random_start=False), theirs,
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(fgsm(trained, x, y, EPS), torchattacks.FGSM(trained, eps=EPS)(x, y), atol=1e-6, rtol=0)
    torch.testing.assert_close(mifgsm(trained, x, y, EPS, steps=5, alpha=0.03),
                               torchattacks.MIFGSM(trained, eps=EPS, alpha=0.03, steps=5)(x, y), atol=1e-6, rtol=0)
    # L2 on an untrained net: on the trained one the mean-CE gradient of confidently classified images has a
    # norm of 1e-7 or less, where torchattacks' grad / (||grad|| + 1e-10) shortens the step measurably (our
    # per-sample sum loss has a 32x larger gradient here), and 5 of the 32 images end up 0.01 apart
    torch.manual_seed(0)
    fresh = TinyNet().eval()
    torch.manual_seed(3)
    theirs = torchattacks.PGDL2(fresh, eps=1.0, alpha=0.2, steps=5)(x, y)
    torch.manual_seed(3)
    torch.testing.assert_close(pgd(fresh, x, y, eps=1.0, alpha=0.2, steps=5, norm="l2"), theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_leaves_modes_batchnorm_and_parameter_grads_alone(name: str) -> None:
    torch.manual_seed(0)
    net = TinyNet()
    net.train()
    net.body[4].eval()  # a mixed tree: every flag must come back as it was
    x, y = _blobs(16, seed=4)
    modes = {n: m.training for n, m in net.named_modules()}
    bn = {k: v.clone() for k, v in net.body[1].state_dict().items()}
    ATTACKS[name](net, x, y)
    assert {n: m.training for n, m in net.named_modules()} == modes
    for k, v in net.body[1].state_dict().items():
        assert torch.equal(v, bn[k]), f"BatchNorm {k} changed"
    assert all(p.grad is None for p in net.parameters())


def test_crafting_is_in_eval_mode() -> None:
    # dropout in train mode would make two PGD runs from the same start differ; in eval mode they agree
    torch.manual_seed(0)
    net = TinyNet().train()
    x, y = _blobs(16, seed=5)
    a = pgd(net, x, y, EPS, steps=3, random_start=False)
    b = pgd(net, x, y, EPS, steps=3, random_start=False)
    assert torch.equal(a, b)


def test_attack_works_under_no_grad_and_refuses_inference_mode(trained: TinyNet) -> None:
    x, y = _blobs(8, seed=6)
    with torch.no_grad():  # validation_step under Trainer(inference_mode=False)
        x_adv = pgd(trained, x, y, EPS, steps=2)
    assert not torch.equal(x_adv, x)
    with torch.inference_mode(), pytest.raises(AttackError, match="inference_mode=False"):
        fgsm(trained, x, y, EPS)


def test_attack_under_bf16_autocast(trained: TinyNet) -> None:
    x, y = _blobs(16, seed=7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = pgd(trained, x, y, EPS, steps=3)
    assert x_adv.dtype == torch.float32
    assert (x_adv - x).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1


def test_transfer_crafts_on_the_source_and_reads_the_target(trained: TinyNet) -> None:
    torch.manual_seed(1)
    other = TinyNet().eval()
    x, y = _blobs(16, seed=8)
    x_adv, logits = transfer(functools.partial(fgsm, eps=EPS), trained, other, x, y)
    torch.testing.assert_close(x_adv, fgsm(trained, x, y, EPS))
    torch.testing.assert_close(logits, other(x_adv))


def test_bad_inputs_give_clear_messages(trained: TinyNet) -> None:
    x, y = _blobs(8, seed=9)
    with pytest.raises(AttackError, match=r"eps must be in \[0, 1\]"):
        fgsm(trained, x, y, eps=8.0)
    with pytest.raises(AttackError, match=r"eps must be in \[0, 1\]"):
        pgd(trained, x, y, eps=-0.1)
    with pytest.raises(AttackError, match=r"\[0, 1\] pixels.*un-normalised"):
        pgd(trained, (x - 0.5) / 0.25, y, eps=EPS)
    with pytest.raises(AttackError, match=r"logits \(B, K\) = \(8, K\).*shape \(8,\)"):
        fgsm(lambda z: trained(z)[:, 0], x, y, EPS)
    with pytest.raises(AttackError, match="logits"):
        fgsm(lambda z: trained(z)[:4], x, y, EPS)
    with pytest.raises(AttackError, match="alpha <= eps"):
        rfgsm(trained, x, y, eps=0.1, alpha=0.2)


def test_pgd_restarts_keep_per_image_the_strongest(trained: TinyNet) -> None:
    # the first restart of both runs starts from the same draw: more restarts can only break more images
    x, y = _blobs(128, seed=10)
    one = pgd(trained, x, y, EPS, steps=3, restarts=1, generator=torch.Generator().manual_seed(5))
    three = pgd(trained, x, y, EPS, steps=3, restarts=3, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        wrong_one, wrong_three = trained(one).argmax(-1) != y, trained(three).argmax(-1) != y
    assert (wrong_three | ~wrong_one).all(), "an image broken by restart 1 came back"
    assert wrong_three.sum() >= wrong_one.sum()


# --- the registry: every named attack equals the direct call of its function -----------------------------------------

#: name -> (the registry's budget keywords, the direct call with a generator ``g`` seeded alike)
DIRECT = {
    "fgsm": ({}, lambda m, x, y, g: fgsm(m, x, y, EPS)),
    "rfgsm": ({"alpha": 0.05}, lambda m, x, y, g: rfgsm(m, x, y, EPS, alpha=0.05, generator=g)),
    "ifgsm": ({"steps": 4}, lambda m, x, y, g: ifgsm(m, x, y, EPS, steps=4)),
    "pgd": ({"steps": 4, "alpha": 0.05, "restarts": 3},
            lambda m, x, y, g: pgd(m, x, y, EPS, alpha=0.05, steps=4, restarts=3, generator=g)),
    "mifgsm": ({"steps": 4}, lambda m, x, y, g: mifgsm(m, x, y, EPS, steps=4)),
    "noise": ({}, lambda m, x, y, g: sign_noise(m, x, y, EPS, generator=g)),
}


def test_the_registry_names_every_attack_once() -> None:
    assert sorted(DIRECT) == attack_names()


@pytest.mark.parametrize("name", sorted(DIRECT))
def test_registry_attack_equals_the_direct_call(name: str, trained: TinyNet) -> None:
    x, y = _blobs(32, seed=7)
    budget, direct = DIRECT[name]
    got = make_attack(name, EPS, generator=torch.Generator().manual_seed(4), **budget)(trained, x, y)
    torch.testing.assert_close(got, direct(trained, x, y, torch.Generator().manual_seed(4)), rtol=0, atol=0)
    assert not torch.equal(got, x)


def test_registry_fgsm_random_eps_and_predicted_labels_equal_the_direct_call(trained: TinyNet) -> None:
    x, y = _blobs(32, seed=8)
    got = make_attack("fgsm", EPS, random_eps=True, generator=torch.Generator().manual_seed(2))(trained, x, None)
    expected = fgsm(trained, x, None, EPS, random_eps=True, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_unknown_attack_names_fail_with_one_line_listing_the_known_ones() -> None:
    with pytest.raises(AttackError) as e:
        make_attack("pgdd", EPS)
    assert str(e.value) == "unknown attack 'pgdd'; available: fgsm, ifgsm, mifgsm, noise, pgd, rfgsm"
    with pytest.raises(AttackError, match=r"unknown attacks \['cw'\]; available: fgsm, .*, rfgsm, uap$") as e:
        check_attack_names(["pgd", "cw"], extra=("uap",))
    assert "\n" not in str(e.value)
    with pytest.raises(AttackError, match="eps must be in"):
        make_attack("fgsm", 8.0)
