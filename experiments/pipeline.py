"""``cvlab run PIPELINE.yaml``: run an experiment's stages in order, skip finished ones, resume killed ones.

A pipeline file::

    name: zskd_mnist                  # run folders go to <root>/<name>/<stage>-<hash>
    stages:
      - name: teacher
        command: fit                  # fit | validate | test | predict
        config: [experiments/teachers/mnist_lenet5.yaml]
        args: {trainer.max_epochs: 20}          # dotted overrides (or a list of "--key=value")
      - name: student
        command: fit
        config: [experiments/zskd/mnist/student.yaml]
        args: {model.init_args.teacher: "${teacher}/checkpoints/last.ckpt"}   # ${stage} = its folder
      # or, instead of training one, start from an existing teacher file (any network, its input contract):
      # - name: teacher
      #   teacher: {weights: path/to/file.pth, arch: {class_path: my.nets.Net}, image_size: 28, mean: [0.5], std: [0.5]}
    paper:                            # optional: numbers to put beside the measured ones
      student:test/acc: 0.9877
    results_md: docs/RESULTS.md       # optional: append the final table there

``cvlab run PIPELINE.yaml --seeds N`` repeats the pipeline (or the ``--only`` stages) over seeds
``S .. S + N - 1`` (``--seed-start S``, default 0), each in its own folder ``<root>/<name>/seed-<s>/``:
every CLI stage gets ``seed_everything``, and ``model.init_args.seed`` / ``data.init_args.seed`` /
``data.init_args.task.init_args.seed`` where its model / datamodule / wrapped task has one (the data seed also
draws the validation split). It ends with the mean, sample sd and range of every test metric (``test/*``,
``eval/*``) and validation metric (``val/*``) over the seeds, as a markdown table with the command (printed;
appended to ``--results-md`` when given).

Each stage runs as its own ``cvlab`` process (so DDP launchers work as usual). A stage's folder is
named by a hash of its command, its config files' parsed contents (comments and layout do not count) and its
resolved arguments: a stage whose folder holds ``stage.json`` is skipped; one with ``checkpoints/last.ckpt`` but no
``stage.json`` was killed and is resumed from it. Changing a config gives a new folder and keeps
the old one.

A stage with a ``teacher`` mapping (a :class:`lit_modules.teacher.TeacherSpec`) instead of
``command``/``config`` imports an existing teacher: it is loaded (every check of the teacher loader
runs here, before any later stage) and written to ``<folder>/checkpoints/last.ckpt`` in cvlab's layout
with its input contract (a TorchScript teacher as TorchScript with the contract inside), so later
stages refer to it as ``${teacher}/checkpoints/last.ckpt`` exactly as to a trained one; ``--only``
can run it like any stage, and ``--set teacher.weights=...`` (any key of its mapping, ``--seeds`` too) changes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cvlab.errors import CvlabError
from cvlab.records import mean_sd, paired_differences, record_from_seeds, save_record
from experiments.command_line import OneLineArgumentParser, as_overrides, load_yaml_file

_COMMANDS = ("fit", "validate", "test", "predict")
#: set by SIGTERM (a SLURM requeue or preemption): the stage running then stopped early, even when it exits 0
#: (Lightning ends a fit on SIGTERM with SystemExit), so it must not be marked done
_TERMINATED = threading.Event()
#: the stage process running now (SIGTERM to this process is passed on to it)
_CHILD: subprocess.Popen | None = None
_REF = re.compile(r"\$\{([A-Za-z0-9_\-]+)\}")


@dataclass
class Stage:
    name: str
    command: str  # fit | validate | test | predict, or "teacher" for an imported teacher
    config: list[str]
    args: list[str] = field(default_factory=list)
    teacher: dict[str, Any] | None = None


def _as_arg_list(args: Any, where: str) -> list[str]:
    if args is None:
        return []
    if isinstance(args, dict):
        return as_overrides(args)
    if isinstance(args, list):
        return [str(a) for a in args]
    raise CvlabError(
        f"{where}: 'args' must be a mapping of dotted keys or a list of '--key=value', got {type(args).__name__}"
    )


def load_pipeline(path: str | Path) -> tuple[dict[str, Any], list[Stage]]:
    """Parse and validate a pipeline file; errors name the file and the stage."""
    path = Path(path)
    if not path.is_file():
        raise CvlabError(f"pipeline file not found: {path}")
    spec = load_yaml_file(path, "pipeline file") or {}
    if not isinstance(spec, dict):
        raise CvlabError(f"{path}: a pipeline is a mapping with 'name' and 'stages', got a {type(spec).__name__}")
    unknown = set(spec) - {"name", "stages", "paper", "record", "results_md", "description"}
    if unknown:
        raise CvlabError(f"{path}: unknown pipeline keys {sorted(unknown)}; "
                         "expected name, stages, paper, record, results_md, description")
    if "name" not in spec or not spec.get("stages"):
        raise CvlabError(f"{path}: a pipeline needs 'name' and a non-empty list of 'stages'")
    stages: list[Stage] = []
    for i, s in enumerate(spec["stages"]):
        where = f"{path} stage {i}"
        if not isinstance(s, dict) or "name" not in s:
            raise CvlabError(f"{where}: each stage needs a 'name'")
        bad = set(s) - {"name", "command", "config", "args", "teacher"}
        if bad:
            raise CvlabError(f"{where} ({s['name']}): unknown keys {sorted(bad)}; expected name, command, config, args "
                             "(or name, teacher)")
        if "teacher" in s:
            if set(s) - {"name", "teacher"} or not isinstance(s["teacher"], dict) or "weights" not in s["teacher"]:
                raise CvlabError(f"{where} ({s['name']}): an imported teacher stage has only 'name' and 'teacher' "
                                 "(a mapping with at least 'weights')")
            stages.append(Stage(s["name"], "teacher", [], [], dict(s["teacher"])))
            continue
        cmd = s.get("command", "fit")
        if cmd not in _COMMANDS:
            raise CvlabError(f"{where} ({s['name']}): command {cmd!r} is not one of {_COMMANDS}")
        cfgs = s.get("config") or []
        cfgs = [cfgs] if isinstance(cfgs, str) else list(cfgs)
        for c in cfgs:
            if not Path(c).is_file():
                raise CvlabError(f"{where} ({s['name']}): config file not found: {c}")
        stages.append(Stage(s["name"], cmd, cfgs, _as_arg_list(s.get("args"), where)))
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise CvlabError(f"{path}: stage names must be unique, got {names}")
    return spec, stages


def _resolve(arg: str, dirs: dict[str, Path], stage: str) -> str:
    def sub(m: re.Match) -> str:
        ref = m.group(1)
        if ref not in dirs:
            raise CvlabError(f"stage {stage!r} refers to ${{{ref}}}, which is not an earlier stage ({sorted(dirs)})")
        return str(dirs[ref])

    return _REF.sub(sub, arg)


def stage_hash(stage: Stage, args: list[str]) -> str:
    h = hashlib.sha256()
    h.update(stage.command.encode())
    if stage.teacher is not None:
        h.update(json.dumps(stage.teacher, sort_keys=True).encode())
        weights = Path(stage.teacher["weights"])
        if weights.is_file():
            h.update(weights.read_bytes())
    for c in stage.config:  # the parsed content: editing a comment or the layout must not re-run a finished stage
        content = load_yaml_file(c, f"stage {stage.name!r}: config")
        h.update(json.dumps(content, sort_keys=True, default=str).encode())
    for a in args:
        h.update(b"\0" + a.encode())
    return h.hexdigest()[:8]


def _overrides_for(stage: str, sets: list[str]) -> list[str]:
    out = []
    for s in sets:
        if "=" not in s or "." not in s.split("=", 1)[0]:
            raise CvlabError(f"--set expects STAGE.key=value or *.key=value, got {s!r}")
        target, rest = s.split(".", 1)
        if target in (stage, "*"):
            out.append(f"--{rest}")
    return out


def teacher_with_sets(stage: Stage, sets: list[str]) -> Stage:
    """An imported-teacher stage with its own ``--set STAGE.key=value`` overrides laid over its ``teacher``
    mapping (``weights``, ``mean``, ``arch.init_args.num_classes``, ...; values read as YAML, as the CLI reads
    them; ``null`` unsets); a key that is not a teacher key fails in one line. ``*.`` overrides are for CLI
    stages and do not reach it. Any other stage is returned as it is."""
    import copy
    import difflib

    from lit_modules.teacher import TeacherSpec

    if stage.teacher is None:
        return stage
    teacher, keys = copy.deepcopy(stage.teacher), sorted(TeacherSpec.__dataclass_fields__)
    for s in sets:
        if s.split(".", 1)[0] != stage.name:
            continue
        key, value = s.split(".", 1)[1].split("=", 1)
        path = key.split(".")
        if path[0] not in keys:
            near = difflib.get_close_matches(path[0], keys, n=1)
            raise CvlabError(f"--set {s!r}: {path[0]!r} is not a key of the imported teacher of stage {stage.name!r}"
                             f"{f'; did you mean {near[0]!r}' if near else ''} (keys: {', '.join(keys)})")
        node = teacher
        for part in path[:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise CvlabError(f"--set {s!r}: {part!r} of the teacher of stage {stage.name!r} is not a mapping")
        node[path[-1]] = yaml.safe_load(value)
    return Stage(stage.name, stage.command, stage.config, stage.args, teacher)


def validate_pipeline(stages: list[Stage], sets: list[str], only: list[str] | None = None) -> None:
    """Check, before any stage runs, every ``--set`` override (its form and its stage), every ``--only``
    name, and every ``${stage}`` reference in a stage's args or overrides (it must name an earlier stage)."""
    names = [s.name for s in stages]
    for name in only or []:
        if name not in names:
            raise CvlabError(f"--only {name!r}: no such stage (stages: {sorted(names)})")
    for s in sets:
        if "=" not in s or "." not in s.split("=", 1)[0]:
            raise CvlabError(f"--set expects STAGE.key=value or *.key=value, got {s!r}")
        if s.split(".", 1)[0] not in [*names, "*"]:
            raise CvlabError(f"--set {s!r}: no stage named {s.split('.', 1)[0]!r} (stages: {sorted(names)})")
    earlier: list[str] = []
    for stage in stages:
        for arg in stage.args + _overrides_for(stage.name, sets):
            for ref in _REF.findall(arg):
                if ref not in earlier:
                    what = "it is a later stage" if ref in names else "there is no such stage"
                    raise CvlabError(
                        f"stage {stage.name!r} refers to ${{{ref}}} in {arg!r}, "
                        f"which is not an earlier stage ({what}); "
                        f"earlier stages: {earlier or 'none'}; nothing was run"
                    )
        earlier.append(stage.name)
    check_stage_arguments(stages, sets)


