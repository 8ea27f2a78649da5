r"""Train the classic tanh LeNet-5 on MNIST the way a user's own script would, outside cvlab: 28x28 images,
pixels scaled to [-1, 1] (mean 0.5, std 0.5), saved as a plain ``{"model": state_dict}`` with the class's own
layer names. The result is a teacher "that nobody here trained" for
``cvlab run experiments/zskd/mnist/outside_teacher.yaml``.

    uv run python -m experiments.examples.train_outside_lenet --data $CVLAB_DATA \
        --out runs/examples/tanh_lenet5_mnist.pth
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from datamodules import MNISTDataModule
from experiments.examples.outside_nets import TanhLeNet5


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.environ.get("CVLAB_DATA", "data"), help="folder holding MNIST/raw")
    p.add_argument("--out", default="runs/examples/tanh_lenet5_mnist.pth")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    mnist = MNISTDataModule(data_dir=a.data)  # only its reader: uint8 (N, 1, 28, 28) and labels
    prep = lambda xy: ((xy[0].float().div(255) - 0.5) / 0.5, xy[1])  # noqa: E731  pixels to [-1, 1]
    (x, y), (xt, yt) = prep(mnist.load_split(train=True)), prep(mnist.load_split(train=False))
    net = TanhLeNet5()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    t0 = time.perf_counter()
    for epoch in range(a.epochs):
        net.train()
        perm = torch.randperm(x.shape[0])
        for i in range(0, x.shape[0], 128):
            idx = perm[i : i + 128]
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            acc = torch.cat([net(xt[i : i + 1000]).argmax(-1)
                             for i in range(0, xt.shape[0], 1000)]).eq(yt).float().mean()
        print(f"epoch {epoch + 1}: test accuracy {acc:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": net.state_dict(), "test_acc": float(acc)}, a.out)
    print(f"saved {a.out}")


if __name__ == "__main__":
    main()
