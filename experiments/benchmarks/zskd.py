"""``cvlab bench zskd``: Data Impressions per second and peak memory at the paper's settings, and one
batched synthesis vs a per-class loop of the same total work (ZSKD, Nayak et al., ICML 2019); then KD student
steps per second (``--student-steps``) with cvlab's 2x2 max pooling vs the stock ``nn.MaxPool2d``.

Both synthesis paths call :func:`lit_modules.distillation.zskd.synthesize` on a randomly initialised teacher
(the cost does not depend on its weights): "batched" optimises ``--per-class`` impressions of every
class in one batch; "per-class" makes one call per class, as a loop over classes would. A student step is the
KDStudent's: augment the batch, the frozen teacher labels it, one Adam step of the student on the KD loss.
"""

from __future__ import annotations

import argparse

import torch

from cvlab.image_ops import random_affine
from experiments.benchmarks import register_benchmark
from experiments.benchmarks._measure import add_device_args, device_from_args, hardware, measure, stock_layers
from lit_modules.distillation.data_impressions import class_similarity, dirichlet_targets, final_linear
from lit_modules.distillation.kd_loss import distillation_loss
from lit_modules.distillation.zskd import initial_images, synthesize
from lit_modules.nets import create_net
from lit_modules.teacher import FrozenTeacher

SETTINGS = {"mnist": ("lenet5", 1), "cifar10": ("alexnet_cifar", 3)}
STUDENTS = {"mnist": "lenet5_half", "cifar10": "alexnet_cifar_half"}


def student_steps(task: str, batch: int, steps: int, stock: bool, dev: torch.device):
    """Time ``steps`` KD student steps (ZSKD's augmentation, tau 20, Adam 1e-3) on random [0, 1] images."""
    arch, ch = SETTINGS[task]
    torch.manual_seed(0)
    teacher, student = create_net(arch, 10, ch, 32), create_net(STUDENTS[task], 10, ch, 32)
    if stock:
        teacher, student = stock_layers(teacher), stock_layers(student)
    teacher, student = FrozenTeacher(teacher).to(dev), student.to(dev)
    opt = torch.optim.Adam(student.parameters(), 1e-3)
    x = torch.rand(batch, ch, 32, 32, device=dev)
    g = torch.Generator(device=dev)
    g.manual_seed(0)

    def step() -> None:
        xa = random_affine(x, 0.1, 0.1, 15.0, False, g)
        with torch.no_grad():
            t = teacher(xa)
        loss = distillation_loss(student(xa), t, None, 20.0, 0.0)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return measure(step, dev, warmup=3, iters=steps)


@register_benchmark("zskd")
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="cvlab bench zskd", description=__doc__)
    p.add_argument("--task", choices=sorted(SETTINGS), default="cifar10")
    p.add_argument("--per-class", type=int, default=10,
                   help="impressions per class (10 classes: batch 100, the paper's)")
    p.add_argument("--iterations", type=int, default=1500, help="Adam steps (paper: 1500)")
    p.add_argument("--bf16", action="store_true",
                   help="bf16 autocast of the teacher (what trainer.precision=bf16-mixed does in the synthesis stage)")
    p.add_argument("--student-steps", type=int, default=0,
                   help="also time this many KD student steps, cvlab's pooling vs the stock nn.MaxPool2d (0: skip)")
    p.add_argument("--student-batch", type=int, default=128, help="student batch size (the pipelines': 128)")
    p.add_argument("--skip-synthesis", action="store_true", help="only the student steps")
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

    print(f"hardware: {hardware(dev)}")
    if a.student_steps:
        ours = student_steps(a.task, a.student_batch, a.student_steps, False, dev)
        ref = student_steps(a.task, a.student_batch, a.student_steps, True, dev)
        print(f"KD student steps, {arch} -> {STUDENTS[a.task]}, batch {a.student_batch}: cvlab pooling "
              f"{1000 * ours.seconds_per_iter:.1f} ms/step, stock nn.MaxPool2d {1000 * ref.seconds_per_iter:.1f} "
              f"ms/step: {ref.seconds_per_iter / ours.seconds_per_iter:.2f}x")
    if a.skip_synthesis:
        return 0
    bat = measure(batched, dev, warmup=1, iters=1)
    loop = measure(per_class, dev, warmup=1, iters=1)
    print(f"ZSKD {a.task} ({arch}, {ch}x32x32), {a.iterations} Adam iterations, tau 20, {n} impressions"
          f"{', bf16 autocast' if a.bf16 else ''}")
    print(f"batched (1 batch of {n}): {bat.rate(n):.2f} DIs/s ({bat.seconds_per_iter:.2f} s), "
          f"peak mem {bat.peak_mem_mb:.0f} MB")
    print(f"per-class loop (10 x {a.per_class}): {loop.rate(n):.2f} DIs/s ({loop.seconds_per_iter:.2f} s), "
          f"peak mem {loop.peak_mem_mb:.0f} MB")
    print(f"speed-up batched / per-class: {bat.rate(n) / loop.rate(n):.2f}x")
    return 0