def _stage_argv(stage: Stage, sets: list[str]) -> list[str]:
    """A CLI stage's command line for parsing before it runs (``${stage}`` references stand in as paths)."""
    args = [
        _REF.sub(lambda m: f"/pipeline-stage/{m.group(1)}", a) for a in stage.args + _overrides_for(stage.name, sets)
    ]
    return [stage.command, *[f"--config={c}" for c in stage.config], *args]


def check_stage_arguments(stages: list[Stage], sets: list[str]) -> None:
    """Parse every CLI stage's config files, args and ``--set`` overrides as its ``cvlab`` process will,
    before any stage runs (``${stage}`` references stand in as paths): a wrong key or value fails here."""
    from experiments.lightning_cli import parse_arguments_only

    for stage in stages:
        if stage.command == "teacher":
            teacher_with_sets(stage, sets)  # its keys are checked here
            continue
        try:
            parse_arguments_only(_stage_argv(stage, sets))
        except CvlabError as e:
            raise CvlabError(f"stage {stage.name!r}: {e}; nothing was run") from None


def run_pipeline(
    path: str | Path,
    root: str | Path = "runs",
    sets: list[str] | None = None,
    dry_run: bool = False,
    results_md: str | None = None,
    only: list[str] | None = None,
    subdir: str | None = None,
) -> dict[str, dict[str, float]]:
    """Run the stages (``only``: just these, the others must be done if referenced); return ``{stage: metrics}``.
    ``subdir``: put the stage folders under ``<root>/<name>/<subdir>/`` (one seed's run)."""
    from cvlab.artifacts import atomic_write_json, read_json
    from experiments.run_folder import RunFolderLock

    spec, stages = load_pipeline(path)
    sets = sets or []
    validate_pipeline(stages, sets, only)
    base = Path(root) / spec["name"] / (subdir or "")
    dirs: dict[str, Path] = {}
    metrics: dict[str, dict[str, float]] = {}
    for number, stage in enumerate(stages, 1):
        tag = f"[{number}/{len(stages)} {stage.name}]"
        stage = teacher_with_sets(stage, sets)  # an imported teacher takes its --set keys into its mapping
        args = [_resolve(a, dirs, stage.name) for a in stage.args + _overrides_for(stage.name, sets)]
        folder = (base / f"{stage.name}-{stage_hash(stage, args)}").resolve()
        dirs[stage.name] = folder
        marker = folder / "stage.json"
        cmd = [sys.executable, "-m", "experiments.cli", stage.command]
        for c in stage.config:
            cmd += ["--config", c]
        cmd += [f"--run.dir={folder}", f"--run.name={spec['name']}/{stage.name}", *args]
        if marker.is_file():
            print(f"[{stage.name}] done before, skipping: {folder}", flush=True)
        elif only and stage.name not in only:
            if any(f"${{{stage.name}}}" in a for later in stages for a in later.args if later.name in only):
                raise CvlabError(f"stage {stage.name!r} is needed by --only {only} but has not run; add it to --only")
            print(f"[{stage.name}] not in --only, not run", flush=True)
            continue
        elif stage.command == "teacher":
            print(f"[{stage.name}] importing teacher {stage.teacher['weights']}", flush=True)
            if dry_run:
                continue
            t0 = time.perf_counter()
            with RunFolderLock(folder, command=f"cvlab run {path} (stage {stage.name})"):
                contract = import_teacher(stage.teacher, folder)
                atomic_write_json(
                    folder / "metrics.json",
                    {f"teacher/{k}": v for k, v in contract.items() if isinstance(v, (int, float))},
                )
                atomic_write_json(marker, {"stage": stage.name, "teacher": stage.teacher, "contract": contract,
                                           "wall_s": time.perf_counter() - t0})
        else:
            if not dry_run:
                RunFolderLock(folder).check_free()  # another pipeline (or a stage orphaned by a kill) runs it now
            last = folder / "checkpoints" / "last.ckpt"
            if stage.command == "fit" and last.is_file():
                print(f"[{stage.name}] resuming a killed run from {last}", flush=True)
                cmd.append(f"--ckpt_path={last}")
            print(f"[{stage.name}] {shlex.join(cmd)}", flush=True)
            if dry_run:
                continue
            print(f"{tag} {stage.command} in {folder}", flush=True)
            t0 = time.perf_counter()
            rc = run_stage(cmd, stage.name, folder)
            if rc != 0 or _TERMINATED.is_set():
                why = "was stopped by SIGTERM" if _TERMINATED.is_set() else f"failed (exit {rc})"
                raise CvlabError(f"stage {stage.name!r} {why}; its folder {folder} is kept, rerun to resume")
            atomic_write_json(marker, {"stage": stage.name, "command": cmd, "wall_s": time.perf_counter() - t0})
            shown = [f"{k} {v:.4f}" for k, v in sorted(read_json(folder / "metrics.json", default={}).items())
                     if k.startswith("test/") and k.count("/") == 1 and isinstance(v, (int, float))]
            done = f"{tag} done in {time.perf_counter() - t0:.0f} s"
            print(done + (f": {', '.join(shown)}" if shown else ""), flush=True)
        metrics[stage.name] = read_json(folder / "metrics.json", default={})
    table = results_table(spec, metrics, dirs)
    print(table, flush=True)
    target = results_md or spec.get("results_md")
    if target and not dry_run:
        with open(target, "a") as f:
            f.write("\n" + table + "\n")
        print(f"appended to {target}")
    return metrics


