"""``cvlab sweep FILE``: hyperparameter sweeps over cvlab configs, with wandb or without it.

A sweep file (``experiments/sweeps/*.yaml``) is a plain wandb sweep config whose parameters are
LightningCLI's dotted keys and whose ``command`` runs ``cvlab`` with the method's config::

    name: quickstart_lr
    method: grid                                   # grid | random (| bayes: wandb only)
    metric: {name: test/acc, goal: maximize}       # a key the module logs (and metrics.json holds)
    parameters:
      model.init_args.lr: {values: [0.001, 0.003]}
      model.init_args.weight_decay: {distribution: log_uniform_values, min: 1.0e-5, max: 1.0e-3}
    command: [cvlab, fit, --config, experiments/quickstart.yaml, "${args}"]

For a pipeline (``command: [cvlab, run, PIPELINE.yaml, ...]``) a parameter is ``STAGE.key``
(``synthesize.model.init_args.temperature``), passed to ``cvlab run`` as ``--STAGE.key=value``; stages
that do not depend on a swept value (the teacher) are shared by every trial, and the trial's metric
is the one its last stage logs (the last of ``--only``, if given).

- ``cvlab sweep FILE [--agents N] [--count K]``: register it with ``wandb.sweep`` and start N
  ``wandb agent``s, one per visible GPU (``CUDA_VISIBLE_DEVICES`` per agent); needs wandb online.
- ``cvlab sweep FILE --local [--devices N] [--count K]``: expand grid / random sweeps here, run the
  trials in sequence or N at a time (one GPU each), each in ``<sweep dir>/trial-<hash>`` (its run
  folder), skip the finished ones (a ``metrics.json`` holding the metric), then write
  ``results.md``, ``results.csv`` (sorted by the metric) and ``metric.png`` (the metric against each
  swept parameter) in the sweep folder. ``--table`` only writes the table of finished trials.
- ``cvlab sweep FILE --slurm``: write ``<sweep dir>/sweep.sbatch``, a job array with one unfinished
  trial per array index (preemptible: it requeues and resumes from the trial's ``last.ckpt``);
  after the array, ``cvlab sweep FILE --local --table`` writes the table.

Every trial's values are parsed by the CLI (``--print_config``, in-process) before anything runs: a
parameter that is not a config key, an empty grid, or more devices than visible GPUs stop the sweep
with one line.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import itertools
import json
import math
import os
import random
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from queue import Queue
from typing import Any

import yaml

from cvlab.artifacts import atomic_write_json, read_json
from cvlab.errors import CvlabError
from experiments.command_line import OneLineArgumentParser, as_overrides, format_value, load_yaml_file

REPO = Path(__file__).resolve().parents[1]
_CLI_COMMANDS = ("fit", "validate", "test", "predict")
_DISTRIBUTIONS = ("uniform", "int_uniform", "log_uniform_values", "categorical")


@dataclass(frozen=True)
class Sweep:
    """A parsed sweep file."""

    path: Path
    name: str
    method: str
    metric: str
    goal: str  # maximize | minimize
    parameters: dict[str, dict[str, Any]]
    command: list[str]
    config: dict[str, Any] = field(repr=False)  # the file as wandb.sweep takes it

    @property
    def subcommand(self) -> str:
        """``fit`` / ``validate`` / ``test`` / ``predict`` (a CLI run) or ``run`` (a pipeline)."""
        i = self.command.index("cvlab")
        return self.command[i + 1]


def load_sweep(path: str | Path) -> Sweep:
    """Parse and check a sweep file; errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise CvlabError(f"sweep file not found: {path}")
    cfg = load_yaml_file(path, "sweep file") or {}
    where = str(path)
    method = cfg.get("method")
    if method not in ("grid", "random", "bayes"):
        raise CvlabError(f"{where}: 'method' must be grid, random or bayes, got {method!r}")
    metric = cfg.get("metric") or {}
    if not isinstance(metric, dict) or not metric.get("name"):
        raise CvlabError(f"{where}: 'metric' needs a 'name' (a key the module logs, e.g. test/acc)")
    goal = metric.get("goal", "maximize")
    if goal not in ("maximize", "minimize"):
        raise CvlabError(f"{where}: metric goal must be maximize or minimize, got {goal!r}")
    params = cfg.get("parameters")
    if not isinstance(params, dict) or not params:
        raise CvlabError(f"{where}: 'parameters' is empty; name at least one dotted config key")
    for key, p in params.items():
        if not isinstance(p, dict):
            raise CvlabError(
                f"{where}: parameter {key!r} must be a mapping (values:, value:, or distribution:/min:/max:)"
            )
        if "values" in p and (not isinstance(p["values"], list) or not p["values"]):
            raise CvlabError(f"{where}: parameter {key!r} has an empty 'values' list: the grid is empty")
        dist = p.get("distribution")
        if dist is not None and dist not in _DISTRIBUTIONS:
            raise CvlabError(f"{where}: parameter {key!r}: distribution {dist!r} is not one of {_DISTRIBUTIONS}")
        if "values" not in p and "value" not in p and ("min" not in p or "max" not in p):
            raise CvlabError(f"{where}: parameter {key!r} needs 'values', 'value', or 'min' and 'max'")
        if method == "grid" and "values" not in p and "value" not in p:
            raise CvlabError(f"{where}: a grid sweep needs 'values' for every parameter; {key!r} has a distribution")
    command = cfg.get("command")
    if not isinstance(command, list) or "cvlab" not in command or "${args}" not in command:
        raise CvlabError(f"{where}: 'command' must be a list running cvlab with \"${{args}}\", e.g. "
                         "[cvlab, fit, --config, X.yaml, \"${args}\"]")
    sub_i = command.index("cvlab") + 1
    if sub_i >= len(command) or command[sub_i] not in (*_CLI_COMMANDS, "run"):
        raise CvlabError(f"{where}: the command's cvlab subcommand must be one of {(*_CLI_COMMANDS, 'run')}")
    name = str(cfg.get("name") or path.stem)
    return Sweep(path, name, method, str(metric["name"]), goal, dict(params), [str(c) for c in command], cfg)


