"""``cvlab bench idlg``: DLG/iDLG trials per second, batched (vmap over trials) vs one trial at a time.

Both paths run the same attack (:mod:`lit_modules.leakage.gradient_leakage`, :func:`batched_lbfgs`) on the
papers' victim (sigmoid LeNet, U(-0.5, 0.5)) with MNIST-shaped random images; "sequential" calls it with
one trial, as the papers' script does. Sequential time for ``--trials`` is extrapolated from
``--sequential-trials``.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from experiments.benchmarks import register_benchmark
from experiments.benchmarks._measure import add_device_args, device_from_args, hardware, measure
from lit_modules.leakage.batched_optim import batched_lbfgs
from lit_modules.leakage.gradient_leakage import StackedVictims, attack_objective, extract_labels_from_gradients
from lit_modules.nets import create_net


def run_trials(
    first: int, n: int, method: str, steps: int, max_iter: int, device: torch.device, size: int = 28
) -> None:
    """Attack trials ``first .. first + n - 1`` together (victim and image seeded by the trial index)."""
    nets, xs, ys = [], [], []
    for t in range(first, first + n):
        torch.manual_seed(t)
        nets.append(create_net("lenet_sigmoid", 10, 1, size).to(device))
        xs.append(torch.rand(1, 1, size, size))
        ys.append(torch.randint(0, 10, (1,)))
    v = StackedVictims.from_nets(nets)
    x, y = torch.stack(xs).to(device), torch.stack(ys).to(device)
    shared = [g.detach() for g in v.gradients(x, F.one_hot(y, 10).float())]
    labels = extract_labels_from_gradients(shared[list(v.params).index(v.fc_weight)])
    z0 = torch.randn(n, size * size + (10 if method == "dlg" else 0), device=device)
    batched_lbfgs(attack_objective(v, shared, (1, 1, size, size), method, labels), z0,
                  steps=steps, max_iter=max_iter, stop_loss=1e-6)


@register_benchmark("idlg")
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="cvlab bench idlg", description=__doc__)
    p.add_argument("--method", choices=["idlg", "dlg"], default="idlg")
    p.add_argument("--trials", type=int, default=1000)
    p.add_argument("--batch", type=int, default=250, help="trials per vectorised batch")
    p.add_argument("--sequential-trials", type=int, default=20, help="trials timed one at a time (then extrapolated)")
    p.add_argument("--iterations", type=int, default=300, help="L-BFGS steps per trial")
    p.add_argument("--max-iter", type=int, default=20, help="L-BFGS iterations per step (torch's default 20)")
    add_device_args(p)
    a = p.parse_args(argv)
    dev = device_from_args(a)

    def sequential() -> None:
        for t in range(a.sequential_trials):
            run_trials(t, 1, a.method, a.iterations, a.max_iter, dev)

    def batched() -> None:
        for first in range(0, a.trials, a.batch):
            run_trials(first, min(a.batch, a.trials - first), a.method, a.iterations, a.max_iter, dev)

    seq = measure(sequential, dev, warmup=0, iters=1)
    bat = measure(batched, dev, warmup=0, iters=1)
    seq_rate, bat_rate = seq.rate(a.sequential_trials), bat.rate(a.trials)
    print(f"hardware: {hardware(dev)}")
    print(f"{a.method}, {a.iterations} L-BFGS steps x max_iter {a.max_iter}, MNIST 1x28x28, sigmoid LeNet")
    print(f"sequential: {seq_rate:.3f} trials/s ({a.sequential_trials} trials in {seq.seconds_per_iter:.1f} s; "
          f"{a.trials} trials ~ {a.trials / seq_rate:.0f} s), peak mem {seq.peak_mem_mb:.0f} MB")
    print(f"batched ({a.batch}/batch): {bat_rate:.3f} trials/s ({a.trials} trials in {bat.seconds_per_iter:.1f} s), "
          f"peak mem {bat.peak_mem_mb:.0f} MB")
    print(f"speed-up: {bat_rate / seq_rate:.1f}x")
    return 0
