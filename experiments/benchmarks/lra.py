"""``cvlab bench lra``: student-update and generator steps per second, and peak memory, of adversarial
data-free KD with LRA's meta update (Patel et al., CVPR 2023) at the paper's settings.

MNIST settings (default): LeNet-5 teacher -> LeNet-5-Half student, 1x32x32, DAFL generator with
latent 1000, batch 512 new + 64 memory images (one slot of batch / 8). ``--task cifar10``: ResNet-34 ->
ResNet-18, 3x32x32. Networks are randomly initialised (the cost does not depend on the weights).

Measured, each for ``meta`` = none (the baseline with replay), first_order, second_order:

* ``update``: one student update on a given batch: one teacher pass over [new; memory], the
  gradients (:func:`lit_modules.distillation.lra_update.student_gradients`) and the SGD step;
* ``step``: the same plus generating the new batch (what each of the 10 student steps per generator
  step costs in training);

and the generator step (generator forward/backward through teacher and student, Adam step).

``--reference`` also times the same work written the way LRA's public code does it (our rewrite of
its structure, not its code): generator with ``interpolate`` + conv in the default memory format,
separate teacher calls on new and memory, the inner step differentiated through ``theta'`` with
``create_graph`` (what ``higher`` does) plus a separate student pass on [new; memory], and
``loss.backward()`` into every parameter in the generator step.

On CPU each configuration runs in its own process so that the peak resident memory is its own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call

from experiments.benchmarks import register_benchmark
from experiments.benchmarks._measure import add_device_args, device_from_args, hardware, measure
from lit_modules.distillation.lra_losses import generator_loss
from lit_modules.distillation.lra_update import student_gradients
from lit_modules.nets import create_generator, create_net
from lit_modules.teacher import FrozenTeacher

SETTINGS = {"mnist": ("lenet5", "lenet5_half", 1, 10), "cifar10": ("resnet34", "resnet18", 3, 10)}
MODES = ("none", "first_order", "second_order")
INNER_LR, INNER_WD = 0.9, 5e-4


def _setup(task: str, dev: torch.device, reference: bool, channels_last: bool, fused: bool):
    t_arch, s_arch, c, k = SETTINGS[task]
    torch.manual_seed(0)
    teacher = FrozenTeacher(create_net(t_arch, k, c, 32)).to(dev)
    student = create_net(s_arch, k, c, 32).to(dev).train()
    gen = create_generator("dafl", 1000, c, 32, fused_upsample=fused and not reference,
                           channels_last=channels_last and not reference).to(dev).train()
    if channels_last and not reference:
        teacher.to(memory_format=torch.channels_last)
        student.to(memory_format=torch.channels_last)
    opt_s = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt_g = torch.optim.Adam(gen.parameters(), lr=0.02)
    return teacher, student, gen, opt_s, opt_g


def _ours(mode: str, teacher, student, generator, opt_s, opt_g, batch: int, mem: int, dev: torch.device,
          bf16_generator: bool = False):
    def gen(z: torch.Tensor) -> torch.Tensor:  # LRA.generate
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16_generator):
            return generator(z).float()

    z = torch.randn(batch, 1000, device=dev)
    with torch.no_grad():
        x_fixed = gen(z)
    x_mem = x_fixed[:mem].clone()

    def update(x_new: torch.Tensor) -> None:
        with torch.no_grad():
            t = teacher(torch.cat([x_new, x_mem]))  # one teacher pass over [new; memory]
        params = dict(student.named_parameters())
        out = student_gradients(student, params, dict(student.named_buffers()), x_new, t[:batch], x_mem, t[batch:],
                                mode, INNER_LR, INNER_WD)
        for n, p in params.items():
            p.grad = out.grads[n]
        opt_s.step()

    def step() -> None:
        with torch.no_grad():
            x_new = gen(torch.randn(batch, 1000, device=dev))
        update(x_new)

    def generator_step() -> None:
        x = gen(torch.randn(batch, 1000, device=dev))
        feats = teacher.forward_features(x)
        loss, _ = generator_loss(teacher.get_classifier()(feats), feats, student(x))
        params = list(generator.parameters())
        for p, g in zip(params, torch.autograd.grad(loss, params)):
            p.grad = g
        opt_g.step()

    return (lambda: update(x_fixed)), step, generator_step


def _reference(mode: str, teacher, student, gen, opt_s, opt_g, batch: int, mem: int, dev: torch.device,
               bf16: bool = False):
    """The public code's structure (see the module docstring)."""
    z = torch.randn(batch, 1000, device=dev)
    with torch.no_grad():
        x_fixed = gen(z)
    x_mem = x_fixed[:mem].clone()

    def update(x_new: torch.Tensor) -> None:
        opt_s.zero_grad()
        if mode == "none":  # the replay baseline: one teacher and one student pass over [new; memory]
            x = torch.cat([x_new, x_mem])
            with torch.no_grad():
                t = teacher(x)
            F.l1_loss(student(x), t).backward()
        else:
            with torch.no_grad():
                t_new, t_mem = teacher(x_new), teacher(x_mem)
            params = dict(student.named_parameters())
            inner = F.l1_loss(functional_call(student, params, (x_new,)), t_new)
            g = torch.autograd.grad(inner, list(params.values()), create_graph=mode == "second_order")
            adapted = {n: p - INNER_LR * (gi + INNER_WD * p) for (n, p), gi in zip(params.items(), g)}
            outer = F.l1_loss(functional_call(student, adapted, (x_mem,)), t_mem)
            kd = F.l1_loss(student(torch.cat([x_new, x_mem])), torch.cat([t_new, t_mem]))
            (outer + kd).backward()
        opt_s.step()

    def step() -> None:
        with torch.no_grad():
            x_new = gen(torch.randn(batch, 1000, device=dev))
        update(x_new)

    def generator_step() -> None:
        opt_g.zero_grad()
        x = gen(torch.randn(batch, 1000, device=dev))
        feats = teacher.forward_features(x)
        loss, _ = generator_loss(teacher.get_classifier()(feats), feats, student(x))
        loss.backward()  # also fills the student's .grad, as the public code
        opt_g.step()

    return (lambda: update(x_fixed)), step, generator_step


