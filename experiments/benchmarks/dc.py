"""``cvlab bench dc``: Dataset Condensation's outer iteration, batched classes vs the per-class loop.

One outer iteration (Zhao et al., ICLR 2021, Alg. 1) = ``outer_loop`` x (match + image update) +
``outer_loop - 1`` x ``inner_loop`` epochs of network training on the synthetic set. The benchmark
times one match+update and one inner epoch on random MNIST-shaped data and composes them:
``s/outer = outer * t_match + (outer - 1) * inner * t_epoch``.

    uv run cvlab bench dc --ipc 1 10 50 --variants loop batched loop+bf16+compile --iters 3
    uv run cvlab bench dc --ipc 1 --variants reference loop+bf16+compile --chunk 64   # vs the public code's structure
    uv run cvlab bench dc --ipc 10 --variants reference loop+bf16+compile loop+bf16+compile+inner16

``+inner16``: the inner epochs in bf16 autocast, compiled (``bf16_inner`` + ``compile_inner``); every
other row times the inner epoch as the public code runs it (fp32, eager).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from experiments.benchmarks import register_benchmark
from experiments.benchmarks._measure import add_device_args, device_from_args, hardware, measure, stock_layers
from lit_modules.condensation.dc import PAPER_LOOPS, train_on_set
from lit_modules.condensation.dc_eval import EvalRecipe, train_and_test
from lit_modules.condensation.gradient_matching import RealGradients, gradient_match_distance, match_loss
from lit_modules.nets import create_net


def _match_step(net, real_grads: RealGradients, mode: str, images, x_real, ipc: int, opt) -> None:
    """One match + image update, as :meth:`lit_modules.DatasetCondensation.match` does it."""
    k = x_real.shape[0]
    params = {n: p.detach() for n, p in net.named_parameters()}
    buffers = dict(net.named_buffers())
    y_real = torch.arange(k, device=x_real.device)[:, None].expand(-1, x_real.shape[1])
    y_syn = torch.arange(k, device=x_real.device)[:, None].expand(-1, ipc)
    g_real = real_grads(params, buffers, x_real, y_real)
    loss = match_loss(net, params, buffers, g_real, images.view(k, ipc, *images.shape[1:]), y_syn, mode=mode)
    (images.grad,) = torch.autograd.grad(loss, images)
    opt.step()


def _reference_step(net: nn.Module, images, x_real, ipc: int, opt) -> None:
    """One match + image update written the way the public DC code runs it: an ``nn.Module`` in fp32,
    ``autograd.grad`` per class on the real batch, a ``create_graph`` gradient on the synthetic images."""
    params = list(net.parameters())
    loss = images.new_zeros(())
    for c in range(x_real.shape[0]):
        y = torch.full((x_real.shape[1],), c, device=x_real.device)
        g_real = [g.detach() for g in torch.autograd.grad(F.cross_entropy(net(x_real[c]), y), params)]
        y_syn = torch.full((ipc,), c, device=x_real.device)
        g_syn = torch.autograd.grad(F.cross_entropy(net(images[c * ipc : (c + 1) * ipc]), y_syn), params,
                                    create_graph=True)
        loss = loss + gradient_match_distance(list(g_syn), g_real)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _add_task_args(ap: argparse.ArgumentParser) -> None:
    """The task shape (MNIST's by default) and ``--device``/``--threads``, shared by both DC benchmarks."""
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--size", type=int, default=28)
    add_device_args(ap, threads_default=2)


VARIANTS = ("reference", "loop", "batched", "loop+bf16", "loop+compile", "loop+bf16+compile", "batched+bf16+compile",
            "loop+bf16+compile+inner16")


@register_benchmark("dc")
def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="cvlab bench dc", description=__doc__.splitlines()[0])
    ap.add_argument("--ipc", type=int, nargs="+", default=[1, 10, 50])
    ap.add_argument("--variants", nargs="+", default=["loop", "batched", "loop+bf16+compile"], choices=VARIANTS,
                    help="class mode (loop: per-class passes, batched: vmap over classes) + bf16 real "
                         "gradients + torch.compile; 'reference': the public DC code's structure (nn.Module, "
                         "autograd.grad per class, fp32, stock conv and pooling), the speed bar's yardstick")
    ap.add_argument("--batch-real", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=None,
                    help="real images per pass within a class (RealGradients chunk; default: the whole batch)")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    _add_task_args(ap)
    args = ap.parse_args(argv)
    dev = device_from_args(args)
    k, c, s = args.classes, args.channels, args.size
    print(f"dc benchmark on {hardware(dev)}; ConvNet width {args.width}, {k} classes, {c}x{s}x{s}, "
          f"batch_real {args.batch_real}")
    print("ipc  variant               s/match  s/inner-epoch  outer(o,i)  s/outer-it  outer-it/s  peak MB")
    for ipc in args.ipc:
        outer, inner = PAPER_LOOPS[ipc]
        net = create_net("convnet", k, c, s, width=args.width).to(dev)
        x_real = torch.randn(k, args.batch_real, c, s, s, device=dev)
        images = torch.randn(k * ipc, c, s, s, device=dev, requires_grad=True)
        labels = torch.arange(k, device=dev).repeat_interleave(ipc)
        opt = torch.optim.SGD([images], lr=0.1, momentum=0.5)
        net_opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.5)

        shuffle = torch.Generator(device=dev).manual_seed(0)
        epoch_s: dict[bool, float] = {}  # inner16 -> s per inner epoch (no inner loop when outer == 1)
        for inner16 in sorted({v.endswith("+inner16") for v in args.variants} if outer > 1 else set()):
            fwd = torch.compile(net, dynamic=False) if inner16 else net
            epoch = lambda: train_on_set(fwd, net_opt, images.detach(), labels, 1, 256, shuffle, bf16=inner16)  # noqa: B023, E731
            epoch_s[inner16] = measure(epoch, dev, warmup=2 if inner16 else 1,
                                       iters=max(1, args.iters)).seconds_per_iter

        for variant in args.variants:
            mode = variant.split("+")[0]
            t_epoch = epoch_s.get(variant.endswith("+inner16"), 0.0)
            if variant == "reference":
                ref = stock_layers(net)  # the public DC code's stock nn.Conv2d / nn.AvgPool2d
                step = lambda: _reference_step(ref, images, x_real, ipc, opt)  # noqa: E731
            else:
                rg = RealGradients(net, mode, bf16="bf16" in variant, compile="compile" in variant, chunk=args.chunk)
                step = lambda: _match_step(net, rg, mode, images, x_real, ipc, opt)  # noqa: E731
            if "compile" in variant:
                step()  # compile outside the timed region (once per run)
            m = measure(step, dev, warmup=args.warmup, iters=args.iters)
            per_outer = outer * m.seconds_per_iter + (outer - 1) * inner * t_epoch
            print(f"{ipc:<4} {variant:<21} {m.seconds_per_iter:7.3f}  {t_epoch:13.4f}  ({outer},{inner})".ljust(62)
                  + f"{per_outer:9.2f}  {1 / per_outer:10.4f}  {m.peak_mem_mb:7.0f}", flush=True)
    return 0


