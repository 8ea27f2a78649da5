"""The catalogue of bad inputs: each is run through the real ``cvlab`` entry point and the line it
prints is written to ``docs/RELIABILITY.md``, so the page stays true.

    uv run python -m tests.reliability_catalogue            # rewrites docs/RELIABILITY.md (a few minutes on 2 cores)

Every case runs in a scratch workspace (generated data in the real on-disk formats, a tiny trained
run, damaged and crafted files); the paths in the page are shown relative to it as ``$W``.
:func:`make_workspace` and :func:`run_main` are shared with ``tests/test_reliability.py``.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from experiments.cli import main
from tests.cli_runs import QUICKSTART, REPO, TINY_SHAPES
from tests.fakedata import write_cifar, write_mnist_idx, save_cvlab_checkpoint


class RunsCode:
    """A pickle that, loaded with plain ``pickle.load``, creates the file ``marker`` (a stand-in for any command)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def make_workspace(w: Path) -> dict[str, Path]:
    """Build every bad input under ``w``; returns named paths."""
    from lit_modules.classifier import ClassifierModule

    p: dict[str, Path] = {"w": w}
    # data: MNIST with a truncated .gz; CIFAR-10 with a crafted, a truncated and a foreign batch
    for name in ("mnist_gz", "cifar_evil", "cifar_short", "cifar_foreign"):
        (w / name).mkdir(parents=True)
    write_mnist_idx(w / "mnist_gz", "MNIST", n_train=60, n_test=20)
    gz = w / "mnist_gz" / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[: gz.stat().st_size // 2])
    p["mnist_gz"] = gz
    p["marker"] = w / "PWNED"
    for name in ("cifar_evil", "cifar_short", "cifar_foreign"):
        write_cifar(w / name, 10, n_train=60, n_test=20)
    with open(w / "cifar_evil" / "cifar-10-batches-py" / "data_batch_1", "wb") as f:
        pickle.dump({"data": RunsCode(p["marker"])}, f, protocol=2)
    short = w / "cifar_short" / "cifar-10-batches-py" / "data_batch_1"
    short.write_bytes(short.read_bytes()[:500])
    with open(w / "cifar_foreign" / "cifar-10-batches-py" / "data_batch_1", "wb") as f:
        pickle.dump({"pixels": [1, 2, 3]}, f, protocol=2)
    # teachers: a tiny 3x10 ConvNet and a 1-channel LeNet-5 (cvlab checkpoints), and bad files
    for name, arch, ch, kw in (("teacher3.ckpt", "convnet", 3, {"width": 8, "depth": 2, "norm": "batchnorm"}), ("teacher1.ckpt", "lenet5", 1, {})):
        m = ClassifierModule(arch=arch, num_classes=10, in_channels=ch, image_size=32, arch_kwargs=kw)
        save_cvlab_checkpoint(m, w / name)
        p[name.split(".")[0]] = w / name
    lenet = ClassifierModule(arch="lenet5", num_classes=10, in_channels=1, image_size=32)
    torch.save({k.removeprefix("net."): v for k, v in lenet.state_dict().items()}, w / "lenet_state_dict.pt")
    p["state_dict"] = w / "lenet_state_dict.pt"
    p["truncated"] = w / "truncated.ckpt"
    p["truncated"].write_bytes(p["teacher3"].read_bytes()[:4000])
    p["foreign"] = w / "notes.txt"
    p["foreign"].write_text("not a checkpoint\n")
    p["evil_ckpt"] = w / "evil.ckpt"
    torch.save({"state_dict": RunsCode(p["marker"])}, p["evil_ckpt"])
    # a finished tiny run, and copies of it with a damaged last.ckpt (with and without .previous)
    p["done"] = w / "runs" / "done"
    run_main(["fit", f"--config={QUICKSTART}", *TINY_SHAPES, f"--run.dir={p['done']}"])
    for name, keep_prev in (("killed_prev", True), ("killed_noprev", False)):
        d = w / "runs" / name  # its own run (a copy would carry another folder's checkpoint state)
        run_main(["fit", f"--config={QUICKSTART}", *TINY_SHAPES, f"--run.dir={d}"])
        (d / "metrics.json").unlink()  # killed before fit ended
        last = d / "checkpoints" / "last.ckpt"
        last.write_bytes(last.read_bytes()[:1000])
        if not keep_prev:
            (d / "checkpoints" / "last.ckpt.previous").unlink(missing_ok=True)
        p[name] = d
    # read-only places
    p["ro_root"] = w / "ro_root"
    p["ro_root"].mkdir()
    p["ro_root"].chmod(0o555)
    p["ro_run"] = w / "runs" / "ro_run"
    shutil.copytree(p["done"], p["ro_run"])
    (p["ro_run"] / "metrics.json").unlink()
    shutil.rmtree(p["ro_run"] / "checkpoints")
    p["ro_run"].chmod(0o555)
    # pipelines with a stage-reference typo
    qs = (REPO / "experiments" / "quickstart" / "pipeline.yaml").read_text()
    p["typo_pipeline"] = w / "typo_pipeline.yaml"
    p["typo_pipeline"].write_text(qs.replace("${teacher}", "${teachr}"))
    p["empty"] = w / "empty_data"
    return p


@dataclass
class Outcome:
    code: int
    line: str  # the last line cvlab printed (stderr on failure, else its last `cvlab:` stdout line)
    stderr_lines: int


def run_main(argv: list[str]) -> Outcome:
    """``cvlab ARGV`` in this process: exit code and the line it printed."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    errs = [ln for ln in err.getvalue().splitlines() if ln.strip()]
    outs = [ln for ln in out.getvalue().splitlines() if ln.startswith("cvlab:")]
    line = errs[-1] if code and errs else (outs[-1] if outs else (errs[-1] if errs else ""))
    return Outcome(code, line, len(errs))


SHAPES = [*TINY_SHAPES]
STUDENT = ["fit", "--config=experiments/zskd/shapes/student_real.yaml", *SHAPES[:2], "--trainer.max_epochs=1",
           "--trainer.enable_progress_bar=false", "--run.logger=csv"]
SYNTH = ["predict", "--config=experiments/zskd/shapes/synthesize.yaml", "--model.init_args.iterations=2",
         "--data.init_args.num_impressions=20", "--data.init_args.batch_size=10", "--trainer.enable_progress_bar=false", "--run.logger=csv"]
QS = ["fit", f"--config={QUICKSTART}", *TINY_SHAPES]

#: (what, argv with {name} placeholders for workspace paths)
CASES: list[tuple[str, list[str]]] = [
    ("crafted CIFAR-10 batch (its pickle would create a file)", ["fit", "--config=experiments/teachers/cifar10_alexnet.yaml", "--data.init_args.data_dir={w}/cifar_evil", "--run.dir={w}/runs/c1", "--run.logger=csv"]),
    ("truncated CIFAR-10 batch", ["fit", "--config=experiments/teachers/cifar10_alexnet.yaml", "--data.init_args.data_dir={w}/cifar_short", "--run.dir={w}/runs/c2", "--run.logger=csv"]),
    ("CIFAR-10 batch that is a pickle of something else", ["fit", "--config=experiments/teachers/cifar10_alexnet.yaml", "--data.init_args.data_dir={w}/cifar_foreign", "--run.dir={w}/runs/c3", "--run.logger=csv"]),
    ("truncated MNIST .gz", ["fit", "--config=experiments/teachers/mnist_lenet5.yaml", "--data.init_args.data_dir={w}/mnist_gz", "--run.dir={w}/runs/m1", "--run.logger=csv"]),
    ("missing dataset", ["fit", "--config=experiments/teachers/mnist_lenet5.yaml", "--data.init_args.data_dir={empty}", "--run.dir={w}/runs/m2", "--run.logger=csv"]),
    ("--data.download true without a network", ["fit", "--config=experiments/teachers/cifar10_alexnet.yaml", "--data.init_args.data_dir={empty}", "--data.init_args.download=true", "--run.dir={w}/runs/m3", "--run.logger=csv"]),
    ("README predict example with $CVLAB_DATA unset (data root ./data, empty)", ["predict", "--config=experiments/idlg/mnist/idlg.yaml", "--data.init_args.source.init_args.data_dir={empty}", "--run.dir={w}/runs/m4", "--run.logger=csv"]),
    ("teacher file missing", [*STUDENT, "--model.init_args.teacher={w}/missing.ckpt", "--run.dir={w}/runs/t1"]),
    ("teacher file truncated", [*STUDENT, "--model.init_args.teacher={truncated}", "--run.dir={w}/runs/t2"]),
    ("teacher file foreign (a text file)", [*STUDENT, "--model.init_args.teacher={foreign}", "--run.dir={w}/runs/t3"]),
    ("teacher file malicious (its pickle would create a file)", [*STUDENT, "--model.init_args.teacher={evil_ckpt}", "--run.dir={w}/runs/t4"]),
    ("teacher state_dict with the wrong architecture", [*STUDENT, "--model.init_args.teacher={weights: {state_dict}, arch: resnet18, in_channels: 1}", "--run.dir={w}/runs/t5"]),
    ("teacher state_dict without an architecture", [*STUDENT, "--model.init_args.teacher={state_dict}", "--run.dir={w}/runs/t6"]),
    ("teacher with other classes than the student", [*STUDENT, "--model.init_args.teacher={teacher3}", "--model.init_args.num_classes=5", "--run.dir={w}/runs/t7"]),
    ("teacher whose channels do not fit the data (synthesis)", [*SYNTH, "--model.init_args.teacher={teacher1}", "--run.dir={w}/runs/t8"]),
    ("model and data disagree on channels", [*QS, "--model.init_args.in_channels=1", "--run.dir={w}/runs/x1"]),
    ("batch_size 0", [*QS, "--data.init_args.batch_size=0", "--run.dir={w}/runs/b1"]),
    ("batch_size negative", [*QS, "--data.init_args.batch_size=-5", "--run.dir={w}/runs/b2"]),
    ("--trainer.devices 4 without GPUs", [*QS, "--trainer.devices=4", "--run.dir={w}/runs/d1"]),
    ("read-only run root", [*QS, "--run.root={ro_root}", "--run.name=x"]),
    ("read-only run folder", [*QS, "--run.dir={ro_run}"]),
    ("run folder path under a file", [*QS, "--run.dir={foreign}/run"]),
    ("--ckpt_path missing", [*QS, "--run.dir={w}/runs/k1", "--ckpt_path={w}/missing.ckpt"]),
    ("--ckpt_path truncated", [*QS, "--run.dir={w}/runs/k2", "--ckpt_path={truncated}"]),
    ("--ckpt_path foreign (a plain state_dict)", [*QS, "--run.dir={w}/runs/k3", "--ckpt_path={state_dict}"]),
    ("--ckpt_path malicious (its pickle would create a file)", [*QS, "--run.dir={w}/runs/k4", "--ckpt_path={evil_ckpt}"]),
    ("truncated last.ckpt, no previous checkpoint", [*QS, "--run.dir={killed_noprev}", "--ckpt_path=last"]),
    ("truncated last.ckpt, previous checkpoint kept (resumes from it)", [*QS, "--run.dir={killed_prev}", "--ckpt_path=last", "--run.test_after_fit=false"]),
    ("rerun of a finished fit", [*QS, "--run.dir={done}"]),
    ("diverging run (Adam, lr 1e6)", [*QS, "--model.init_args.lr=1e6", "--run.divergence_window=3", "--run.dir={w}/runs/v1"]),
    ("NaN loss (SGD, lr 1e30)", [*QS, "--model.init_args.optimizer=sgd", "--model.init_args.lr=1e30", "--run.dir={w}/runs/v2"]),
    ("pipeline stage-reference typo ${teachr}", ["run", "{typo_pipeline}", "--root={w}/runs/p1"]),
    ("pipeline --set without a stage", ["run", "experiments/quickstart/pipeline.yaml", "--set", "trainer.max_epochs=1", "--root={w}/runs/p2"]),
    ("pipeline --set naming no stage", ["run", "experiments/quickstart/pipeline.yaml", "--set", "techer.trainer.max_epochs=1", "--root={w}/runs/p3"]),
    ("pipeline --only naming no stage", ["run", "experiments/quickstart/pipeline.yaml", "--only", "studnet", "--root={w}/runs/p4"]),
    ("pipeline file missing", ["run", "experiments/quickstart/pipelin.yaml"]),
]


def render(argv: list[str], paths: dict[str, Path]) -> list[str]:
    """Replace ``{name}`` by the workspace path ``paths[name]`` (other braces, e.g. YAML flow maps, stay)."""
    import re

    return [re.sub(r"\{(\w+)\}", lambda m: str(paths[m.group(1)]) if m.group(1) in paths else m.group(0), a) for a in argv]


def main_catalogue(out: Path = REPO / "docs" / "RELIABILITY.md") -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["CVLAB_LOGGER"] = "csv"
    os.environ["WANDB_MODE"] = "offline"
    rows = []
    with tempfile.TemporaryDirectory(prefix="cvlab-catalogue-") as tmp:
        w = Path(tmp)
        os.environ["CVLAB_RUNS"] = str(w / "runs")
        os.environ["CVLAB_DATA"] = str(w / "empty_data")
        paths = make_workspace(w)
        for what, argv in CASES:
            args = render(argv, paths)
            t0 = time.perf_counter()
            o = run_main(args)
            shown = " ".join(a.replace(tmp, "$W").replace(f"{REPO}/", "") for a in args)
            line = o.line.replace(tmp, "$W")
            rows.append((what, shown, o.code, line, o.stderr_lines, time.perf_counter() - t0))
            print(f"[{o.code}] {what}: {line}", file=sys.__stdout__, flush=True)
        crafted_ran = paths["marker"].exists()
        for d in (paths["ro_root"], paths["ro_run"]):
            d.chmod(0o755)
    lines = [
        "# Reliability: bad inputs and what cvlab says",
        "",
        "Generated by `uv run python -m tests.reliability_catalogue` (do not edit by hand): each bad input is",
        "run through the real `cvlab` entry point (`experiments.cli.main`) in a scratch workspace `$W`",
        "(generated data in the real formats, a tiny trained run, damaged and crafted files). `exit` is the",
        "exit code; `line` is the last line cvlab printed (on failure, its stderr, which holds that one line",
        "unless noted). `--traceback` or `CVLAB_TRACEBACK=1` adds the full traceback to any of them.",
        "",
        f"Crafted pickles (CIFAR batch, teacher, --ckpt_path) created their marker file: **{'YES' if crafted_ran else 'no'}**.",
        "",
        "| # | bad input | command | exit | line |",
        "| --- | --- | --- | --- | --- |",
    ]
    for i, (what, shown, code, line, n_err, _) in enumerate(rows, 1):
        note = "" if code == 0 or n_err <= 1 else f" ({n_err} stderr lines)"
        lines.append(f"| {i} | {what} | `cvlab {shown.replace('|', '¦')}` | {code} | {line.replace('|', '¦')}{note} |")
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out} ({len(rows)} cases)", file=sys.__stdout__)


if __name__ == "__main__":
    main_catalogue()