class StageInterrupted(CvlabError):
    """Ctrl-C (SIGINT) stopped the pipeline while a stage ran; the stage was stopped too."""


def _die_with_parent() -> None:
    """In the stage process, before it runs: ask Linux to send it SIGTERM when this process dies (also on
    ``kill -9``), so a stage never trains on as an orphan; Lightning ends a fit on SIGTERM."""
    import ctypes

    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def run_stage(cmd: list[str], name: str, folder: Path, grace_s: float = 60.0) -> int:
    """Run a stage's ``cvlab`` process and return its exit code. It dies with this process (see
    :func:`_die_with_parent`), gets this process's SIGTERM, and on Ctrl-C is given ``grace_s`` seconds to stop
    (then killed) before :class:`StageInterrupted` is raised."""
    global _CHILD
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CVLAB_STAGE": "1"}
    linux = sys.platform.startswith("linux")
    _CHILD = subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent if linux else None)  # noqa: PLW1509
    try:
        return _CHILD.wait()
    except KeyboardInterrupt:
        if _CHILD.poll() is None:
            _CHILD.send_signal(signal.SIGINT)  # the terminal sent it to the stage too, unless it was sent to us alone
        try:
            _CHILD.wait(timeout=grace_s)
        except (KeyboardInterrupt, subprocess.TimeoutExpired):
            _CHILD.kill()
            _CHILD.wait()
        raise StageInterrupted(f"interrupted during stage {name!r}; its folder {folder} is kept") from None
    finally:
        _CHILD = None


