"""Timing and peak-memory measurement shared by the benchmarks, and the stock-layer reference of a cvlab net."""

from __future__ import annotations

import copy
import platform
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Measurement:
    seconds_per_iter: float
    iters: int
    peak_mem_mb: float
    device: str

    def rate(self, items_per_iter: float) -> float:
        return items_per_iter / self.seconds_per_iter


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def measure(fn: Callable[[], object], device: torch.device, warmup: int = 3, iters: int = 10) -> Measurement:
    """Run ``fn`` ``warmup`` times, then time ``iters`` calls (synchronising CUDA once at each end).

    Peak memory: CUDA max allocated on GPU; the process's peak RSS on CPU.
    """
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = (time.perf_counter() - t0) / iters
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return Measurement(dt, iters, peak, str(device))


def add_device_args(parser, threads_default: int | None = None) -> None:
    """``--device`` (CUDA when available) and ``--threads`` (torch CPU threads), shared by every benchmark."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=threads_default, help="torch CPU threads")


def random_batch(args, device: torch.device, num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded batch of ``--batch-size`` random ``--channels x --image-size^2`` pixels and labels, on ``device``."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch_size, args.channels, args.image_size, args.image_size, generator=g).to(device)
    return x, torch.randint(0, num_classes, (args.batch_size,), generator=g).to(device)


def device_from_args(args) -> torch.device:
    """Apply ``--threads`` and return ``--device``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.device(args.device)


def stock_layers(net: nn.Module) -> nn.Module:
    """A copy of ``net`` with cvlab's CPU-fast layers swapped for the stock ones they equal (same weights), as the
    papers' public code and plain PyTorch build it: ``FewChannelConv2d`` -> ``nn.Conv2d``, ``AvgPool2x2`` ->
    ``nn.AvgPool2d(2, 2)``, ``MaxPool2x2`` -> ``nn.MaxPool2d(2)``."""
    from lit_modules.nets.convnet import FewChannelConv2d
    from lit_modules.nets.pooling import AvgPool2x2, MaxPool2x2

    ref = copy.deepcopy(net)
    for parent in list(ref.modules()):
        for name, m in parent.named_children():
            if isinstance(m, FewChannelConv2d):
                conv = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding)
                conv.load_state_dict(m.state_dict())
                setattr(parent, name, conv)
            elif isinstance(m, AvgPool2x2):
                setattr(parent, name, nn.AvgPool2d(2, 2))
            elif isinstance(m, MaxPool2x2):
                setattr(parent, name, nn.MaxPool2d(2))
    return ref
