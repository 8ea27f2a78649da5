"""The catalogue of bad inputs: each is run as a real ``cvlab`` process, as a user would run it, and its
exit code, its whole stderr and its last line are written to ``docs/RELIABILITY.md``, so the page stays true.

    uv run python -m tests.reliability_catalogue            # rewrites docs/RELIABILITY.md (~10 min on 2 cores)

Every case runs in a scratch workspace (generated data in the real on-disk formats, a tiny trained run,
damaged and crafted files); the paths in the page are shown relative to it as ``$W``. A case either fails
with exit code 1 and exactly one ``cvlab: error: ...`` line on stderr, or is listed as accepted, with the
reason. ``tests/test_reliability.py`` checks the page against :data:`CASES` (fast) and against a
regeneration (slow). :func:`make_workspace` and :func:`run_main` are shared with the tests.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from experiments.cli import main
from tests.cli_runs import QUICKSTART, REPO, TINY_SHAPES
from tests.fakedata import save_cvlab_checkpoint, write_cifar, write_idx, write_mnist_idx


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
    for name, arch, ch, kw in (("teacher3.ckpt", "convnet", 3, {"width": 8, "depth": 2, "norm": "batchnorm"}),
                               ("teacher1.ckpt", "lenet5", 1, {})):
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
    _issue35_workspace(w, p)
    return p


def _issue35_workspace(w: Path, p: dict[str, Path]) -> None:
    """Issue 35's inputs: inconsistent MNIST files, a poisoned archive, bad config files, an unfinished run
    folder, folders locked by a live and by a dead process."""
    for name, (n_img, n_lbl, labels_max) in {"mnist_mismatch": (60_000, 10_000, 9),
                                             "mnist_swapped": (10_000, 10_000, 9),
                                             "mnist_badlabels": (30, 30, 12)}.items():
        write_mnist_idx(w / name, "MNIST", n_train=30, n_test=10, compress=False)
        raw = w / name / "MNIST" / "raw"
        write_idx(raw / "train-images-idx3-ubyte", np.zeros((n_img, 28, 28), np.uint8), compress=False)
        write_idx(raw / "train-labels-idx1-ubyte", (np.arange(n_lbl) % (labels_max + 1)).astype(np.uint8),
                  compress=False)
        p[name] = w / name
    write_mnist_idx(w / "mnist_poison", "MNIST", n_train=30, n_test=10)
    poison = w / "mnist_poison" / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    poison.write_bytes(gzip.compress(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()))
    p["mnist_poison"] = w / "mnist_poison"
    qs = QUICKSTART.read_text()
    for name, text in {"typo_key.yaml": qs.replace("max_epochs:", "max_epoch:"),
                       "bad_yaml.yaml": "trainer:\n  max_epochs: 2\n bad: [\n",
                       "empty.yaml": "", "list.yaml": "- model\n- data\n", "bad_pipeline.yaml": "name: p\nstages: [\n",
                       "empty_pipeline.yaml": "", "twice.yaml": qs + "trainer:\n  max_epochs: 1\n"}.items():
        (w / name).write_text(text)
        p[name.replace(".", "_")] = w / name
    p["unfinished"] = w / "runs" / "unfinished"
    shutil.copytree(p["done"], p["unfinished"])
    (p["unfinished"] / "metrics.json").unlink()  # killed before fit ended; last.ckpt is valid
    # a process that lives as long as this one (it owns the "busy" folder); one that is gone (the "stale" lock)
    me = os.getpid()
    owner = subprocess.Popen([sys.executable, "-c", f"import os, time\nwhile os.getppid() == {me}: time.sleep(0.5)"])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for name, pid in (("busy", owner.pid), ("stale", gone.pid)):
        d = w / "runs" / name
        shutil.copytree(p["done"], d)
        (d / ".cvlab.lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(),
                                                   "command": "cvlab fit --config experiments/quickstart.yaml"}))
        p[name] = d


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


def run_process(argv: list[str], env: dict[str, str], timeout: float = 900) -> Outcome:
    """``cvlab ARGV`` as its own process (``python -m experiments.cli``), as a user runs it: exit code, the line
    it printed and the number of non-empty stderr lines (Lightning's and wandb's included)."""
    r = subprocess.run([sys.executable, "-m", "experiments.cli", *argv], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=timeout)
    errs = [ln for ln in r.stderr.splitlines() if ln.strip()]
    outs = [ln for ln in r.stdout.splitlines() if ln.startswith("cvlab:")]
    line = errs[-1] if r.returncode and errs else (outs[-1] if outs else (errs[-1] if errs else ""))
    return Outcome(r.returncode, line, len(errs))


SHAPES = [*TINY_SHAPES]
STUDENT = ["fit", "--config=experiments/zskd/shapes/student_real.yaml", *SHAPES[:2], "--trainer.max_epochs=1",
           "--trainer.enable_progress_bar=false", "--run.logger=csv"]
SYNTH = ["predict", "--config=experiments/zskd/shapes/synthesize.yaml", "--model.init_args.iterations=2",
         "--data.init_args.num_impressions=20", "--data.init_args.batch_size=10", "--trainer.enable_progress_bar=false",
         "--run.logger=csv"]
QS = ["fit", f"--config={QUICKSTART}", *TINY_SHAPES]

class Case(NamedTuple):
    what: str
    argv: list[str]  # with {name} placeholders for workspace paths
    accepted: str = ""  # why this input is accepted (exit 0), if it is


#: every bad input of the page, in its order (issue 19's first, then issue 35's)
CASES: list[Case] = [Case(*c) for c in [
    ("crafted CIFAR-10 batch (its pickle would create a file)",
     ["fit", "--config=experiments/teachers/cifar10_alexnet.yaml", "--data.init_args.data_dir={w}/cifar_evil",
      "--run.dir={w}/runs/c1", "--run.logger=csv"]),
    ("truncated CIFAR-10 batch",
     ["fit", "--config=experiments/teachers/cifar10_alexnet.yaml", "--data.init_args.data_dir={w}/cifar_short",
      "--run.dir={w}/runs/c2", "--run.logger=csv"]),
    ("CIFAR-10 batch that is a pickle of something else",
     ["fit", "--config=experiments/teachers/cifar10_alexnet.yaml", "--data.init_args.data_dir={w}/cifar_foreign",
      "--run.dir={w}/runs/c3", "--run.logger=csv"]),
    ("truncated MNIST .gz", ["fit", "--config=experiments/teachers/mnist_lenet5.yaml",
                             "--data.init_args.data_dir={w}/mnist_gz", "--run.dir={w}/runs/m1", "--run.logger=csv"]),
    ("missing dataset", ["fit", "--config=experiments/teachers/mnist_lenet5.yaml", "--data.init_args.data_dir={empty}",
                         "--run.dir={w}/runs/m2", "--run.logger=csv"]),
    ("--data.download true without a network",
     ["fit", "--config=experiments/teachers/cifar10_alexnet.yaml", "--data.init_args.data_dir={empty}",
      "--data.init_args.download=true", "--run.dir={w}/runs/m3", "--run.logger=csv"]),
    ("README predict example with $CVLAB_DATA unset (data root ./data, empty)",
     ["predict", "--config=experiments/idlg/mnist/idlg.yaml", "--data.init_args.source.init_args.data_dir={empty}",
      "--run.dir={w}/runs/m4", "--run.logger=csv"]),
    ("teacher file missing", [*STUDENT, "--model.init_args.teacher={w}/missing.ckpt", "--run.dir={w}/runs/t1"]),
    ("teacher file truncated", [*STUDENT, "--model.init_args.teacher={truncated}", "--run.dir={w}/runs/t2"]),
    ("teacher file foreign (a text file)", [*STUDENT, "--model.init_args.teacher={foreign}", "--run.dir={w}/runs/t3"]),
    ("teacher file malicious (its pickle would create a file)",
     [*STUDENT, "--model.init_args.teacher={evil_ckpt}", "--run.dir={w}/runs/t4"]),
    ("teacher state_dict with the wrong architecture",
     [*STUDENT, "--model.init_args.teacher={weights: {state_dict}, arch: resnet18, in_channels: 1}",
      "--run.dir={w}/runs/t5"]),
    ("teacher state_dict without an architecture",
     [*STUDENT, "--model.init_args.teacher={state_dict}", "--run.dir={w}/runs/t6"]),
    ("teacher with other classes than the student",
     [*STUDENT, "--model.init_args.teacher={teacher3}", "--model.init_args.num_classes=5", "--run.dir={w}/runs/t7"]),
    ("teacher whose channels do not fit the data (synthesis)",
     [*SYNTH, "--model.init_args.teacher={teacher1}", "--run.dir={w}/runs/t8"]),
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
    ("--ckpt_path malicious (its pickle would create a file)",
     [*QS, "--run.dir={w}/runs/k4", "--ckpt_path={evil_ckpt}"]),
    ("truncated last.ckpt, no previous checkpoint", [*QS, "--run.dir={killed_noprev}", "--ckpt_path=last"]),
    ("truncated last.ckpt, previous checkpoint kept (resumes from it)",
     [*QS, "--run.dir={killed_prev}", "--ckpt_path=last", "--run.test_after_fit=false"],
     ("the checkpoint written before the damaged one is a good one: the run resumes from it, with a one-line "
      "warning naming both")),
    ("rerun of a finished fit", [*QS, "--run.dir={done}"]),
    ("diverging run (Adam, lr 1e6)",
     [*QS, "--model.init_args.lr=1e6", "--run.divergence_window=3", "--run.dir={w}/runs/v1"]),
    ("NaN loss (SGD, lr 1e30)",
     [*QS, "--model.init_args.optimizer=sgd", "--model.init_args.lr=1e30", "--run.dir={w}/runs/v2"]),
    ("pipeline stage-reference typo ${teachr}", ["run", "{typo_pipeline}", "--root={w}/runs/p1"]),
    ("pipeline --set without a stage",
     ["run", "experiments/quickstart/pipeline.yaml", "--set", "trainer.max_epochs=1", "--root={w}/runs/p2"]),
    ("pipeline --set naming no stage",
     ["run", "experiments/quickstart/pipeline.yaml", "--set", "techer.trainer.max_epochs=1", "--root={w}/runs/p3"]),
    ("pipeline --only naming no stage",
     ["run", "experiments/quickstart/pipeline.yaml", "--only", "studnet", "--root={w}/runs/p4"]),
    ("pipeline file missing", ["run", "experiments/quickstart/pipelin.yaml"]),
    # issue 35: run folders
    ("rerun of an interrupted fit without --ckpt_path (stale last.ckpt)", [*QS, "--run.dir={unfinished}"]),
    ("run folder in use by another live process", [*QS, "--run.dir={busy}", "--ckpt_path=last"]),
    ("lock left by a process that no longer runs", ["test", f"--config={QUICKSTART}", *TINY_SHAPES, "--run.dir={stale}",
                                                    "--ckpt_path={done}/checkpoints/last.ckpt"],
     "a lock of a process that is gone (kill -9) is taken over, with a one-line warning naming it"),
    ("run name that leaves the run root", [*QS, "--run.name=../../escape"]),
    ("checkpoint of another LightningModule class (fit)",
     [*STUDENT, "--model.init_args.teacher={done}/checkpoints/last.ckpt", "--ckpt_path={done}/checkpoints/last.ckpt",
      "--run.dir={w}/runs/f1"]),
    ("checkpoint of another LightningModule class (test)",
     ["test", *STUDENT[1:], "--model.init_args.teacher={done}/checkpoints/last.ckpt",
      "--ckpt_path={done}/checkpoints/last.ckpt", "--run.dir={w}/runs/f2"]),
    ("checkpoint of another width (test)",
     ["test", *QS[1:], "--model.init_args.arch_kwargs={width: 16, depth: 2, norm: batchnorm}",
      "--ckpt_path={done}/checkpoints/last.ckpt", "--run.dir={w}/runs/f4"]),
    # issue 35: data consistency
    ("MNIST: 60,000 training images with the 10,000 test labels",
     ["fit", "--config=experiments/teachers/mnist_lenet5.yaml", "--data.init_args.data_dir={mnist_mismatch}",
      "--run.dir={w}/runs/m5", "--run.logger=csv"]),
    ("MNIST: the test files in the training files' place",
     ["fit", "--config=experiments/teachers/mnist_lenet5.yaml", "--data.init_args.data_dir={mnist_swapped}",
      "--run.dir={w}/runs/m6", "--run.logger=csv"]),
    ("MNIST .gz that is valid gzip of random bytes",
     ["fit", "--config=experiments/teachers/mnist_lenet5.yaml", "--data.init_args.data_dir={mnist_poison}",
      "--run.dir={w}/runs/m8", "--run.logger=csv"]),
    # issue 35: config keys, types, files, values
    ("key prefix --trainer.max_epoch (not taken as max_epochs)",
     [*QS, "--trainer.max_epoch=3", "--run.dir={w}/runs/e1"]),
    ("misspelt section --trainr.max_epochs", [*QS, "--trainr.max_epochs=3", "--run.dir={w}/runs/e2"]),
    ("misspelt model argument --model.init_args.lrr", [*QS, "--model.init_args.lrr=0.1", "--run.dir={w}/runs/e3"]),
    ("wrong type --trainer.max_epochs abc", [*QS, "--trainer.max_epochs=abc", "--run.dir={w}/runs/e5"]),
    ("misspelt key in a config file (max_epoch:)", ["fit", "--config={typo_key_yaml}", "--run.dir={w}/runs/e6"]),
    ("config file with a YAML syntax error", ["fit", "--config={bad_yaml_yaml}", "--run.dir={w}/runs/e7"]),
    ("empty config file", ["fit", "--config={empty_yaml}", "--run.dir={w}/runs/e8"]),
    ("config file missing", ["fit", "--config=experiments/quickstrat.yaml"]),
    ("unknown command", ["trian", "--config=experiments/quickstart.yaml"]),
    ("--trainer.max_epochs 0", [*QS, "--trainer.max_epochs=0", "--run.dir={w}/runs/e11"]),
    ("--trainer.max_epochs -5", [*QS, "--trainer.max_epochs=-5", "--run.dir={w}/runs/e12"]),
    ("negative learning rate", [*QS, "--model.init_args.lr=-0.1", "--run.dir={w}/runs/e14"]),
    ("--trainer.accelerator gpu without a GPU", [*QS, "--trainer.accelerator=gpu", "--run.dir={w}/runs/e16"]),
    # issue 35: pipelines
    ("pipeline file with a YAML syntax error", ["run", "{bad_pipeline_yaml}", "--root={w}/runs/p5"]),
    ("pipeline option prefix --see 3 (not taken as --seeds)",
     ["run", "experiments/quickstart/pipeline.yaml", "--see", "3", "--root={w}/runs/p7"]),
    ("pipeline stage key typo in --set",
     ["run", "experiments/quickstart/pipeline.yaml", "--set", "teacher.trainer.max_epoch=1", "--root={w}/runs/p9"]),
]]


def render(argv: list[str], paths: dict[str, Path]) -> list[str]:
    """Replace ``{name}`` by the workspace path ``paths[name]`` (other braces, e.g. YAML flow maps, stay)."""
    import re

    return [
        re.sub(r"\{(\w+)\}", lambda m: str(paths[m.group(1)]) if m.group(1) in paths else m.group(0), a) for a in argv
    ]


def _shown(text: str, w: str, hide: dict[str, str]) -> str:
    """A command or line as the page shows it: workspace and repo paths relative, pids and host named."""
    text = text.replace(w, "$W").replace(f"{REPO}/", "").replace(str(REPO), "$REPO")
    for value, name in hide.items():
        text = re.sub(rf"\b{re.escape(value)}\b", name, text)
    return text.replace("|", "¦")


def generate(out: Path, cases: list[Case] = CASES, workers: int = 2) -> list[tuple[Case, Outcome]]:
    """Run every case as a ``cvlab`` process (``workers`` at a time) in a fresh workspace and write the page to
    ``out``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CVLAB_LOGGER": "csv", "WANDB_MODE": "offline",
           "PYTHONUNBUFFERED": "1"}
    for k in ("CVLAB_VERBOSE", "CVLAB_TRACEBACK", "CVLAB_STAGE"):
        env.pop(k, None)
    results = []
    with tempfile.TemporaryDirectory(prefix="cvlab-catalogue-") as tmp:
        w = Path(tmp)
        env.update(CVLAB_RUNS=str(w / "runs"), CVLAB_DATA=str(w / "empty_data"))
        os.environ.update(CVLAB_RUNS=env["CVLAB_RUNS"], CVLAB_DATA=env["CVLAB_DATA"], CVLAB_LOGGER="csv")
        paths = make_workspace(w)
        hide = {str(json.loads((paths[n] / ".cvlab.lock").read_text())["pid"]): "$PID" for n in ("busy", "stale")}
        hide[socket.gethostname()] = "$HOST"
        def one(case: Case) -> Outcome:
            t0 = time.perf_counter()
            o = run_process(render(case.argv, paths), env)
            print(f"[{o.code}, {o.stderr_lines} stderr lines, {time.perf_counter() - t0:.0f} s] {case.what}: {o.line}",
                  file=sys.__stdout__, flush=True)
            return o

        with ThreadPoolExecutor(workers) as pool:  # the cases are independent: each has its own folders
            outcomes = list(pool.map(one, cases))
        rows = []
        for case, o in zip(cases, outcomes):
            results.append((case, o))
            shown = _shown(" ".join(render(case.argv, paths)), tmp, hide)
            rows.append((case, shown, o.code, o.stderr_lines, _shown(o.line, tmp, hide)))
        crafted_ran = paths["marker"].exists()
        for d in (paths["ro_root"], paths["ro_run"]):
            d.chmod(0o755)
    lines = [
        "# Reliability: bad inputs and what cvlab says",
        "",
        "Generated by `uv run python -m tests.reliability_catalogue` (do not edit by hand): each bad input is",
        "run as a real `cvlab` process (`python -m experiments.cli ...`, as a user runs it) in a scratch",
        "workspace `$W` (generated data in the real formats, a tiny trained run, damaged and crafted files).",
        "`exit` is the exit code; `stderr` the number of non-empty lines the process wrote to stderr",
        "(Lightning's and wandb's included); `line` the last line it printed. A bad input ends with exit 1",
        "and exactly one `cvlab: error: ...` line, or is accepted below, with the reason. `--traceback` (or",
        "`CVLAB_TRACEBACK=1`) adds the full traceback to any of them; `--verbose` shows Lightning's banners.",
        "`tests/test_reliability.py` checks this page against the case list, and (slow) against a regeneration.",
        "",
        (
            "Crafted pickles (CIFAR batch, teacher, --ckpt_path) created their marker file: "
            f"**{'YES' if crafted_ran else 'no'}**."
        ),
        "",
        "| # | bad input | command | exit | stderr | line |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for i, (case, shown, code, n_err, line) in enumerate(rows, 1):
        lines.append(f"| {i} | {case.what} | `cvlab {shown}` | {code} | {n_err} | {line} |")
    lines += ["", "## Accepted", "", "| # | input | why it is accepted |", "| --- | --- | --- |"]
    lines += [f"| {i} | {case.what} | {case.accepted} |" for i, (case, *_) in enumerate(rows, 1) if case.accepted]
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out} ({len(rows)} cases)", file=sys.__stdout__)
    return results


def page_rows(text: str) -> list[dict[str, str]]:
    """The case rows of a generated page: ``{"n", "what", "command", "exit", "stderr", "line"}``."""
    rows = []
    for ln in text.split("\n## Accepted")[0].splitlines():
        m = re.match(r"^\| (\d+) \| (.*?) \| `cvlab (.*)` \| (-?\d+) \| (\d+) \| (.*) \|$", ln)
        if m:
            rows.append(dict(zip(("n", "what", "command", "exit", "stderr", "line"), m.groups())))
    return rows


def normalised(text: str) -> str:
    """A page with what legitimately differs between two generations masked: hashes, sizes, numbers of steps
    and losses, timings."""
    text = re.sub(r"\b[0-9a-f]{8}\b", "HASH", text)
    text = re.sub(r"\d+(\.\d+)?(e[+-]?\d+)?", "N", text)
    return text


def main_catalogue(out: Path = REPO / "docs" / "RELIABILITY.md") -> None:
    generate(out)


if __name__ == "__main__":
    main_catalogue()
