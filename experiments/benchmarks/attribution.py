"""``cvlab bench attribution``: attribution maps per second per method, batched vs one image at a time (the
Lost in Context code runs guided backprop image by image), and grad-cam's own classes where it has them.

On ``--arch`` (the embedded study's ConvNet, 3 x 32 x 32, 10 classes; or ``efficientnet_lite0`` at 224 x 224):
for each method, ``--batch-size`` images in one call vs the same images one call each (``--single`` of them,
scaled), and for GradCAM++ / ScoreCAM / FullGrad / Guided Backprop the ``pytorch_grad_cam`` classes on the same batch.

    uv run cvlab bench attribution --threads 2
    uv run cvlab bench attribution --arch efficientnet_lite0 --batch-size 16 \
        --methods gradcam gradcampp fullgrad guided_backprop
"""

from __future__ import annotations

import argparse

import torch

from experiments.benchmarks import register_benchmark
from experiments.benchmarks._measure import add_device_args, device_from_args, hardware, measure
from lit_modules.explanation.attribution import ATTRIBUTIONS, attribute, find_layer
from lit_modules.nets import create_net


def _net(arch: str) -> tuple[torch.nn.Module, int]:
    if arch == "efficientnet_lite0":
        from lit_modules.nets.efficientnet_lite import EfficientNetLite0

        return EfficientNetLite0(pretrained=True), 224
    return create_net(arch, num_classes=10, in_channels=3, image_size=32, width=32, depth=3, norm="batchnorm"), 32


def _grad_cam_runner(method: str, net: torch.nn.Module, layer: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    targets = [ClassifierOutputTarget(int(t)) for t in y]
    if method == "guided_backprop":
        gb = pgc.GuidedBackpropReLUModel(net, device=x.device)
        return lambda: [gb(x[i:i + 1], target_category=int(y[i])) for i in range(x.shape[0])]  # theirs: per image
    cls = {"gradcampp": pgc.GradCAMPlusPlus, "scorecam": pgc.ScoreCAM, "fullgrad": pgc.FullGrad}[method]
    cam = cls(model=net, target_layers=[] if method == "fullgrad" else [layer])
    cam.batch_size = 256
    return lambda: cam(input_tensor=x, targets=targets)


@register_benchmark("attribution")
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="cvlab bench attribution")
    p.add_argument("--arch", default="convnet")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--single", type=int, default=8, help="images timed one at a time (rate scaled)")
    p.add_argument("--methods", nargs="+", default=list(ATTRIBUTIONS))
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--no-grad-cam", action="store_true", help="skip the pytorch_grad_cam comparison")
    add_device_args(p)
    args = p.parse_args(argv)
    device = device_from_args(args)
    torch.manual_seed(0)
    net, size = _net(args.arch)
    net = net.to(device).eval()  # parameters keep requires_grad: grad-cam's classes backpropagate into them
    layer = find_layer(net, None)
    b = args.batch_size
    x = torch.rand(b, 3, size, size, device=device)
    with torch.no_grad():
        y = net(x).argmax(-1)
    print(f"attribution benchmark: {args.arch}, 3x{size}x{size}, batch {b}, {hardware(device)}; maps per second")
    print(f"  {'method':22s} {'batched':>10s} {'one by one':>11s} {'speed-up':>9s} {'grad-cam':>10s}")
    for method in args.methods:
        batched = measure(lambda: attribute(method, net, x, y, layer, 256), device, warmup=1, iters=args.iters)
        n = min(args.single, b)
        single = measure(lambda: [attribute(method, net, x[i:i + 1], y[i:i + 1], layer, 256) for i in range(n)],
                         device, warmup=1, iters=max(args.iters // 2, 1))
        r_b, r_s = batched.rate(b), single.rate(n)
        theirs = "-"
        if not args.no_grad_cam and method in ("gradcampp", "scorecam", "fullgrad", "guided_backprop"):
            xs, ys = (x[:n], y[:n]) if method == "guided_backprop" else (x, y)
            m = measure(_grad_cam_runner(method, net, layer, xs, ys), device, warmup=1, iters=max(args.iters // 2, 1))
            theirs = f"{m.rate(xs.shape[0]):10.1f}"
        print(f"  {method:22s} {r_b:10.1f} {r_s:11.1f} {r_b / r_s:8.1f}x {theirs:>10s}   "
              f"(peak {batched.peak_mem_mb:.0f} MB)")
    return 0
