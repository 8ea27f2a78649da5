"""``cvlab bench cbgan``: GAN steps per second of CBGAN (Rangwani et al., UAI 2021) and FID throughput.

Measured (random weights; the cost does not depend on them):

* ``d_step``: one discriminator step (G forward without grad, D on [real; fake], gradients, Adam);
* ``g_step``: one generator step (relativistic loss: D on [real; fake]), without and with the class-balancing
  regulariser (a LeNet-5 classifier in the loop: its forward and backward to the images);
* ``inception``: images/s through the packaged TorchScript InceptionV3 (grey 28 px -> 299 px, 2048-d features),
  the cost of FID / KID;
* ``domain``: images/s through the classifier's penultimate features (domain FID);
* ``fid_compute``: the Frechet distance from accumulated 2048-d statistics: torchmetrics' FID (states and
  ``compute``, fed the same features through an identity feature module) against
  :func:`lit_modules.generation.metrics.frechet_distance` on the same features.

Defaults: MNIST-LT's CPU setting (28 px grey, SNDCGAN width 8, batch 64); ``--width 64 --batch 256
--image-size 32 --channels 3`` is the paper's CIFAR-10 setting.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from experiments.benchmarks import register_benchmark
from experiments.benchmarks._measure import add_device_args, device_from_args, hardware, measure
from lit_modules.generation.class_balance import class_balance_loss, class_weights
from lit_modules.generation.gan_losses import discriminator_gradients, generator_gradients, set_grads, trainable
from lit_modules.generation.metrics import (
    ClassifierFeatures,
    PackagedInception,
    feature_stats,
    fid_metric,
    frechet_distance,
)
from lit_modules.nets import create_discriminator, create_generator, create_net
from lit_modules.teacher import FrozenTeacher, TeacherSpec


@register_benchmark("cbgan")
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="cvlab bench cbgan", description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--inception-batch", type=int, default=25)
    p.add_argument("--features", type=int, default=2048, help="feature size of the fid_compute comparison")
    add_device_args(p, threads_default=1)
    args = p.parse_args(argv)
    dev = device_from_args(args)
    b, s, c = args.batch, args.image_size, args.channels
    torch.manual_seed(0)
    G = create_generator("sndcgan", latent_dim=128, out_channels=c, image_size=s, width=args.width).to(dev)
    D = create_discriminator("sndcgan", in_channels=c, image_size=s, width=args.width).to(dev)
    clf = FrozenTeacher(create_net("lenet5", 10, c, 32),
                        TeacherSpec(weights="<random>", num_classes=10, in_channels=c, image_size=32)).to(dev)
    opt_g = torch.optim.Adam(G.parameters(), 2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), 2e-4, betas=(0.5, 0.999))
    x_real = torch.rand(b, c, s, s, device=dev)
    w = class_weights(torch.linspace(1, 50, 10, device=dev))

    def d_step() -> None:
        with torch.no_grad():
            x_fake = G(torch.randn(b, 128, device=dev))
        _, grads = discriminator_gradients(D, x_real, x_fake, "relativistic")
        set_grads(trainable(D), grads)
        opt_d.step()

    def g_step(regularize: bool) -> None:
        reg = (lambda x: 10.0 * class_balance_loss(clf(x).softmax(-1), w)) if regularize else None
        D.requires_grad_(False)
        _, _, grads, _ = generator_gradients(G, D, torch.randn(b, 128, device=dev), x_real, "relativistic", reg)
        D.requires_grad_(True)
        set_grads(trainable(G), grads)
        opt_g.step()

    rows: dict[str, dict[str, float]] = {}
    for name, fn in (("d_step", d_step), ("g_step", lambda: g_step(False)), ("g_step_reg", lambda: g_step(True))):
        m = measure(fn, dev, warmup=2, iters=args.iters)
        rows[name] = {"steps_per_s": 1 / m.seconds_per_iter, "images_per_s": m.rate(b), "peak_mb": m.peak_mem_mb}
    gan_iter = 1 / (1 / rows["d_step"]["steps_per_s"] + 1 / rows["g_step_reg"]["steps_per_s"])
    rows["cbgan_iteration"] = {"steps_per_s": gan_iter}

    inc = PackagedInception().to(dev)
    xi = torch.rand(args.inception_batch, c, s, s, device=dev)
    m = measure(lambda: inc(xi), dev, warmup=1, iters=max(2, args.iters // 5))
    rows["inception"] = {"images_per_s": m.rate(args.inception_batch), "peak_mb": m.peak_mem_mb}
    feats = ClassifierFeatures(clf, c, s).to(dev)
    xd = torch.rand(256, c, s, s, device=dev)
    m = measure(lambda: feats(xd), dev, warmup=2, iters=args.iters)
    rows["domain_features"] = {"images_per_s": m.rate(256)}

    # Frechet distance from the same 2048-d features: torchmetrics' FID vs ours
    n, d = 2000, args.features
    fr, ff = torch.randn(n, d, device=dev), torch.randn(n, d, device=dev) * 1.1 + 0.1

    class Identity(torch.nn.Module):
        num_features = d

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    def tm() -> float:
        metric = fid_metric(Identity()).to(dev)
        for chunk_r, chunk_f in zip(fr.split(250), ff.split(250)):
            metric.update(chunk_r, real=True)
            metric.update(chunk_f, real=False)
        return float(metric.compute())

    def ours() -> float:
        return float(frechet_distance(*feature_stats(fr), *feature_stats(ff)))

    for name, fn in (("fid_torchmetrics", tm), ("fid_ours", ours)):
        t0 = time.perf_counter()
        value = fn()
        rows[name] = {"seconds": time.perf_counter() - t0, "value": value,
                      "features_per_s": 2 * n / (time.perf_counter() - t0)}
    print(json.dumps({"hardware": hardware(dev), "batch": b, "width": args.width, "image_size": s, "channels": c,
                      "results": rows}, indent=1))
    return 0
