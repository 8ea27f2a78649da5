"""``cvlab bench zskd``: Data Impressions per second and peak memory at the paper's settings, and one
batched synthesis vs a per-class loop of the same total work (ZSKD, Nayak et al., ICML 2019).

Both paths call :func:`lit_modules.distillation.zskd.synthesize` on a randomly initialised teacher
(the cost does not depend on its weights): "batched" optimises ``--per-class`` impressions of every
class in one batch; "per-class" makes one call per class, as a loop over classes would.
"""

from __future__ import annotations

import argparse

import torch

from experiments.benchmarks import register_benchmark
from experiments.benchmarks._measure import add_device_args, device_from_args, hardware, measure
from lit_modules.distillation.data_impressions import class_similarity, dirichlet_targets, final_linear
from lit_modules.distillation.zskd import initial_images, synthesize
from lit_modules.nets import create_net
from lit_modules.teacher import FrozenTeacher

SETTINGS = {"mnist": ("lenet5", 1), "cifar10": ("alexnet_cifar", 3)}


@register_benchmark("zskd")
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="cvlab bench zskd", description=__doc__)
    p.add_argument("--task", choices=sorted(SETTINGS), default="cifar10")
    p.add_argument("--per-class", type=int, default=10,
                   help="impressions per class (10 classes: batch 100, the paper's)")
    p.add_argument("--iterations", type=int, default=1500, help="Adam steps (paper: 1500)")
    p.add_argument("--bf16", action="store_true",
                   help="bf16 autocast of the teacher (what trainer.precision=bf16-mixed does in the synthesis stage)")
    add_device_args(p)
    a = p.parse_args(argv)
    dev = device_from_args(a)
    arch, ch = SETTINGS[a.task]
    torch.manual_seed(0)
    teacher = FrozenTeacher(create_net(arch, 10, ch, 32)).to(dev)
    n = 10 * a.per_class
    y, classes, _ = dirichlet_targets(class_similarity(final_linear(teacher).weight), n)
    y, x0 = y.to(dev), initial_images(torch.arange(n), (ch, 32, 32), "uniform", 0).to(dev)

    def run(x: torch.Tensor, t: torch.Tensor) -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.bf16):
            synthesize(teacher, x, t, a.iterations, 1e-3, 20.0)

    def batched() -> None:
        run(x0, y)

    def per_class() -> None:
        for k in range(10):
            m = (classes == k).to(dev)
            run(x0[m], y[m])

    bat = measure(batched, dev, warmup=1, iters=1)
    loop = measure(per_class, dev, warmup=1, iters=1)
    print(f"hardware: {hardware(dev)}")
    print(f"ZSKD {a.task} ({arch}, {ch}x32x32), {a.iterations} Adam iterations, tau 20, {n} impressions"
          f"{', bf16 autocast' if a.bf16 else ''}")
    print(f"batched (1 batch of {n}): {bat.rate(n):.2f} DIs/s ({bat.seconds_per_iter:.2f} s), "
          f"peak mem {bat.peak_mem_mb:.0f} MB")
    print(f"per-class loop (10 x {a.per_class}): {loop.rate(n):.2f} DIs/s ({loop.seconds_per_iter:.2f} s), "
          f"peak mem {loop.peak_mem_mb:.0f} MB")
    print(f"speed-up batched / per-class: {bat.rate(n) / loop.rate(n):.2f}x")
    return 0
