"""Every YAML under experiments/ parses and runs a couple of shrunk steps on generated data.

Configs are CLI configs (``cvlab <subcommand> --config X``), pipelines (``cvlab run X``, they have a
``stages`` key) or sweeps (``cvlab sweep X``, under ``experiments/sweeps/``: every value a trial would use
is parsed by the CLI and must land at its key).

A CLI config runs with ``GENERIC`` (two steps, CPU, fp32, CSV), ``DATA_SHRINK`` and the shrinking of its method's
smoke file ``tests/smoke/<paper>.yaml`` for ``experiments/<paper>/[<dataset>/]<stage>.yaml``; a method without
one runs with ``fit``. A smoke file is a section::

    command: predict                 # the subcommand (default fit)
    args: {model.init_args.iterations: 2}   # dotted overrides, values as YAML; $VARS from the fixtures below
    inherit: false                   # optional: drop the args of the sections above (start from none)
    datasets: {shapes: SECTION}      # by the config's dataset folder
    stages: {synthesize: SECTION}    # by the config's file name; a stage's ``base: mnist/train.yaml`` makes it
                                     # an overlay, run stacked on that config (of the same paper)

applied from the top down: a section's command and args, then its ``datasets`` entry for the config's dataset
folder, then its ``stages`` entry for its file name, each of them the same way (the more specific wins key by
key). An overlay config is shrunk as its base, then by its own ``stages`` entry. A new shrink override is one line
of YAML in the right section. The smoke files live under tests/, not beside the configs: they name the generated
teachers and impressions of the fixtures (``$CVLAB_TEST_*``) and budgets no real run would use, and a file under
experiments/ would be a config that users find beside the paper's (a user's fast run is the paper's cpu overlay).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from cvlab.errors import CvlabError
from experiments.command_line import as_overrides, load_yaml_file
from experiments.pipeline import run_pipeline
from experiments.sweep import expand_trials, load_sweep, validate
from tests.cli_runs import REPO, run_cli
from tests.fakedata import (
    save_cvlab_checkpoint,
    write_cifar,
    write_data_noun,
    write_imagenet9,
    write_imagenet_s,
    write_inaturalist2019,
    write_mnist_idx,
    write_svhn,
    write_usps,
)

CONFIGS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "experiments").rglob("*.yaml"))

SMOKE_DIR = REPO / "tests" / "smoke"
_SECTION_KEYS = {"command", "args", "inherit", "datasets", "stages", "base"}


@dataclass
class Smoke:
    """How a config runs shrunk: ``cvlab <command> --config <base> [--config <config>] <args>``."""

    command: str = "fit"
    base: str = ""  # the config an overlay config is stacked on ("" for a full config)
    args: dict[str, Any] = field(default_factory=dict)


def _apply(section: dict[str, Any], dataset: str | None, stage: str, out: Smoke, where: str) -> None:
    """A section's command and args over ``out``, then its ``datasets`` entry for ``dataset``, then its ``stages``
    entry for ``stage`` (each the same way: the more specific wins)."""
    if not isinstance(section, dict) or set(section) - _SECTION_KEYS:
        raise ValueError(f"{where}: a section is a mapping of {sorted(_SECTION_KEYS)}, got {section!r}")
    if section.get("inherit") is False:
        out.args = {}
    out.command = section.get("command", out.command)
    out.args.update(section.get("args") or {})
    if dataset in (section.get("datasets") or {}):
        _apply(section["datasets"][dataset], dataset, stage, out, f"{where}.datasets.{dataset}")
    if stage in (section.get("stages") or {}):
        _apply(section["stages"][stage], dataset, stage, out, f"{where}.stages.{stage}")


def _place(config: str) -> tuple[str, str | None, str]:
    """(paper, dataset folder or None, stage) of ``experiments/<paper>/[<dataset>/]<stage>.yaml``."""
    parts = Path(config).parts
    return (parts[1] if len(parts) > 2 else ""), (parts[2] if len(parts) == 4 else None), Path(config).stem


def smoke_plan(config: str) -> Smoke:
    """How ``config`` runs shrunk, from ``tests/smoke/<paper>.yaml`` (none: ``fit`` with the generic shrinking)."""
    paper, dataset, stage = _place(config)
    path = SMOKE_DIR / f"{paper}.yaml"
    spec = (yaml.safe_load(path.read_text()) or {}) if paper and path.is_file() else {}
    own = (spec.get("stages") or {}).get(stage) or {}
    out = Smoke(base=f"experiments/{paper}/{own['base']}" if "base" in own else "")
    if not out.base:
        _apply(spec, dataset, stage, out, path.name)
        return out
    _, base_dataset, base_stage = _place(out.base)
    _apply(spec, base_dataset, base_stage, out, path.name)  # shrunk as its base, then as itself
    _apply({k: v for k, v in own.items() if k != "base"}, base_dataset, stage, out, f"{path.name}.stages.{stage}")
    return out


GENERIC = [
    "--trainer.max_steps=2",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.limit_predict_batches=1",
    "--trainer.precision=32-true",
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--run.logger=csv",
]

#: shrink the embedded dataset (other datasets are generated tiny on disk)
DATA_SHRINK = {
    "datamodules.ShapesDataModule": ["--data.init_args.num_train=200", "--data.init_args.num_test=50"],
}


def _init_params(class_path: str) -> set[str]:
    if not class_path:
        return set()
    import importlib
    import inspect

    module, name = class_path.rsplit(".", 1)
    return set(inspect.signature(getattr(importlib.import_module(module), name).__init__).parameters)


def _is_pipeline(cfg: dict) -> bool:
    return isinstance(cfg, dict) and "stages" in cfg


def _is_sweep(cfg: dict) -> bool:
    return isinstance(cfg, dict) and "parameters" in cfg and "command" in cfg


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fake_data")
    for name in ("MNIST", "FashionMNIST", "KMNIST"):
        write_mnist_idx(root, name, n_train=60, n_test=20)
    write_cifar(root, 10, n_train=60, n_test=20)
    # 4 per class: each keeps training images beside the validation split
    write_cifar(root, 100, n_train=400, n_test=40)
    write_svhn(root, n_train=60, n_test=20)
    write_usps(root, n_train=60, n_test=20)
    write_inaturalist2019(root / "inaturalist", {0: (4, 1), 1: (4, 1), 2: (4, 1)})
    write_imagenet9(root / "imagenet9", per_class=1, size=32, variants=("original", "only_fg", "mixed_same",
                                                                        "mixed_rand", "mixed_next"))
    # ImageNet's val layout (+ ImageNet-S masks) with three wnids of tests.fakedata.DATA_NOUN, for the WordNet report
    write_imagenet_s(root / "imagenet", wnids=("n02084071", "n02121620", "n09999999"), per_class=1)
    return root


@pytest.fixture(scope="module")
def zskd_artifacts(tmp_path_factory: pytest.TempPathFactory):
    """Tiny random teachers (1x32x32 LeNet-5, 3x32x32 ConvNets) and impression shards for the ZSKD /
    transfer-set configs, exposed as CVLAB_TEST_TEACHER_<CxK> and CVLAB_TEST_IMPRESSIONS_<CxK>."""
    import torch

    from lit_modules.classifier import ClassifierModule

    root, env = tmp_path_factory.mktemp("zskd"), {}
    tiny = {"width": 8, "depth": 2, "norm": "batchnorm"}
    for key, arch, ch, k, kw in (("1x10", "lenet5", 1, 10, {}), ("3x10", "convnet", 3, 10, tiny),
                                 ("3x100", "convnet", 3, 100, tiny), ("3x3", "convnet", 3, 3, tiny)):
        m = ClassifierModule(arch=arch, num_classes=k, in_channels=ch, image_size=32, arch_kwargs=kw)
        save_cvlab_checkpoint(m, root / f"teacher_{key}.ckpt")
        env[f"CVLAB_TEST_TEACHER_{key}"] = str(root / f"teacher_{key}.ckpt")
        (root / f"di_{key}").mkdir()
        torch.save({"index": torch.arange(16), "image": torch.rand(16, ch, 32, 32),
                    "target": torch.full((16, k), 1 / k)},
                   root / f"di_{key}" / "shard-000000000-000000015-r0.pt")
        env[f"CVLAB_TEST_IMPRESSIONS_{key}"] = str(root / f"di_{key}")
    env["CVLAB_TEST_DATA_NOUN"] = str(write_data_noun(root / "data.noun"))
    return env


@pytest.mark.parametrize("config", CONFIGS)
def test_config_runs_shrunk(config: str, fake_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            zskd_artifacts) -> None:
    for k, v in zskd_artifacts.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("CVLAB_DATA", str(fake_root))
    spec = yaml.safe_load((REPO / config).read_text())
    if _is_pipeline(spec):
        run_pipeline(REPO / config, root=tmp_path / "runs", dry_run=True)
        return
    if _is_sweep(spec):
        sweep = load_sweep(REPO / config)
        validate(sweep, expand_trials(sweep, count=3 if sweep.method == "random" else None))
        return
    plan = smoke_plan(config)
    base = plan.base or config
    if base != config:
        spec = yaml.safe_load((REPO / base).read_text())
    data_cls = (spec.get("data") or {}).get("class_path", "")
    configs = [f"--config={base}"] + ([f"--config={config}"] if base != config else [])
    args = [plan.command, *configs, *GENERIC, *DATA_SHRINK.get(data_cls, [])]
    if "batch_size" in _init_params(data_cls) and data_cls != "datamodules.ShapesDataModule":
        args.append("--data.init_args.batch_size=8")
    cli = run_cli(*args, *[os.path.expandvars(a) for a in as_overrides(plan.args)], run_dir=tmp_path / "run")
    assert (tmp_path / "run" / "metrics.json").is_file(), "the run wrote no metrics.json"
    assert cli.trainer is not None


def test_smoke_files_name_only_configs_that_exist() -> None:
    """A dataset or stage of a smoke file that no config has (renamed, deleted) shrinks nothing: it fails here."""
    bad = []
    for path in sorted(SMOKE_DIR.glob("*.yaml")):
        paper = REPO / "experiments" / path.stem
        configs = sorted(paper.rglob("*.yaml"))
        datasets = {c.parent.name for c in configs if c.parent != paper}
        stages = {c.stem for c in configs}
        todo = [(path.name, yaml.safe_load(path.read_text()) or {})]
        bad += [f"{path.name}: no folder experiments/{path.stem}/"] if not paper.is_dir() else []
        while todo:
            where, section = todo.pop()
            bad += [f"{where}.datasets.{d}" for d in section.get("datasets") or {} if d not in datasets]
            bad += [f"{where}.stages.{t}" for t in section.get("stages") or {} if t not in stages]
            if "base" in section and not (paper / section["base"]).is_file():
                bad.append(f"{where}.base: {section['base']} is no config of experiments/{path.stem}/")
            todo += [(f"{where}.{k}.{name}", sub) for k in ("datasets", "stages")
                     for name, sub in (section.get(k) or {}).items()]
    assert not bad, "smoke sections that match no config:\n" + "\n".join(bad)


def test_smoke_plan_worked_answers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "p.yaml").write_text(
        "args: {a: 1, b: 2}\n"
        "datasets: {d: {args: {a: 3}, stages: {s: {args: {c: [1]}}}}}\n"
        "stages:\n"
        "  s: {command: test, args: {a: 4}, datasets: {d: {args: {b: 5}}}}\n"
        "  t: {inherit: false, args: {e: false}}\n"
        "  o: {base: d/s.yaml, args: {f: x}}\n"
        "  bad: {arg: {a: 1}}\n")
    monkeypatch.setattr(f"{__name__}.SMOKE_DIR", tmp_path)
    # top, then datasets.d (and its stages.s), then stages.s (and its datasets.d): the more specific wins
    assert smoke_plan("experiments/p/d/s.yaml") == Smoke("test", "", {"a": 4, "b": 5, "c": [1]})
    assert smoke_plan("experiments/p/e/s.yaml") == Smoke("test", "", {"a": 4, "b": 2})
    assert smoke_plan("experiments/p/d/t.yaml") == Smoke("fit", "", {"e": False})
    assert smoke_plan("experiments/p/d/u.yaml") == Smoke("fit", "", {"a": 3, "b": 2})
    # an overlay: shrunk as its base (d/s.yaml), then by its own stage
    assert smoke_plan("experiments/p/o.yaml") == Smoke("test", "experiments/p/d/s.yaml",
                                                       {"a": 4, "b": 5, "c": [1], "f": "x"})
    assert smoke_plan("experiments/q/d/s.yaml") == Smoke()  # no smoke file: fit, nothing
    with pytest.raises(ValueError, match="p.yaml.stages.bad"):
        smoke_plan("experiments/p/d/bad.yaml")
    assert as_overrides({"a": [1], "e": False, "f": "x"}) == ["--a=[1]", "--e=false", "--f=x"]


#: what a measured result looks like in a comment: a mean +- sd, a measured percentage compared with another, or a
#: pointer to the results page as the source of a number (the paper's own numbers, "Paper: ...", are allowed)
_RESULT_IN_COMMENT = re.compile(r"[0-9]\s*\+-\s*[0-9]|[0-9]%\s*vs\.?\s*[0-9]|[0-9]\s*vs\.?\s*[0-9.]+%|"
                                r"docs/RESULTS\.md[^#]*[0-9]%")


def test_no_config_comment_states_a_result() -> None:
    """Results live in docs/results/ (records), not in config comments, where they go stale."""
    bad = []
    for config in CONFIGS:
        for n, line in enumerate((REPO / config).read_text().splitlines(), 1):
            comment = line.split("#", 1)[1] if "#" in line else ""
            if comment and _RESULT_IN_COMMENT.search(comment) and "Paper" not in comment and "paper" not in comment:
                bad.append(f"{config}:{n}: {comment.strip()[:80]}")
    assert not bad, "\n".join(bad)


def test_no_shipped_yaml_writes_a_key_twice() -> None:
    """A key written twice in one mapping is silently settled by YAML (the last wins): the recipes pipeline once
    carried two ``report:`` blocks, of which only the second was read. Every shipped config, pipeline and sweep
    loads through the strict loader the commands use."""
    bad = []
    for config in CONFIGS:
        try:
            load_yaml_file(REPO / config)
        except CvlabError as e:
            bad.append(str(e))
    assert not bad, "\n".join(bad)