def _on_sigterm(signum: int, frame: Any) -> None:
    _TERMINATED.set()
    child = _CHILD
    if child is not None and child.poll() is None:
        child.send_signal(signal.SIGTERM)  # a `kill` of this process alone stops its stage too


def import_teacher(spec: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Load a teacher (all the loader's checks) and write it to ``folder/checkpoints/last.ckpt`` in cvlab's
    layout with its input contract; return the contract."""
    import shutil

    from cvlab.artifacts import atomic_torch_save
    from lit_modules.teacher import export_torchscript, is_torchscript, load_teacher

    teacher = load_teacher(spec)
    s = teacher.spec
    contract = {"num_classes": s.num_classes, "in_channels": s.in_channels, "image_size": s.image_size,
                "mean": s.mean, "std": s.std}
    out = folder / "checkpoints" / "last.ckpt"
    out.parent.mkdir(parents=True, exist_ok=True)
    if is_torchscript(s.weights):
        export_torchscript(teacher.net, out.with_suffix(".tmp"), s)
        shutil.move(out.with_suffix(".tmp"), out)
    else:
        state = {f"net.{k}": v for k, v in teacher.net.state_dict().items()}
        hp = {"arch": s.arch, "arch_kwargs": s.arch_kwargs, **contract, "imported_from": str(Path(s.weights).resolve())}
        atomic_torch_save({"state_dict": state, "hyper_parameters": hp}, out)
    return contract


def results_table(spec: dict[str, Any], metrics: dict[str, dict[str, float]], dirs: dict[str, Path]) -> str:
    """A markdown table of every stage's test/val metrics, with the paper's number where given."""
    paper: dict[str, float] = spec.get("paper") or {}
    rows = [
        f"### {spec['name']} ({time.strftime('%Y-%m-%d')})",
        "",
        "| stage:metric | measured | paper |",
        "| --- | --- | --- |",
    ]
    for stage, m in metrics.items():
        for k, v in sorted(m.items()):
            key = f"{stage}:{k}"
            if k.startswith(("test/", "val/", "eval/", "synthesis/", "attack/")) or key in paper:
                ref = paper.get(key)
                rows.append(f"| {key} | {v:.4f} | {'' if ref is None else ref} |")
    return "\n".join(rows)


def finished_stages(folder: str | Path, stage: str) -> dict[int, Path]:
    """``{seed: stage folder}`` of ``stage`` finished (``stage.json`` written) in each ``<folder>/seed-<s>/`` of a
    ``cvlab run ... --seeds N``; of several finished folders of a stage (runs with other configs) the last by name."""
    out = {}
    for seed_dir in Path(folder).glob("seed-*"):
        done = sorted(p.parent for p in seed_dir.glob(f"{stage}-*/stage.json"))
        if done:
            out[int(seed_dir.name.split("-", 1)[1])] = done[-1]
    return dict(sorted(out.items()))


def seed_overrides(stages: list[Stage], sets: list[str], seed: int) -> list[str]:
    """``--set`` overrides giving every CLI stage ``seed``: ``seed_everything`` always, and the model's and
    the datamodule's own ``seed`` argument where the stage's classes have one (found by parsing), and that of
    a datamodule's wrapped ``task`` (a data-free or transfer-set student validates on its task's split, which
    must be the one its seed's teacher held out)."""
    from experiments.lightning_cli import parse_arguments_only

    out = []
    for stage in stages:
        if stage.command == "teacher":
            continue
        out.append(f"{stage.name}.seed_everything={seed}")
        argv = _stage_argv(stage, sets)
        for key in ("model.init_args.seed", "data.init_args.seed", "data.init_args.task.init_args.seed"):
            try:
                parse_arguments_only([*argv, f"--{key}={seed}"])
            except CvlabError:
                continue  # this stage's class has no such argument
            out.append(f"{stage.name}.{key}={seed}")
    return out


def seed_summary(per_seed: dict[int, dict[str, dict[str, float]]]) -> dict[str, dict[str, Any]]:
    """``{seed: {stage: metrics}}`` -> ``{"stage:test/metric": {mean, sd, min, max, n, values}}`` over the
    seeds that have the metric: every test-split metric (``test/*``, and ``eval/*``, the evaluation
    protocols that train fresh networks and test them, as Dataset Condensation's), then the validation
    metrics (``val/*``, the figures a recipe is chosen on); ``sd`` is the sample standard deviation (0 for
    one seed)."""
    values: dict[str, list[float]] = {}
    for prefixes in (("test/", "eval/"), ("val/",)):
        for seed in sorted(per_seed):
            for stage, m in per_seed[seed].items():
                for k, v in sorted(m.items()):
                    if k.startswith(prefixes):
                        values.setdefault(f"{stage}:{k}", []).append(float(v))
    out = {}
    for key, vs in values.items():
        n = len(vs)
        mean, sd = mean_sd(vs)
        out[key] = {"mean": mean, "sd": sd, "min": min(vs), "max": max(vs), "n": n, "values": vs}
    return out


def seeds_table(spec: dict[str, Any], summary: dict[str, dict[str, Any]], seeds: list[int], command: str) -> str:
    """The markdown table of :func:`seed_summary`, with the paper's numbers where the pipeline gives them."""
    paper: dict[str, float] = spec.get("paper") or {}
    rows = [f"### {spec['name']}: {len(seeds)} seeds ({', '.join(map(str, seeds))}), {time.strftime('%Y-%m-%d')}", "",
            f"`{command}`", "", "| stage:metric | mean | sd | range | seeds | paper |",
            "| --- | --- | --- | --- | --- | --- |"]
    for key, st in summary.items():
        ref = paper.get(key)
        rows.append(f"| {key} | {st['mean']:.4f} | {st['sd']:.4f} | {st['min']:.4f} - {st['max']:.4f} | "
                    f"{' '.join(f'{v:.4f}' for v in st['values'])} | {'' if ref is None else ref} |")
    return "\n".join(rows)


def run_seeds(
    path: str | Path,
    seeds: list[int],
    root: str | Path = "runs",
    sets: list[str] | None = None,
    dry_run: bool = False,
    results_md: str | None = None,
    only: list[str] | None = None,
    command: str | None = None,
    record: str | Path | None = None,
) -> dict[str, dict[str, Any]]:
    """Run the pipeline once per seed (folders ``<root>/<name>/seed-<s>/``) and summarise every test and
    validation metric (:func:`seed_summary`); print the table and append it to ``results_md`` when given; write
    the results record (:func:`cvlab.records.record_from_seeds`) to ``record``, default
    ``<root>/<name>/record.json``."""
    spec, stages = load_pipeline(path)
    sets = sets or []
    validate_pipeline(stages, sets, only)
    per_seed = {}
    wall_s = {}
    for seed in seeds:
        print(f"=== seed {seed} ===", flush=True)
        # every stage, not just those in --only: a finished stage that --only's stages read keeps its seed's folder
        extra = seed_overrides(stages, sets, seed)
        start = time.monotonic()
        per_seed[seed] = run_pipeline(path, root, sets + extra, dry_run, None, only, subdir=f"seed-{seed}")
        # the stages' own wall times (a stage done before costs nothing now but did then); else this call's
        stage_walls = [v for m in per_seed[seed].values() for k, v in m.items() if k.endswith("/wall_s")]
        wall_s[seed] = sum(stage_walls) if stage_walls else time.monotonic() - start
    summary = seed_summary(per_seed)
    pairs = (spec.get("record") or {}).get("differences") or {}  # paired arms: their per-seed difference too
    full = {k: st["values"] for k, st in summary.items() if st["n"] == len(seeds)}
    for key, vs in paired_differences(full, pairs).items():
        mean, sd = mean_sd(vs)
        summary[key] = {"mean": mean, "sd": sd, "min": min(vs), "max": max(vs), "n": len(vs), "values": vs}
    command = command or f"cvlab run {path} --seeds {len(seeds)}"
    table = seeds_table(spec, summary, seeds, command)
    print(table, flush=True)
    if not dry_run:
        threads = os.environ.get("OMP_NUM_THREADS")
        env = f"CVLAB_DATA=<data> {f'OMP_NUM_THREADS={threads} ' if threads else ''}uv run "
        config_hash = hashlib.sha256(Path(path).read_bytes() + "\0".join(sets).encode()).hexdigest()[:8]
        rec = record_from_seeds(spec, per_seed, env + command, config_hash, wall_s)
        out = save_record(rec, record or Path(root) / spec["name"] / "record.json")
        print(f"results record: {out} (copy it to docs/results/<section>/ and run `cvlab results`)", flush=True)
    if results_md and not dry_run:
        with open(results_md, "a") as f:
            f.write("\n" + table + "\n")
        print(f"appended to {results_md}")
    return summary


def main(argv: list[str]) -> int:
    p = OneLineArgumentParser(
        prog="cvlab run", description="Run a multi-stage experiment (see experiments/pipeline.py)."
    )
    p.add_argument("pipeline", help="pipeline YAML, e.g. experiments/zskd/mnist/pipeline.yaml")
    p.add_argument("--root", default=os.environ.get("CVLAB_RUNS", "runs"), help="parent of run folders")
    p.add_argument("--set", action="append", default=[], metavar="STAGE.key=value",
                   help="override a stage's config (use * for every stage), e.g. '*.trainer.max_epochs=1'; "
                        "--STAGE.key=value does the same")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--only", nargs="+", default=None, metavar="STAGE",
                   help="run just these stages (the stages they reference must be done)")
    p.add_argument("--results-md", default=None, help="append the final table to this markdown file")
    p.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="run the pipeline over N seeds and report the mean, sd and range of every test and "
                        "validation metric")
    p.add_argument("--seed-start", type=int, default=0, metavar="S", help="with --seeds: the first seed (default 0)")
    p.add_argument("--record", default=None, metavar="FILE",
                   help="with --seeds: write the results record here (default <root>/<name>/record.json)")
    a, extra = p.parse_known_args(argv)
    bad = [x for x in extra if not (x.startswith("--") and "=" in x and "." in x.split("=", 1)[0])]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    a.set += [x[2:] for x in extra]  # --STAGE.key=value (a sweep's ${args}) is --set STAGE.key=value
    # SLURM signals every process of a job step: the stage being run saves and requeues on SIGUSR1
    # (Lightning's SLURM environment); this parent must survive it (a Python handler, unlike SIG_IGN,
    # is not inherited by the stage, so Lightning still installs its own there)
    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, lambda signum, frame: None)
        signal.signal(signal.SIGTERM, _on_sigterm)  # the stage gets it too (SLURM signals both; else passed on)
    resume = shlex.join(["cvlab", "run", *argv])
    try:
        if a.seeds is not None:
            if a.seeds < 1:
                p.error(f"--seeds must be >= 1, got {a.seeds}")
            seeds = list(range(a.seed_start, a.seed_start + a.seeds))
            run_seeds(a.pipeline, seeds, a.root, a.set, a.dry_run, a.results_md, a.only,
                      shlex.join(["cvlab", "run", *argv]), a.record)
            return 0
        run_pipeline(a.pipeline, a.root, a.set, a.dry_run, a.results_md, a.only)
    except StageInterrupted as e:
        print(f"cvlab: {e}; resume with: {resume}", file=sys.stderr, flush=True)
        return 130
    except KeyboardInterrupt:
        print(f"cvlab: interrupted between stages; resume with: {resume}", file=sys.stderr, flush=True)
        return 130
    return 0