EVAL_VARIANTS = ("vmap", "loop", "loop+compile")


@register_benchmark("dc-eval")
def eval_main(argv: list[str]) -> int:
    """``cvlab bench dc-eval``: the evaluation protocol (N fresh ConvNets trained on a condensed set,
    then tested), all networks vmapped vs a loop over them (eager or compiled).

        uv run cvlab bench dc-eval --ipc 1 10 --epochs 20 --variants vmap loop loop+compile
    """
    ap = argparse.ArgumentParser(prog="cvlab bench dc-eval", description=eval_main.__doc__.splitlines()[0])
    ap.add_argument("--ipc", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--variants", nargs="+", default=list(EVAL_VARIANTS), choices=EVAL_VARIANTS)
    ap.add_argument("--nets", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=20, help="timed training epochs (the protocol runs 300-1000)")
    ap.add_argument("--augment", default="crop_scale_rotate", help="DC augmentation (MNIST's by default)")
    ap.add_argument("--test-images", type=int, default=2000)
    _add_task_args(ap)
    args = ap.parse_args(argv)
    dev = device_from_args(args)
    k, c, s = args.classes, args.channels, args.size
    print(f"dc-eval benchmark on {hardware(dev)}; {args.nets} ConvNets, {k} classes, {c}x{s}x{s}, "
          f"augment {args.augment}")
    print("ipc  variant        s/epoch  test img/s  (x nets)  est. protocol min (1000 ep. + 10k test)")
    g = torch.Generator().manual_seed(0)
    tx = torch.randn(args.test_images, c, s, s, generator=g).to(dev)
    ty = torch.randint(0, k, (args.test_images,), generator=g).to(dev)
    for ipc in args.ipc:
        x = torch.randn(k * ipc, c, s, s, generator=g).to(dev)
        y = torch.arange(k, device=dev).repeat_interleave(ipc)
        for variant in args.variants:
            mode, compiled = variant.split("+")[0], variant.endswith("+compile")

            def run(epochs: int, n_test: int) -> float:
                r = EvalRecipe(epochs=epochs, augment=args.augment, parallel=mode, compile=compiled)
                t0 = time.perf_counter()
                train_and_test(x, y, tx[:n_test], ty[:n_test], "convnet", k, num_nets=args.nets, recipe=r)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                return time.perf_counter() - t0

            run(2, 1)  # warm-up (and compilation, once per process and shape)
            t_train = run(args.epochs, 1) / args.epochs
            t_test = max(run(0, args.test_images), 1e-9)
            per_img = t_test / args.test_images
            protocol = (1000 * t_train + 10_000 * per_img) / 60
            print(f"{ipc:<4} {variant:<13} {t_train:8.3f}  {args.test_images / t_test:10.0f}  "
                  f"           {protocol:8.1f}", flush=True)
    return 0
