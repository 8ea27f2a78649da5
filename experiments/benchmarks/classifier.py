"""``cvlab bench classifier``: training throughput of the classifier, cvlab data path vs torchvision's.

cvlab's path: uint8 tensors in memory, one gather per batch, augmentation + normalisation batched on
the training device. The reference: a plain torchvision pipeline (PIL images, per-image transforms,
DataLoader workers), as in the papers' own code. Both feed the same network and optimizer.

    uv run cvlab bench classifier --arch lenet5 --data mnist --data-dir /path/with/MNIST
    uv run cvlab bench classifier --arch resnet18 --data cifar-like       # random 32x32 RGB, no files needed
"""

from __future__ import annotations

import argparse
import itertools
import os

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from experiments.benchmarks import register_benchmark
from experiments.benchmarks._measure import add_device_args, device_from_args, hardware, measure
from lit_modules.nets import create_net


def _cvlab_batches(args, device):
    from datamodules import MNISTDataModule, TensorImageDataModule

    if args.data == "mnist":
        dm = MNISTDataModule(data_dir=args.data_dir, image_size=32, batch_size=args.batch_size, augment="crop")
    else:
        dm = TensorImageDataModule(batch_size=args.batch_size, augment="crop_flip")
        g = torch.Generator().manual_seed(0)
        dm.train_x = torch.randint(0, 256, (args.num_images, 3, 32, 32), dtype=torch.uint8, generator=g)
        dm.train_y = torch.randint(0, 10, (args.num_images,), generator=g)
        dm.test_x, dm.test_y = dm.train_x, dm.train_y
    dm.setup("fit")
    loader = dm.train_dataloader()

    class _Trainer:  # what on_after_batch_transfer reads of a trainer
        training, global_rank, global_step, current_epoch = True, 0, 0, 0

    dm.trainer = _Trainer()  # type: ignore[assignment]
    it = itertools.cycle(loader)

    def next_batch():
        x, y = next(it)
        return dm.on_after_batch_transfer((x.to(device, non_blocking=True), y.to(device, non_blocking=True)), 0)

    return next_batch, dm.in_channels


def _torchvision_batches(args, device):
    import torchvision.transforms as T
    from torchvision.datasets import MNIST, FakeData

    if args.data == "mnist":
        tf = T.Compose([T.Resize(32), T.RandomCrop(32, padding=4), T.ToTensor(), T.Normalize((0.1307,), (0.3081,))])
        ds = MNIST(args.data_dir, train=True, transform=tf)
        channels = 1
    else:
        tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                        T.Normalize((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))])
        ds = FakeData(size=args.num_images, image_size=(3, 32, 32), num_classes=10, transform=tf)
        channels = 3
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                        pin_memory=device.type == "cuda", drop_last=True, persistent_workers=args.workers > 0)
    it = itertools.cycle(loader)

    def next_batch():
        x, y = next(it)
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    return next_batch, channels


@register_benchmark("classifier")
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="cvlab bench classifier")
    p.add_argument("--arch", default="lenet5")
    p.add_argument("--data", choices=["mnist", "cifar-like"], default="mnist")
    p.add_argument("--data-dir", default=os.environ.get("CVLAB_DATA", "./data"))
    p.add_argument("--pipeline", choices=["cvlab", "torchvision", "both"], default="both")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for the torchvision pipeline")
    p.add_argument("--num-images", type=int, default=10000, help="size of the random cifar-like set")
    add_device_args(p)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    args = p.parse_args(argv)
    device = device_from_args(args)
    pipelines = ["cvlab", "torchvision"] if args.pipeline == "both" else [args.pipeline]
    print(f"classifier benchmark: {args.arch} on {args.data}, batch {args.batch_size}, {hardware(device)}")
    for name in pipelines:
        next_batch, channels = (_cvlab_batches if name == "cvlab" else _torchvision_batches)(args, device)
        torch.manual_seed(0)
        net = create_net(args.arch, num_classes=10, in_channels=channels, image_size=32).to(device)
        if args.channels_last:
            net = net.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

        def step():
            x, y = next_batch()
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        m = measure(step, device, warmup=3, iters=args.steps)
        data_only = measure(next_batch, device, warmup=2, iters=args.steps)
        print(f"  {name:12s} train {m.rate(args.batch_size):9.0f} img/s | data path alone "
              f"{data_only.rate(args.batch_size):9.0f} img/s | peak mem {m.peak_mem_mb:7.0f} MB")
    return 0
