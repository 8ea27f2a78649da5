"""Every YAML under experiments/ parses and runs a couple of shrunk steps on generated data.

Configs are CLI configs (``cvlab <subcommand> --config X``) or pipelines (``cvlab run X``, they have a
``stages`` key). A method whose configs need another subcommand or extra shrinking adds a line to
``SMOKE``; the rest are run with ``fit``.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest
import yaml

from experiments.pipeline import run_pipeline
from tests.cli_runs import REPO, run_cli
from tests.fakedata import write_cifar, write_mnist_idx, write_svhn

CONFIGS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "experiments").rglob("*.yaml"))

#: glob -> (subcommand, extra overrides); first match wins, default ("fit", [])
SMOKE: list[tuple[str, str, list[str]]] = []

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


def _is_pipeline(cfg: dict) -> bool:
    return isinstance(cfg, dict) and "stages" in cfg


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fake_data")
    for name in ("MNIST", "FashionMNIST", "KMNIST"):
        write_mnist_idx(root, name, n_train=60, n_test=20)
    write_cifar(root, 10, n_train=60, n_test=20)
    write_cifar(root, 100, n_train=200, n_test=40)
    write_svhn(root, n_train=60, n_test=20)
    return root


@pytest.mark.parametrize("config", CONFIGS)
def test_config_runs_shrunk(config: str, fake_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CVLAB_DATA", str(fake_root))
    spec = yaml.safe_load((REPO / config).read_text())
    if _is_pipeline(spec):
        run_pipeline(REPO / config, root=tmp_path / "runs", dry_run=True)
        return
    sub, extra = "fit", []
    for pattern, s, e in SMOKE:
        if fnmatch.fnmatch(config, pattern):
            sub, extra = s, e
            break
    data_cls = (spec.get("data") or {}).get("class_path", "")
    args = [sub, f"--config={config}", *GENERIC, *DATA_SHRINK.get(data_cls, [])]
    if data_cls.startswith("datamodules.") and data_cls != "datamodules.ShapesDataModule":
        args.append("--data.init_args.batch_size=8")
    cli = run_cli(*args, *extra, run_dir=tmp_path / "run")
    assert (tmp_path / "run" / "metrics.json").is_file(), "the run wrote no metrics.json"
    assert cli.trainer is not None
