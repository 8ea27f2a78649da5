"""``cvlab bench robustness``: attack throughput against torchattacks, and the training step of each regime.

1. Attacks: images/s of our FGSM and PGD-10 (Linf) against torchattacks' on the same model and batch
   (torchattacks is a dev dependency: ``uv sync`` installs it).
2. Training: seconds per optimisation step of :class:`AdversarialTraining` in the clean, FGSM-AT, fast-AT
   (RS-FGSM) and PGD-AT regimes and of :class:`GrayBoxAdversarialTraining` (with a full snapshot bag and half of
   its adversaries crafted on a snapshot, so the snapshot path is what is timed).
3. Evaluation (``--part eval``): images/s of PGD-40 and of PGD-50 x 10 restarts (the restarts as one batch).

    uv run cvlab bench robustness --arch lenet5 --channels 1                      # MNIST-like 1x32x32
    uv run cvlab bench robustness --arch wong_mnist --image-size 28 --batch-size 100 --part train   # issue 36
    uv run cvlab bench robustness --arch resnet18 --channels 3 --bf16             # CIFAR-like, GPU
"""

from __future__ import annotations

import argparse
import functools

import torch

from experiments.benchmarks import register_benchmark
from experiments.benchmarks._measure import add_device_args, device_from_args, hardware, measure, random_batch
from lit_modules.robustness import (
    AdversarialTraining,
    CleanTraining,
    FastTraining,
    FGSMTraining,
    GrayBoxAdversarialTraining,
    PGDTraining,
)
from lit_modules.robustness.attacks import fgsm, pgd


def _trainer(args, regime: str, device: torch.device) -> tuple[AdversarialTraining, torch.optim.Optimizer]:
    """The system of ``regime`` (``gat``: GAT with a full bag, a snapshot seeding every batch from the first step)."""
    torch.manual_seed(0)
    common = {"eps": args.eps, "arch": args.arch, "in_channels": args.channels, "image_size": args.image_size,
              "num_classes": 10, "mean": [0.5] * args.channels, "std": [0.25] * args.channels}
    if regime == "gat":
        model = GrayBoxAdversarialTraining(adversary=FGSMTraining(), snapshot_share=0.5, warmup_epochs=0,
                                           **common).to(device)
        for e in range(model.bag.size):
            model.bag.add(model.net, e)
    else:
        adversary = {"clean": CleanTraining(), "fgsm": FGSMTraining(), "fast": FastTraining(),
                     "pgd": PGDTraining(steps=args.train_pgd_steps, alpha=None)}[regime]
        model = AdversarialTraining(adversary=adversary, **common)
    return model.to(device), torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


@register_benchmark("robustness")
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="cvlab bench robustness")
    p.add_argument("--arch", default="lenet5")
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--eps", type=float, default=0.3)
    p.add_argument("--pgd-steps", type=int, default=10, help="PGD steps of the attack benchmark")
    p.add_argument("--train-pgd-steps", type=int, default=10, help="PGD steps of PGD-AT")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3, help="attack timings: alternating rounds, best of each")
    p.add_argument("--part", choices=["attacks", "train", "eval", "both"], default="both")
    add_device_args(p)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    args = p.parse_args(argv)
    device = device_from_args(args)
    print(f"robustness benchmark: {args.arch}, {args.channels}x{args.image_size}x{args.image_size}, batch "
          f"{args.batch_size}, eps {args.eps}, {hardware(device)}{', bf16' if args.bf16 else ''}")
    x, y = random_batch(args, device)
    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=args.bf16)

    if args.part in ("attacks", "both"):
        import torchattacks

        model, _ = _trainer(args, "clean", device)
        model.eval()
        alpha = 2.5 * args.eps / args.pgd_steps
        ours = {
            "fgsm": lambda: fgsm(model, x, y, args.eps),
            f"pgd{args.pgd_steps}": lambda: pgd(model, x, y, args.eps, alpha=alpha, steps=args.pgd_steps),
        }
        theirs = {
            "fgsm": torchattacks.FGSM(model, eps=args.eps),
            f"pgd{args.pgd_steps}": torchattacks.PGD(model, eps=args.eps, alpha=alpha, steps=args.pgd_steps,
                                                     random_start=True),
        }
        for name in ours:
            def run_ours(f=ours[name]):
                with autocast():
                    f()

            def run_theirs(a=theirs[name]):
                with autocast():
                    a(x, y)

            # alternate the two, best of --rounds each: a shared CPU's noise hits both alike
            rounds = [(measure(run_ours, device, warmup=1, iters=args.iters),
                       measure(run_theirs, device, warmup=1, iters=args.iters)) for _ in range(args.rounds)]
            m_ours = min((r[0] for r in rounds), key=lambda m: m.seconds_per_iter)
            m_theirs = min((r[1] for r in rounds), key=lambda m: m.seconds_per_iter)
            print(f"  {name:8s} ours {m_ours.rate(args.batch_size):9.0f} img/s | torchattacks "
                  f"{m_theirs.rate(args.batch_size):9.0f} img/s | ours / theirs "
                  f"{m_ours.rate(1) / m_theirs.rate(1):5.2f}x | peak mem {m_ours.peak_mem_mb:7.0f} MB")

    if args.part in ("train", "both"):
        for regime in ("clean", "fgsm", "gat", "fast", "pgd"):
            model, opt = _trainer(args, regime, device)
            model.train()

            def step(model=model, opt=opt):
                with autocast():
                    loss = model.training_step((x, y), 0)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            m = measure(step, device, warmup=2, iters=args.iters)
            label = (f"pgd-at ({args.train_pgd_steps} steps)" if regime == "pgd"
                     else {"fgsm": "fgsm-at", "fast": "fast-at (rs-fgsm)"}.get(regime, regime))
            print(f"  train {label:20s} {m.seconds_per_iter * 1e3:8.1f} ms/step | {m.rate(args.batch_size):8.0f} img/s")

    if args.part == "eval":
        model, _ = _trainer(args, "clean", device)
        model.eval()
        for name, f in (("pgd40", lambda: pgd(model, x, y, args.eps, alpha=0.01, steps=40)),
                        ("pgd50x10", lambda: pgd(model, x, y, args.eps, alpha=0.01, steps=50, restarts=10))):
            def run(f=f):
                with autocast():
                    f()

            m = measure(run, device, warmup=1, iters=max(1, args.iters // 5))
            print(f"  eval {name:9s} {m.rate(args.batch_size):8.0f} img/s | peak mem {m.peak_mem_mb:7.0f} MB")
    return 0
