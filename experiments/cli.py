"""The ``cvlab`` command.

- ``cvlab fit|validate|test|predict --config X.yaml [--section.key value ...]``: LightningCLI with
  model and data in subclass mode, one deterministic run folder per config, ``metrics.json`` in it.
- ``cvlab run PIPELINE.yaml``: run an experiment's stages in order (see :mod:`experiments.pipeline`).
- ``cvlab bench NAME ...``: print a benchmark (see :mod:`experiments.benchmarks`).
- ``cvlab sweep FILE [--local | --slurm]``: a hyperparameter sweep (see :mod:`experiments.sweep`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from callbacks.metrics_json import MetricsJsonWriter
from callbacks.safety import RngStateCheckpoint, StopOnNonFiniteLoss
from callbacks.slurm_requeue import DropFinishedHpcCheckpoints
from cvlab.errors import CvlabError
from experiments.host_malloc import keep_freed_host_memory
from experiments.run_folder import config_hash, make_logger


def _is_rank_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


class RunFolderConfig(SaveConfigCallback):
    """Save the resolved config as ``<run folder>/config.yaml`` (rank 0, overwritten on resume)."""

    def __init__(self, parser, config, **kwargs) -> None:
        kwargs.update(overwrite=True, save_to_log_dir=False)
        super().__init__(parser, config, **kwargs)

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        path = Path(trainer.default_root_dir) / "config.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, str(path), skip_none=False, overwrite=True, multifile=False)


class CvlabCLI(LightningCLI):
    """LightningCLI with cvlab's run folders, logger defaults and safety callbacks."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", None)
        kwargs.setdefault("datamodule_class", None)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_callback", RunFolderConfig)
        kwargs.setdefault("auto_configure_optimizers", False)
        # single device unless the config asks for more (trainer.devices / strategy: ddp)
        kwargs.setdefault("trainer_defaults", {"devices": 1})
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run.root", type=str, default=os.environ.get("CVLAB_RUNS", "runs"),
                            help="parent of run folders (env CVLAB_RUNS)")
        parser.add_argument("--run.name", type=str | None, default=None,
                            help="run name (default: the config file's name)")
        parser.add_argument("--run.dir", type=str | None, default=None,
                            help="explicit run folder (default: <root>/<name>-<config hash>)")
        parser.add_argument("--run.logger", type=Literal["wandb", "csv", "tensorboard", "none"],
                            default=os.environ.get("CVLAB_LOGGER", "wandb"),
                            help="wandb (offline unless configured), csv, tensorboard or none (env CVLAB_LOGGER)")
        parser.add_argument("--run.wandb_project", type=str, default="cvlab")
        parser.add_argument("--run.test_after_fit", type=bool, default=True,
                            help="after fit, evaluate the final weights on the test set (test/* metrics)")

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        run = cfg.run
        if run.name is None:
            configs = cfg.get("config") or []
            if configs:
                p = Path(str(configs[-1]))
                run.name = f"{p.parent.name}-{p.stem}" if p.parent.name not in ("", "experiments") else p.stem
            else:
                run.name = cfg.model.class_path.rsplit(".", 1)[-1].lower()
        if run.dir is None:
            run.dir = str(Path(run.root) / f"{run.name}-{config_hash(cfg.as_dict())}")
        cfg.trainer.default_root_dir = run.dir

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> L.Trainer:
        run = (self.config[self.subcommand] if self.subcommand else self.config).run
        if config.get("logger") is None:
            config["logger"] = make_logger(run.logger, run.dir, run.name, run.wandb_project)
        given = config.get("callbacks") or []
        callbacks = list(callbacks) + [MetricsJsonWriter(run.dir), StopOnNonFiniteLoss(), RngStateCheckpoint(),
                                     DropFinishedHpcCheckpoints()]
        if config.get("enable_checkpointing", True) is not False and not any(isinstance(c, ModelCheckpoint) for c in given):
            callbacks.append(ModelCheckpoint(dirpath=str(Path(run.dir) / "checkpoints"), save_last=True, save_top_k=1))
        if _is_rank_zero():
            print(f"cvlab: run folder {run.dir}", flush=True)
        return super()._instantiate_trainer(config, callbacks)

    def after_fit(self) -> None:
        run = self.config[self.subcommand].run
        has_test = self.datamodule is not None and type(self.datamodule).test_dataloader is not L.LightningDataModule.test_dataloader
        if run.test_after_fit and has_test and type(self.model).test_step is not L.LightningModule.test_step:
            self.trainer.test(self.model, datamodule=self.datamodule, verbose=self.trainer.is_global_zero)
        self._report()

    def after_validate(self) -> None:
        self._report()

    def after_test(self) -> None:
        self._report()

    def after_predict(self) -> None:
        self._report()

    def _report(self) -> None:
        if self.trainer.is_global_zero:
            print(f"cvlab: done; metrics in {Path(self.trainer.default_root_dir) / 'metrics.json'}", flush=True)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        keep_freed_host_memory()
        if argv and argv[0] == "run":
            from experiments.pipeline import main as run_pipeline

            sys.exit(run_pipeline(argv[1:]))
        if argv and argv[0] == "bench":
            from experiments.benchmarks import main as run_bench

            sys.exit(run_bench(argv[1:]))
        if argv and argv[0] == "sweep":
            from experiments.sweep import main as run_sweep

            sys.exit(run_sweep(argv[1:]))
        CvlabCLI(args=argv)
    except CvlabError as e:
        print(f"cvlab: error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