# --------------------------------------------------------------------------------------------- trials


def expand_trials(sweep: Sweep, count: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """The trials of a grid (every combination, in file order) or random sweep (``count`` draws, seeded)."""
    if sweep.method == "bayes":
        raise CvlabError(
            f"{sweep.path}: bayes sweeps need the wandb server; use method grid or random for --local / --slurm"
        )
    keys = list(sweep.parameters)
    if sweep.method == "grid":
        choices = [
            sweep.parameters[k]["values"] if "values" in sweep.parameters[k] else [sweep.parameters[k]["value"]]
            for k in keys
        ]
        trials = [dict(zip(keys, combo)) for combo in itertools.product(*choices)]
        return trials[:count] if count else trials
    count = count or sweep.config.get("run_cap")
    if not count:
        raise CvlabError(f"{sweep.path}: a random sweep needs a trial count (--count N or run_cap: N in the file)")
    rng = random.Random(seed)
    return [{k: _sample(sweep.parameters[k], rng) for k in keys} for _ in range(int(count))]


def _sample(p: dict[str, Any], rng: random.Random) -> Any:
    if "value" in p:
        return p["value"]
    if "values" in p:
        return rng.choice(p["values"])
    lo, hi = p["min"], p["max"]
    dist = p.get("distribution") or ("int_uniform" if isinstance(lo, int) and isinstance(hi, int) else "uniform")
    if dist == "int_uniform":
        return rng.randint(int(lo), int(hi))
    if dist == "log_uniform_values":
        return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    return rng.uniform(float(lo), float(hi))


def trial_args(params: dict[str, Any]) -> list[str]:
    """``${args}``: ``--key=value`` for each parameter, in file order."""
    return as_overrides(params)


def trial_id(params: dict[str, Any], command: Sequence[str] = ()) -> str:
    """``trial-<8 hex>`` of the values and the sweep's command: the same values give the same folder,
    whatever their order in the file; a changed command (another budget) gives new folders."""
    blob = json.dumps([{k: format_value(v) for k, v in sorted(params.items())}, list(command)], sort_keys=True)
    return "trial-" + hashlib.sha256(blob.encode()).hexdigest()[:8]


def sweep_dir(sweep: Sweep, root: str | Path | None = None) -> Path:
    root = Path(root) if root else Path(os.environ.get("CVLAB_RUNS", "runs")) / "sweeps"
    return (root / sweep.name).resolve()


def split_command(sweep: Sweep) -> tuple[dict[str, str], list[str]]:
    """``(env, rest)``: the ``K=V`` assignments before ``cvlab`` (``${env} K=V cvlab ...``) and the
    tokens after ``cvlab`` (subcommand first)."""
    i = sweep.command.index("cvlab")
    env = dict(t.split("=", 1) for t in sweep.command[:i] if "=" in t and not t.startswith("$"))
    return env, sweep.command[i + 1:]


@dataclass
class TrialCommand:
    argv: list[str]
    env: dict[str, str]


def trial_command(sweep: Sweep, params: dict[str, Any], folder: Path, python: str | None = None) -> TrialCommand:
    """The local command of one trial: the sweep's command with ``cvlab`` as this interpreter's CLI,
    ``${args}`` expanded, ``${env} K=V`` turned into environment, and the trial's run folder added."""
    env, rest = split_command(sweep)
    out = [python or sys.executable, "-m", "experiments.cli"]
    for tok in rest:
        if tok == "${args}":
            out += trial_args(params)
        elif tok == "${args_no_hyphens}":
            out += [a[2:] for a in trial_args(params)]
        elif tok.startswith("${"):
            raise CvlabError(
                f"{sweep.path}: command macro {tok} is not supported by --local / --slurm (use ${{env}}, ${{args}})"
            )
        else:
            out.append(tok)
    if sweep.subcommand == "run":
        out.append(f"--root={folder.parent / 'stages'}")  # stages shared across trials by their hash
    else:
        out += [f"--run.dir={folder}", "--ckpt_path=last"]  # a killed trial resumes from its last.ckpt
    return TrialCommand(out, env)


@dataclass
class PipelineCall:
    """What a ``cvlab run`` trial command asks of :func:`experiments.pipeline.run_pipeline`."""

    pipeline: str
    root: str
    sets: list[str]
    only: list[str] | None


def pipeline_call(argv: list[str]) -> PipelineCall:
    """Read ``run PIPELINE [--root R] [--only S ...] [--set S.k=v] [--S.k=v ...]`` (the tokens after ``cvlab``)."""
    argv = argv[argv.index("run") + 1:]
    pipeline, root, sets, only, i = "", os.environ.get("CVLAB_RUNS", "runs"), [], None, 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--only":
            only = list(itertools.takewhile(lambda t: not t.startswith("-"), argv[i + 1:]))
            i += len(only) + 1
            continue
        if tok == "--set":
            sets.append(argv[i + 1])
            i += 2
            continue
        if tok == "--root":
            root = argv[i + 1]
            i += 2
            continue
        if tok.startswith("--root="):
            root = tok.split("=", 1)[1]
        elif tok.startswith("--set="):
            sets.append(tok.split("=", 1)[1])
        elif tok.startswith("--") and "=" in tok:
            sets.append(tok[2:])
        elif not tok.startswith("-") and not pipeline:
            pipeline = tok
        i += 1
    if not pipeline:
        raise CvlabError("a 'cvlab run' sweep command must name the pipeline YAML")
    return PipelineCall(pipeline, root, sets, only)


# ----------------------------------------------------------------------------------------- validation


def _cli_argv(sweep: Sweep, params: dict[str, Any]) -> list[tuple[list[str], dict[str, str]]]:
    """The ``cvlab <sub> ...`` argument lists a trial's values must parse in (one per pipeline stage they
    touch), each with ``{key in that config: sweep parameter}``."""
    _, rest = split_command(sweep)
    args = trial_args(params)
    if sweep.subcommand != "run":
        return [([a for tok in rest for a in (args if tok == "${args}" else [tok])], {k: k for k in params})]
    from experiments.pipeline import load_pipeline

    call = pipeline_call(["run", *[t for t in rest[1:] if t != "${args}"], *args])
    _, stages = load_pipeline(call.pipeline)
    names = {s.name for s in stages}
    for k in params:
        if k.split(".", 1)[0] not in names:
            raise CvlabError(f"{sweep.path}: parameter {k!r} does not start with a stage of {call.pipeline} "
                             f"({sorted(names)}); name it STAGE.key")
    out = []
    for stage in stages:
        mine = [s.split(".", 1)[1] for s in call.sets if s.split(".", 1)[0] in (stage.name, "*")]
        keys = {k.split(".", 1)[1]: k for k in params if k.split(".", 1)[0] == stage.name}
        if keys:
            fixed = [a.replace("${", "$placeholder{") for a in stage.args]  # ${stage} refs: any path parses
            out.append(
                ([stage.command, *[f"--config={c}" for c in stage.config], *fixed, *[f"--{m}" for m in mine]], keys)
            )
    return out


def _lookup(cfg: dict[str, Any], dotted: str) -> tuple[bool, Any]:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _same(a: Any, b: Any) -> bool:
    if (
        isinstance(a, (int, float))
        and isinstance(b, (int, float))
        and not isinstance(a, bool)
        and not isinstance(b, bool)
    ):
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    return yaml.safe_load(format_value(a)) == b if isinstance(b, (list, dict)) else str(a).lower() == str(b).lower()


def resolved_config(argv: list[str]) -> dict[str, Any]:
    """The resolved config of ``cvlab <argv>``, parsed in-process (nothing runs; see
    :func:`experiments.lightning_cli.parse_arguments_only`)."""
    from experiments.lightning_cli import parse_arguments_only

    return parse_arguments_only(argv)


def coverage_rows(sweep: Sweep, trials: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Few trials that hold every value of every parameter: a grid's values side by side (row i takes
    each parameter's i-th value, cycling), a random sweep's sampled trials as they are, a bayes sweep's
    range ends."""
    if sweep.method == "random":
        return list(trials)
    choices = {k: p["values"] if "values" in p else [p["value"]] if "value" in p else [p["min"], p["max"]]
               for k, p in sweep.parameters.items()}
    n = max(len(v) for v in choices.values())
    return [{k: v[i % len(v)] for k, v in choices.items()} for i in range(n)]


def validate(sweep: Sweep, trials: Sequence[dict[str, Any]]) -> None:
    """Check every value the trials use parses in the CLI and lands at its key (``--print_config``,
    nothing runs); raise one line naming the first bad one."""
    if not trials:
        raise CvlabError(f"{sweep.path}: the sweep expands to no trials")
    seen: set[str] = set()
    for params in coverage_rows(sweep, trials):
        key = json.dumps({k: format_value(v) for k, v in params.items()}, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        for argv, keys in _cli_argv(sweep, params):
            try:
                cfg = resolved_config(argv)
            except CvlabError as e:
                raise CvlabError(
                    f"{sweep.path}: trial {trial_args(params)} does not parse in `cvlab {argv[0]}`: {e}"
                ) from None
            for key, param in keys.items():
                found, got = _lookup(cfg, key)
                if not found:
                    raise CvlabError(
                        f"{sweep.path}: parameter {param!r} is not a key of the resolved config of `cvlab {argv[0]}`"
                    )
                if not _same(params[param], got):
                    raise CvlabError(
                        f"{sweep.path}: parameter {param!r}={format_value(params[param])} resolved to {got!r}"
                    )


# -------------------------------------------------------------------------------------------- devices


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as ``CUDA_VISIBLE_DEVICES`` entries for children."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return listed[:n] if listed else [str(i) for i in range(n)]


def device_slots(n: int, flag: str) -> list[str | None]:
    """``n`` device slots (a GPU each, ``None`` for one process on whatever is there); too many fail."""
    if n < 1:
        raise CvlabError(f"{flag} must be at least 1, got {n}")
    if n == 1:
        return [None]
    gpus = visible_gpus()
    if n > len(gpus):
        raise CvlabError(
            f"{flag} {n} needs {n} GPUs, but {len(gpus)} are visible "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"
        )
    return list(gpus[:n])


# -------------------------------------------------------------------------------------------- running


@dataclass
class TrialResult:
    id: str
    params: dict[str, Any]
    metric: float | None
    status: str  # done (now or in an earlier run) | failed | pending
    wall_s: float | None = None
    folder: Path | None = None


def trial_wall_s(folder: Path) -> float | None:
    """The wall time a trial took when it ran (``trial.json``; a SLURM array trial: its fit's ``fit/wall_s``)."""
    value = read_json(folder / "trial.json", default={}).get("wall_s")
    if value is None:
        value = read_json(folder / "metrics.json", default={}).get("fit/wall_s")
    return None if value is None else float(value)


def trial_metric(sweep: Sweep, folder: Path) -> float | None:
    value = read_json(folder / "metrics.json", default={}).get(sweep.metric)
    return None if value is None else float(value)


def _pipeline_metrics(tc: TrialCommand) -> dict[str, float]:
    """A finished pipeline trial's metrics: its last stage's keys (the last of ``--only``), and every
    stage's as ``stage:key``."""
    from experiments.pipeline import load_pipeline, run_pipeline

    call = pipeline_call(tc.argv)
    with contextlib.redirect_stdout(io.StringIO()):  # a dry run only reads the finished stages' metrics
        metrics = run_pipeline(call.pipeline, call.root, call.sets, dry_run=True, only=call.only)
    last = call.only[-1] if call.only else load_pipeline(call.pipeline)[1][-1].name
    flat = {f"{s}:{k}": v for s, m in metrics.items() for k, v in m.items()}
    flat.update(metrics.get(last, {}))
    return flat


def _run_one(sweep: Sweep, params: dict[str, Any], folder: Path, device: str | None) -> TrialResult:
    tc = trial_command(sweep, params, folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "trial.json", {"params": params, "command": tc.argv, "env": tc.env})
    env = {**os.environ, **tc.env, "PYTHONUNBUFFERED": "1"}
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    t0 = time.perf_counter()
    with open(folder / "sweep.log", "a") as log:
        rc = subprocess.run(tc.argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO).returncode
    wall = time.perf_counter() - t0
    atomic_write_json(folder / "trial.json", {"params": params, "command": tc.argv, "env": tc.env, "wall_s": wall})
    if rc == 0 and sweep.subcommand == "run":
        atomic_write_json(folder / "metrics.json", _pipeline_metrics(tc))
    metric = trial_metric(sweep, folder)
    status = "done" if rc == 0 and metric is not None else "failed"
    return TrialResult(folder.name, params, metric, status, wall, folder)


def run_local(sweep: Sweep, trials: list[dict[str, Any]], folder: Path, devices: int = 1) -> list[TrialResult]:
    """Run the unfinished trials (``devices`` at a time, one GPU each) and return every trial's result."""
    slots = device_slots(devices, "--devices")
    results: dict[str, TrialResult] = {}
    todo: list[dict[str, Any]] = []
    for params in trials:
        tdir = folder / trial_id(params, sweep.command)
        m = trial_metric(sweep, tdir)
        if m is not None:
            # in an earlier run
            results[tdir.name] = TrialResult(tdir.name, params, m, "done", trial_wall_s(tdir), tdir)
            print(f"[sweep] {tdir.name} finished before ({sweep.metric}={m:.4f}), skipping", flush=True)
        else:
            todo.append(params)
    lock = threading.Lock()
    n_done = [len(results)]

    def run(params: dict[str, Any], device: str | None) -> None:
        tdir = folder / trial_id(params, sweep.command)
        print(
            f"[sweep] {tdir.name} {' '.join(trial_args(params))}" + (f" (GPU {device})" if device else ""), flush=True
        )
        r = _run_one(sweep, params, tdir, device)
        with lock:
            results[r.id] = r
            n_done[0] += 1
            shown = (
                "failed, see " + str(tdir / "sweep.log") if r.status == "failed" else f"{sweep.metric}={r.metric:.4f}"
            )
            print(f"[sweep] {n_done[0]}/{len(trials)} {r.id}: {shown} ({r.wall_s:.0f} s)", flush=True)

    if len(slots) == 1 or not todo:
        for params in todo:
            run(params, slots[0])
    else:
        # pipelines: the first trial alone computes the stages every trial shares (the teacher)
        if sweep.subcommand == "run":
            run(todo.pop(0), slots[0])
        free: Queue[str | None] = Queue()
        for s in slots:
            free.put(s)

        def on_slot(params: dict[str, Any]) -> None:
            device = free.get()
            try:
                run(params, device)
            finally:
                free.put(device)

        with ThreadPoolExecutor(len(slots)) as pool:
            list(pool.map(on_slot, todo))
    return [results[trial_id(p, sweep.command)] for p in trials]


def collect(sweep: Sweep, trials: list[dict[str, Any]], folder: Path) -> list[TrialResult]:
    """Results of the trials that finished (others ``pending``), without running anything."""
    out = []
    for params in trials:
        tdir = folder / trial_id(params, sweep.command)
        m = trial_metric(sweep, tdir)
        out.append(TrialResult(tdir.name, params, m, "done" if m is not None else "pending", trial_wall_s(tdir), tdir))
    return out


# -------------------------------------------------------------------------------------------- reports


def sort_results(sweep: Sweep, results: list[TrialResult]) -> list[TrialResult]:
    """Best first by the metric (its goal), trials without a metric last."""
    sign = -1.0 if sweep.goal == "maximize" else 1.0
    return sorted(results, key=lambda r: (r.metric is None, sign * (r.metric if r.metric is not None else 0.0)))


def write_tables(sweep: Sweep, results: list[TrialResult], folder: Path) -> tuple[Path, Path]:
    """``results.md`` and ``results.csv`` in the sweep folder, best trial first."""
    rows = sort_results(sweep, results)
    keys = list(sweep.parameters)
    header = ["rank", "trial", *keys, sweep.metric, "status", "wall_s"]
    body = [[str(i + 1) if r.metric is not None else "", r.id, *[format_value(r.params[k]) for k in keys],
             "" if r.metric is None else f"{r.metric:.4f}", r.status, "" if r.wall_s is None else f"{r.wall_s:.0f}"]
            for i, r in enumerate(rows)]
    md = folder / "results.md"
    title = f"### sweep {sweep.name}: {sweep.metric} ({sweep.goal}), {sweep.method}, {len(rows)} trials"
    lines = [title, "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    folder.mkdir(parents=True, exist_ok=True)
    md.write_text("\n".join(lines) + "\n")
    path_csv = folder / "results.csv"
    with open(path_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(body)
    return md, path_csv


def plot_metric(sweep: Sweep, results: list[TrialResult], path: Path) -> Path | None:
    """One panel per swept parameter: the metric of every finished trial against its value."""
    done = [r for r in results if r.metric is not None]
    keys = [k for k in sweep.parameters if len({format_value(r.params[k]) for r in results}) > 1] or list(
        sweep.parameters
    )
    if not done:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False, sharey=True)
    for ax, k in zip(axes[0], keys):
        xs = [r.params[k] for r in done]
        ys = [r.metric for r in done]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        if numeric:
            ax.scatter(xs, ys, s=24)
            if min(xs) > 0 and max(xs) / min(xs) >= 20:
                ax.set_xscale("log")
        else:
            labels = sorted({format_value(x) for x in xs})
            ax.scatter([labels.index(format_value(x)) for x in xs], ys, s=24)
            ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(k.replace("model.init_args.", "").replace("init_args.", ""), fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(sweep.metric)
    fig.suptitle(f"{sweep.name} ({len(done)} trials)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- SLURM


def table_command(sweep: Sweep, folder: Path) -> str:
    """The command that writes the table of a sweep's finished trials (its folder named: ``--dir``)."""
    return shlex.join(["cvlab", "sweep", str(sweep.path), "--local", "--table", "--dir", str(folder)])


def slurm_script(sweep: Sweep, trials: list[dict[str, Any]], folder: Path, time_limit: str = "04:00:00") -> str:
    """A job-array script: array index i runs ``trials[i]`` in its own run folder, requeued on preemption."""
    if not trials:
        raise CvlabError(f"sweep {sweep.name}: every trial has finished; nothing to submit")
    cases = []
    env_prefix = ""
    for i, params in enumerate(trials):
        tc = trial_command(sweep, params, folder / trial_id(params, sweep.command), python="python")
        env_prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in tc.env.items())
        args = tc.argv[tc.argv.index("experiments.cli") + 1:]
        cases.append(f"  {i}) TRIAL=({' '.join(shlex.quote(a) for a in args)}) ;;")
    launch = f"{env_prefix + ' ' if env_prefix else ''}srun .venv/bin/python -m experiments.cli \"${{TRIAL[@]}}\""
    return "\n".join([
        "#!/bin/bash",
        f"# cvlab sweep {sweep.name}: one trial per array index ({len(trials)} trials), written by",
        f"#   cvlab sweep {sweep.path} --slurm",
        "# Submit from the repository root: sbatch " + str(folder / "sweep.sbatch"),
        "# A preempted task gets SIGUSR1 90 s before the end, Lightning saves hpc_ckpt_*.ckpt and requeues it;",
        "# the requeued task resumes from its trial folder's checkpoints/last.ckpt (--ckpt_path=last).",
        "# When the array is done: " + table_command(sweep, folder),
        f"#SBATCH --job-name=sweep-{sweep.name}",
        f"#SBATCH --array=0-{len(trials) - 1}",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gres=gpu:1",
        "#SBATCH --cpus-per-task=8",
        f"#SBATCH --time={time_limit}",
        "#SBATCH --signal=USR1@90",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={folder}/slurm-%A_%a.out",
        "set -euo pipefail",
        f"cd {shlex.quote(str(REPO))}",
        'case "${SLURM_ARRAY_TASK_ID:?run me with sbatch --array}" in',
        *cases,
        '  *) echo "no trial for array index $SLURM_ARRAY_TASK_ID" >&2; exit 1 ;;',
        "esac",
        launch,
        "",
    ])


# ---------------------------------------------------------------------------------------------- wandb


def wandb_config(sweep: Sweep) -> dict[str, Any]:
    """The sweep file as ``wandb.sweep`` takes it."""
    return dict(sweep.config)


def agent_commands(
    sweep_id: str, project: str, devices: list[str | None], count: int | None = None
) -> list[tuple[list[str], dict[str, str]]]:
    """One ``wandb agent`` process per device slot, with its ``CUDA_VISIBLE_DEVICES``."""
    out = []
    for d in devices:
        cmd = [sys.executable, "-m", "wandb", "agent", "--project", project]
        if count:
            cmd += ["--count", str(count)]
        out.append(([*cmd, sweep_id], {} if d is None else {"CUDA_VISIBLE_DEVICES": d}))
    return out


def run_wandb(sweep: Sweep, agents: int = 1, project: str = "cvlab", count: int | None = None) -> int:
    """Register the sweep and run its agents here (one in-process, or one subprocess per GPU)."""
    from experiments.run_folder import wandb_is_configured

    slots = device_slots(agents, "--agents")
    if not wandb_is_configured() or os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        raise CvlabError("wandb sweeps need wandb online (wandb login, WANDB_API_KEY or WANDB_MODE=online); "
                         "without it use --local or --slurm")
    import wandb

    sweep_id = wandb.sweep(sweep=wandb_config(sweep), project=project)
    print(f"[sweep] registered {sweep.name} as {sweep_id} in project {project}", flush=True)
    if len(slots) == 1:
        wandb.agent(sweep_id, project=project, count=count)
        return 0
    procs = []
    for cmd, env in agent_commands(sweep_id, project, slots, count):
        print(f"[sweep] agent on GPU {env['CUDA_VISIBLE_DEVICES']}: {' '.join(cmd)}", flush=True)
        procs.append(subprocess.Popen(cmd, env={**os.environ, **env}, cwd=REPO))
    return max(p.wait() for p in procs)


# ----------------------------------------------------------------------------------------------- main


def main(argv: list[str]) -> int:
    p = OneLineArgumentParser(prog="cvlab sweep", description="Run a sweep (see experiments/sweep.py).")
    p.add_argument("sweep", help="sweep YAML, e.g. experiments/sweeps/quickstart_lr.yaml")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--local", action="store_true", help="expand and run the trials here, without wandb")
    mode.add_argument("--slurm", action="store_true", help="write a SLURM job-array script, one trial per index")
    p.add_argument("--agents", type=int, default=1, help="wandb agents, one per GPU")
    p.add_argument("--devices", type=int, default=1, help="--local: trials at a time, one GPU each")
    p.add_argument("--count", type=int, default=None, help="random sweeps: number of trials (grid: at most this many)")
    p.add_argument("--seed", type=int, default=0, help="random sweeps: the sampling seed")
    p.add_argument("--dir", default=None, help="sweep folder (default <CVLAB_RUNS or runs>/sweeps/<name>)")
    p.add_argument("--project", default="cvlab", help="wandb project")
    p.add_argument("--table", action="store_true", help="--local: only write the table and plot of finished trials")
    p.add_argument("--time", default="04:00:00", help="--slurm: the time limit of each array task")
    a = p.parse_args(argv)
    sweep = load_sweep(a.sweep)
    if not (a.local or a.slurm):
        device_slots(a.agents, "--agents")
        validate(sweep, expand_trials(sweep, a.count, a.seed) if sweep.method != "bayes" else [{}])
        return run_wandb(sweep, a.agents, a.project, a.count)
    folder = Path(a.dir).resolve() if a.dir else sweep_dir(sweep)
    trials = expand_trials(sweep, a.count, a.seed)
    if a.table:
        results = collect(sweep, trials, folder)
    else:
        if a.local:
            device_slots(a.devices, "--devices")
        validate(sweep, trials)
        folder.mkdir(parents=True, exist_ok=True)
        if a.slurm:
            todo = [t for t in trials if trial_metric(sweep, folder / trial_id(t, sweep.command)) is None]
            script = folder / "sweep.sbatch"
            script.write_text(slurm_script(sweep, todo, folder, a.time))
            print(f"[sweep] {len(todo)} of {len(trials)} trials to run: sbatch {script}; when the array is done: "
                  f"{table_command(sweep, folder)}", flush=True)
            return 0
        results = run_local(sweep, trials, folder, a.devices)
    md, path_csv = write_tables(sweep, results, folder)
    png = plot_metric(sweep, results, folder / "metric.png")
    print(md.read_text(), flush=True)
    print(f"[sweep] table: {md} and {path_csv}" + (f"; plot: {png}" if png else ""), flush=True)
    return 1 if any(r.status == "failed" for r in results) else 0
