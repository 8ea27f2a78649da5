"""``cvlab bench severity``: the cost of :class:`FoolingSeverity` updates per 10,000 images next to the attacks'.

For a batch of ``--batch-size`` images: one metric update (clean and adversarial logits, labels), FGSM and PGD
(``--pgd-steps``) on ``--arch``; every time is scaled to 10,000 images. The metric's cost is also measured on a
1,000-class random tree (ImageNet-sized tables), to show that the batched table lookups do not grow with K.

    uv run cvlab bench severity --arch lenet5 --threads 1
"""

from __future__ import annotations

import argparse
import functools

import torch

from experiments.benchmarks import register_benchmark
from experiments.benchmarks._measure import add_device_args, device_from_args, hardware, measure
from lit_modules.nets import create_net
from lit_modules.robustness.attacks import fgsm, pgd
from lit_modules.robustness.hierarchy import ClassHierarchy, load_hierarchy
from lit_modules.robustness.severity import FoolingSeverity


def random_tree(num_classes: int, branching: int = 10, seed: int = 0) -> ClassHierarchy:
    """A random tree: classes under inner nodes grouped ``branching`` at a time until one root remains."""
    g = torch.Generator().manual_seed(seed)
    parents: dict[str, str | None] = {}
    level = [f"c{i}" for i in torch.randperm(num_classes, generator=g).tolist()]
    depth = 0
    while len(level) > 1:
        nxt = [f"n{depth}_{j}" for j in range((len(level) + branching - 1) // branching)]
        for i, node in enumerate(level):
            parents[node] = nxt[i // branching]
        level, depth = nxt, depth + 1
    parents[level[0]] = None
    return ClassHierarchy.from_parents(parents, [f"c{i}" for i in range(num_classes)])


@register_benchmark("severity")
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="cvlab bench severity")
    p.add_argument("--arch", default="lenet5")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--pgd-steps", type=int, default=10)
    p.add_argument("--iters", type=int, default=10)
    add_device_args(p)
    args = p.parse_args(argv)
    device = device_from_args(args)
    b, scale = args.batch_size, 10_000 / args.batch_size
    print(f"severity benchmark: {args.arch}, 1x32x32, batch {b}, {hardware(device)}; seconds per 10,000 images")
    torch.manual_seed(0)
    net = create_net(args.arch, num_classes=10, in_channels=1, image_size=32).to(device).eval()
    x = torch.rand(b, 1, 32, 32, device=device)
    y = torch.randint(0, 10, (b,), device=device)
    rows = []
    for name, hier in (("metric update, K=10 (fashion_mnist tree)", load_hierarchy("fashion_mnist")),
                       ("metric update, K=1000 (random tree)", random_tree(1000))):
        k = hier.num_classes
        metric = FoolingSeverity(hier, validate_args=False).to(device)
        clean, adv = torch.randn(b, k, device=device), torch.randn(b, k, device=device)
        yk = torch.randint(0, k, (b,), device=device)
        rows.append((name, measure(lambda: metric.update(clean, adv, yk), device, iters=args.iters * 5)))
    with torch.no_grad():
        rows.append((f"{args.arch} forward (clean logits)", measure(lambda: net(x), device, iters=args.iters)))
    rows.append((f"FGSM on {args.arch}", measure(functools.partial(fgsm, net, x, y, args.eps, check=False), device,
                                              iters=args.iters)))
    rows.append((f"PGD-{args.pgd_steps} on {args.arch}",
                 measure(functools.partial(pgd, net, x, y, args.eps, steps=args.pgd_steps, check=False), device,
                         iters=max(args.iters // 3, 2))))
    base = rows[0][1].seconds_per_iter
    for name, m in rows:
        print(f"  {name:45s} {m.seconds_per_iter * scale:9.4f} s   ({m.seconds_per_iter / base:7.1f}x the K=10 update)")
    return 0
