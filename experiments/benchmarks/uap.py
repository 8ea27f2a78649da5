"""``cvlab bench uap``: data-free UAP optimisation throughput and the class-incremental step time.

1. UAP: images/s of one :class:`UniversalPerturbation` optimisation step (all budgets at once: ``E x B`` perturbed
   images in one forward/backward) against a loop over the budgets (one pass per budget), same model and batch.
   Images/s counts perturbed images (``E x B`` per step).
2. Continual learning: ms per :class:`ClassIncrementalLearner` training step with Data Impression replay (a batch of
   new data + a replay batch of impressions), LwF (distillation on the new data) and fine-tuning.

    uv run cvlab bench uap                                  # LeNet-5 on 1x32x32, CPU
    uv run cvlab bench uap --device cuda --bf16             # GPU
"""

from __future__ import annotations

import argparse
import functools
import tempfile
from pathlib import Path

import torch

from experiments.benchmarks import register_benchmark
from experiments.benchmarks._measure import add_device_args, device_from_args, hardware, measure, random_batch
from lit_modules.classifier import ClassifierModule
from lit_modules.distillation import ClassIncrementalLearner
from lit_modules.robustness import UniversalPerturbation
from lit_modules.robustness.uap_objective import fooling_loss
from lit_modules.teacher import load_teacher


def _checkpoint(folder: Path, args) -> str:
    torch.manual_seed(0)
    m = ClassifierModule(arch=args.arch, num_classes=10, in_channels=args.channels, image_size=args.image_size,
                         mean=[0.5] * args.channels, std=[0.25] * args.channels)
    path = folder / "model.ckpt"
    torch.save({"state_dict": m.state_dict(), "hyper_parameters": dict(m.hparams)}, path)
    return str(path)


@register_benchmark("uap")
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="cvlab bench uap")
    p.add_argument("--arch", default="lenet5")
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=100, help="images per UAP step / new-data batch per CL step")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3])
    p.add_argument("--replay-batch", type=int, default=128)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--part", choices=["uap", "cl", "both"], default="both")
    add_device_args(p)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    args = p.parse_args(argv)
    device = device_from_args(args)
    print(f"uap benchmark: {args.arch}, {args.channels}x{args.image_size}x{args.image_size}, batch {args.batch_size}, "
          f"{len(args.budgets)} budgets, {hardware(device)}{', bf16' if args.bf16 else ''}")
    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=args.bf16)
    x, y = random_batch(args, device)
    g = torch.Generator().manual_seed(1)  # the replayed "impressions" of the CL step
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = _checkpoint(Path(tmp), args)
        if args.part in ("uap", "both"):
            uap = UniversalPerturbation(model=ckpt, budgets=args.budgets).to(device)
            opt = uap.configure_optimizers()
            e = len(args.budgets)

            def batched() -> None:
                with autocast():
                    loss = uap.training_step((x, y), 0)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                uap.on_train_batch_end(None, None, 0)

            def looped() -> None:  # one forward/backward per budget
                with torch.no_grad():
                    clean = uap.model(x).argmax(-1)
                opt.zero_grad(set_to_none=True)
                for i in range(e):
                    with autocast():
                        xp = (x + uap.perturbation[i]).clamp(0, 1)
                        loss = fooling_loss(uap.model(xp), clean).mean()
                    loss.backward()
                opt.step()
                uap.on_train_batch_end(None, None, 0)

            for name, fn in (("batched", batched), ("loop over budgets", looped)):
                m = measure(fn, device, warmup=2, iters=args.iters)
                print(f"  uap step {name:18s} {m.rate(args.batch_size * e):9.0f} perturbed img/s | "
                      f"{m.seconds_per_iter * 1e3:7.1f} ms/step | peak mem {m.peak_mem_mb:7.0f} MB")
        if args.part in ("cl", "both"):
            for distill in ("impressions", "new", "none"):
                cl = ClassIncrementalLearner(distill=distill, arch=args.arch, in_channels=args.channels,
                                             image_size=args.image_size, replay_batch=args.replay_batch,
                                             mean=[0.5] * args.channels, std=[0.25] * args.channels).to(device)
                seen = torch.zeros(10, dtype=torch.bool, device=device)
                seen[:6] = True  # step 2 of 5: old 0-3, new 4-5
                cl.register_buffer("seen", seen, persistent=False)
                cl.register_buffer("old", torch.arange(4, device=device), persistent=False)
                cl.register_buffer("new", torch.tensor([4, 5], device=device), persistent=False)
                cl.previous = load_teacher(ckpt).to(device)
                if distill == "impressions":
                    shape = (1000, args.channels, args.image_size, args.image_size)
                    cl.replay_x = torch.rand(shape, generator=g).to(device)
                    with torch.no_grad():
                        cl.replay_logits = cl.previous(cl.replay_x)
                copt = torch.optim.Adam(cl.net.parameters(), lr=1e-3)  # the config's optimizer, no schedule
                yy = y % 2 + 4

                def step(cl=cl, copt=copt, yy=yy) -> None:
                    with autocast():
                        loss = cl.training_step((x, yy), 0)
                    copt.zero_grad(set_to_none=True)
                    loss.backward()
                    copt.step()

                m = measure(step, device, warmup=2, iters=args.iters)
                label = {"impressions": "impression replay", "new": "lwf", "none": "fine-tune"}[distill]
                print(f"  cl step {label:18s} {m.seconds_per_iter * 1e3:8.1f} ms/step | "
                      f"{m.rate(args.batch_size):8.0f} new img/s | peak mem {m.peak_mem_mb:7.0f} MB")
    return 0
