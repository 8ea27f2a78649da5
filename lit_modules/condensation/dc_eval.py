"""The evaluation protocol of "Dataset Condensation with Gradient Matching" (Zhao, Mopuri & Bilen,
ICLR 2021, Sec. 4): train fresh networks on a small labelled set and report their test accuracy.

Recipe (paper and DC code): SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 256, lr / 10 after
half of the epochs, 300 epochs (1000 when augmenting, as the DC code does for MNIST). Departure: the
public ``evaluate_synset`` trains ``E + 1`` epochs and divides the lr after epoch ``E // 2 + 1`` with a
fresh optimizer (momentum reset): 152 epochs at 0.01 and 149 at 0.001 for E = 300; here ``E`` epochs,
the first ``E // 2`` at ``lr`` and the rest at ``lr / 10``, momentum kept (:meth:`EvalRecipe.lr_at`). The N networks'
parameters are stacked (``torch.func.stack_module_state``) and each trains on its own shuffled and
augmented batch. On a GPU one ``vmap`` step trains all of them; on a CPU a loop over the networks
with the plain per-network step is faster (vmapped convolutions become grouped convolutions, which
oneDNN runs slowly; docs/PERFORMANCE.md, Dataset Condensation), optionally ``torch.compile``d. Also
the baselines' subset selection: random real images and herding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, grad, stack_module_state, vmap
from tqdm.auto import tqdm

from cvlab.errors import CvlabError
from cvlab.image_ops import dc_augment
from cvlab.seeding import mix_seed
from lit_modules.condensation.pixel_net import create_pixel_net
from lit_modules.nets import NetSpec


@dataclass
class EvalRecipe:
    """How each evaluation network is trained (defaults: the paper's)."""

    epochs: int = 300
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    augment: str = "none"  # "none" or DC's strategies: "crop_scale_rotate", "crop_noise", ...
    test_batch_size: int = 2000  # images per forward, summed over the networks evaluated together
    max_parallel_images: int = 1024  # nets trained together x batch: bounds the activation memory
    parallel: str = "auto"  # "vmap" (one step for all nets), "loop" (one per net); auto: vmap on CUDA only
    compile: bool = False  # torch.compile the per-network step of the loop (first epoch compiles, ~30 s)
    noise: float = 0.001  # the "noise" augmentation's sd in normalised units (DC code); x std per channel on pixels

    def __post_init__(self) -> None:
        if self.parallel not in ("auto", "vmap", "loop"):
            raise CvlabError(f"evaluation parallel must be auto, vmap or loop; got {self.parallel!r}")
        if self.compile and self.parallel == "vmap":
            raise CvlabError("evaluation compile applies to the per-network loop; use parallel loop or auto")

    def lr_at(self, epoch: int) -> float:
        """The learning rate of 0-based ``epoch``: ``lr`` for the first ``epochs // 2``, then ``lr / 10``."""
        return self.lr * (0.1 if epoch >= self.epochs // 2 else 1.0)

    def mode(self, device: torch.device) -> str:
        if self.parallel != "auto":
            return self.parallel
        return "vmap" if device.type == "cuda" else "loop"


def _sgd_(p: dict[str, Tensor], g: dict[str, Tensor], buf: dict[str, Tensor], lr: float, r: EvalRecipe) -> None:
    """In place SGD with momentum and weight decay (torch.optim.SGD's update) on stacked params."""
    for k in p:
        d = g[k] + r.weight_decay * p[k]
        buf[k].mul_(r.momentum).add_(d)
        p[k].sub_(lr * buf[k])


def train_and_test(
    x: Tensor,
    y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    arch: NetSpec,
    num_classes: int,
    arch_kwargs: dict[str, Any] | None = None,
    num_nets: int = 10,
    recipe: EvalRecipe | None = None,
    seed: int = 0,
    progress: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Tensor:
    """Train ``num_nets`` fresh ``arch`` networks on ``(x, y)``, return their test accuracies ``(N,)``.

    ``x``: float ``(n, C, H, W)``, ``test_x``: float ``(M, C, H, W)``, both [0, 1] pixels; each network
    normalises its input with ``mean``/``std`` (None: no normalisation, for inputs already normalised).
    Seeded: the same arguments give the same accuracies. ``progress``: a progress bar over the training
    epochs with this description (None: silent).
    """
    r = recipe or EvalRecipe()
    c, h = x.shape[1], x.shape[-1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        nets = [create_pixel_net(arch, num_classes, c, h, mean, std, **(arch_kwargs or {})).to(x.device)
                for _ in range(num_nets)]
    group = max(1, r.max_parallel_images // min(r.batch_size, x.shape[0]))
    noise = r.noise if std is None else r.noise * torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return torch.cat([
        _train_group(nets[i : i + group], x, y, test_x, test_y, r, mix_seed(seed, i), noise,
                     None if progress is None
                     else f"{progress} (nets {i + 1}-{min(i + group, num_nets)} of {num_nets})")
        for i in range(0, num_nets, group)
    ])


@torch.no_grad()
def _train_group(nets: list, x: Tensor, y: Tensor, test_x: Tensor, test_y: Tensor, r: EvalRecipe, seed: int,
                 noise: float | Tensor, progress: str | None = None) -> Tensor:
    """Train and test ``nets`` together: one vmapped step for all of them, or a loop over them
    (``EvalRecipe.mode``); the same shuffles, augmentations and updates either way. ``noise``: the
    augmentation's noise amplitude in the units of ``x`` (``std`` times the normalised one for pixels)."""
    dev, num_nets, base = x.device, len(nets), nets[0]
    mode = r.mode(dev)
    g = torch.Generator(device=dev).manual_seed(seed)
    params, buffers = stack_module_state(nets)  # {name: (N, *shape)}
    params = {k: v.detach() for k, v in params.items()}
    buf = {k: torch.zeros_like(v) for k, v in params.items()}

    def loss(p: dict[str, Tensor], b: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(base, (p, b), (xb,)), yb)

    if mode == "vmap":
        step = vmap(grad(loss), in_dims=(0, 0, 0, 0), randomness="different")
    else:
        one = grad(loss)
        one = torch.compile(one, dynamic=False) if r.compile else one

        def step(p: dict[str, Tensor], b: dict[str, Tensor], xb: Tensor, yb: Tensor) -> dict[str, Tensor]:
            each = [one(_net(p, k), _net(b, k), xb[k], yb[k]) for k in range(xb.shape[0])]
            return {name: torch.stack([g[name] for g in each]) for name in p}

    n, bs = x.shape[0], min(r.batch_size, x.shape[0])
    base.train()
    for epoch in tqdm(range(r.epochs), desc=progress, disable=progress is None, leave=False, unit="epoch"):
        lr = r.lr_at(epoch)
        order = torch.rand(num_nets, n, generator=g, device=dev).argsort(1)  # (N, n): own shuffle per net
        for i in range(0, n, bs):
            idx = order[:, i : i + bs]  # (N, b)
            xb = x[idx]  # (N, b, C, H, W)
            if r.augment != "none":
                xb = dc_augment(xb.flatten(0, 1), r.augment, g, noise=noise).view_as(xb)  # type: ignore[arg-type]
            with torch.enable_grad():
                grads = step(params, buffers, xb, y[idx])
            _sgd_(params, grads, buf, lr, r)
    base.eval()
    correct = torch.zeros(num_nets, device=dev)
    if mode == "vmap":
        predict = vmap(lambda p, b, xb: functional_call(base, (p, b), (xb,)), in_dims=(0, 0, None))
        tb = max(1, r.test_batch_size // num_nets)
        for i in range(0, test_x.shape[0], tb):
            logits = predict(params, buffers, test_x[i : i + tb])  # (N, tb, K)
            correct += (logits.argmax(-1) == test_y[i : i + tb]).sum(1)
    else:
        tb = max(1, min(r.test_batch_size, 256))  # activations of a few hundred images stay in cache
        for k in range(num_nets):
            pk, bk = _net(params, k), _net(buffers, k)
            for i in range(0, test_x.shape[0], tb):
                logits = functional_call(base, (pk, bk), (test_x[i : i + tb],))
                correct[k] += (logits.argmax(-1) == test_y[i : i + tb]).sum()
    return correct / test_x.shape[0]


def _net(stacked: dict[str, Tensor], k: int) -> dict[str, Tensor]:
    """Network ``k``'s tensors (views) out of ``stack_module_state``'s stacked ones."""
    return {name: v[k] for name, v in stacked.items()}


def random_subset(y: Tensor, ipc: int, num_classes: int, seed: int = 0) -> Tensor:
    """Indices of ``ipc`` random examples per class, class-major ``(K * ipc,)``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(num_classes):
        idx = (y == k).nonzero().squeeze(1)
        out.append(idx[torch.randperm(idx.numel(), generator=g)[:ipc].to(idx.device)])
    return torch.cat(out)


def herding_subset(features: Tensor, y: Tensor, ipc: int, num_classes: int) -> Tensor:
    """Herding (Welling 2009), as the paper's baseline: per class, greedily add the example that
    brings the mean of the selected features closest to the class mean. ``features``: ``(N, D)``.
    Returns class-major indices ``(K * ipc,)``."""
    out = []
    for k in range(num_classes):
        idx = (y == k).nonzero().squeeze(1)
        f = features[idx]  # (n_k, D)
        mu, acc = f.mean(0), torch.zeros_like(f[0])
        free = torch.ones(idx.numel(), dtype=torch.bool, device=f.device)
        chosen = []
        for t in range(ipc):
            dist = ((mu - (acc + f) / (t + 1)) ** 2).sum(1).masked_fill(~free, float("inf"))
            j = int(dist.argmin())
            chosen.append(j)
            free[j] = False
            acc = acc + f[j]
        out.append(idx[torch.tensor(chosen, device=idx.device)])
    return torch.cat(out)