def run_one(task: str, what: str, mode: str, reference: bool, dev: torch.device, batch: int, mem: int,
            iters: int, channels_last: bool, fused: bool = False, bf16_generator: bool = False) -> dict[str, Any]:
    nets = _setup(task, dev, reference, channels_last, fused)
    impl = _reference if reference else _ours
    update, step, generator_step = impl(mode, *nets, batch, mem, dev, bf16_generator and not reference)
    fn = {"update": update, "step": step, "generator": generator_step}[what]
    m = measure(fn, dev, warmup=2, iters=iters)
    return {"task": task, "what": what, "mode": mode, "reference": reference, "s_per_iter": m.seconds_per_iter,
            "peak_mem_mb": m.peak_mem_mb}


@register_benchmark("lra")
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="cvlab bench lra", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(SETTINGS), default="mnist")
    p.add_argument("--batch", type=int, default=512, help="new images per student step (paper: 512)")
    p.add_argument("--memory", type=int, default=None, help="memory images replayed per step (default batch / 8)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--what", nargs="+", choices=("update", "step", "generator"),
                   default=["update", "step", "generator"])
    p.add_argument("--reference", action="store_true", help="also time the public code's structure")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--fused-upsample", action="store_true", help="generator's fused upsample+conv")
    p.add_argument("--bf16-generator", action="store_true", help="generator under bf16 autocast")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: 'what,mode,ref' in this process
    add_device_args(p)
    a = p.parse_args(argv)
    dev = device_from_args(a)
    mem = a.memory if a.memory is not None else a.batch // 8
    if a.one:
        what, mode, ref = a.one.split(",")
        print(json.dumps(run_one(a.task, what, mode, ref == "1", dev, a.batch, mem, a.iters, a.channels_last,
                                 a.fused_upsample, a.bf16_generator)))
        return 0
    jobs = [(w, m, r) for r in ([False, True] if a.reference else [False]) for w in a.what
            for m in (a.modes if w != "generator" else ["-"])]
    results = []
    for what, mode, ref in jobs:
        if dev.type == "cpu":  # a fresh process: its peak RSS is this configuration's
            argv_one = ["bench", "lra", "--task", a.task, "--batch", str(a.batch), "--memory", str(mem),
                        "--iters", str(a.iters), "--device", "cpu", "--one", f"{what},{mode},{int(ref)}",
                        "--channels-last" if a.channels_last else "--no-channels-last"]
            argv_one += ["--fused-upsample"] * a.fused_upsample + ["--bf16-generator"] * a.bf16_generator
            if a.threads:
                argv_one += ["--threads", str(a.threads)]
            out = subprocess.run([sys.executable, "-m", "experiments.cli", *argv_one], capture_output=True, text=True,
                                 check=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        else:
            results.append(run_one(a.task, what, mode, ref, dev, a.batch, mem, a.iters, a.channels_last,
                                   a.fused_upsample, a.bf16_generator))
    t_arch, s_arch, c, _ = SETTINGS[a.task]
    print(f"hardware: {hardware(dev)}")
    print(f"LRA {a.task}: {t_arch} -> {s_arch}, {c}x32x32, DAFL generator (latent 1000), "
          f"batch {a.batch} + memory {mem}, "
          f"channels_last {a.channels_last}, fused_upsample {a.fused_upsample}, bf16_generator {a.bf16_generator}; "
          f"{a.iters} timed iterations after 2 warm-up (the reference: fp32, default memory format)")
    print(f"{'implementation':<10} {'measured':<10} {'meta':<13} {'s/iter':>8} {'iter/s':>8} {'peak MB':>9}")
    for r in results:
        impl = "reference" if r["reference"] else "cvlab"
        print(f"{impl:<10} {r['what']:<10} {r['mode']:<13} {r['s_per_iter']:>8.3f} {1 / r['s_per_iter']:>8.2f} "
              f"{r['peak_mem_mb']:>9.0f}")
    by = {(r["reference"], r["what"], r["mode"]): r["s_per_iter"] for r in results}
    for what in ("update", "step"):
        base = by.get((False, what, "none"))
        for mode in ("first_order", "second_order"):
            if base and (False, what, mode) in by:
                print(f"meta overhead ({what}, {mode}): {by[(False, what, mode)] / base:.2f}x the baseline")
    if a.reference:
        for key in sorted({k[1:] for k in by}):
            if (True, *key) in by and (False, *key) in by:
                print(f"speed-up over the reference ({key[0]}, {key[1]}): {by[(True, *key)] / by[(False, *key)]:.2f}x")
    return 0
