"""Every YAML under experiments/ parses and runs a couple of shrunk steps on generated data.

Configs are CLI configs (``cvlab <subcommand> --config X``), pipelines (``cvlab run X``, they have a
``stages`` key) or sweeps (``cvlab sweep X``, under ``experiments/sweeps/``: every value a trial would use
is parsed by the CLI and must land at its key). A method whose configs need another subcommand or extra shrinking
adds a line to ``SMOKE``; the rest are run with ``fit``.
"""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path

import pytest
import yaml

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

#: glob -> (subcommand, extra overrides); first match wins, default ("fit", []); $VARS are expanded
#: (the zskd_artifacts fixture sets CVLAB_TEST_TEACHER_* and CVLAB_TEST_IMPRESSIONS_*)
_ZSKD_SYNTH = ["--model.init_args.iterations=2", "--data.init_args.num_impressions=20",
               "--data.init_args.batch_size=10", "--model.init_args.grid_per_class=1"]
_SHAPES_TASK = ["--data.init_args.task.init_args.num_train=100", "--data.init_args.task.init_args.num_test=50"]
_IDLG = ["--model.init_args.iterations=2", "--data.init_args.num_trials=3", "--data.init_args.trials_per_batch=3"]
_DC = ["--model.init_args.ipc=1", "--model.init_args.outer_loop=2", "--model.init_args.inner_loop=1",
       "--model.init_args.batch_real=4", "--model.init_args.eval_num_nets=1", "--model.init_args.eval_epochs=1",
       "--model.init_args.herding_pool=4", "--model.init_args.eval_test_size=10",
       "--model.init_args.arch_kwargs={width: 8}"]
_LRA = ["--model.init_args.batch_size=8", "--model.init_args.student_steps=1", "--model.init_args.latent_dim=8",
        "--model.init_args.generator_kwargs={widths: [8, 4]}", "--data.init_args.steps_per_epoch=2",
        "--data.init_args.eval_batch_size=8"]
_CBGAN = ["--model.init_args.generator_kwargs={width: 4}", "--model.init_args.discriminator_kwargs={width: 4}",
          "--model.init_args.latent_dim=8", "--model.init_args.inception_fid_on=[]",
          "--data.init_args.eval_batch_size=8"]
SMOKE: list[tuple[str, str, list[str]]] = [
    # three wnids of tests.fakedata.DATA_NOUN in <fake root>/imagenet/val (see fake_root)
    ("experiments/severity/imagenet/report.yaml", "test", [
        "--model.init_args.models={c: $CVLAB_TEST_TEACHER_3x3}",
        "--model.init_args.hierarchy=wordnet:$CVLAB_TEST_DATA_NOUN",
        "--model.init_args.eps=[0.1]", "--model.init_args.steps=2", "--data.init_args.num_classes=3",
        "--data.init_args.image_size=32", "--data.init_args.num_workers=0", "--data.init_args.batch_size=3"]),
    ("experiments/attribution/shapes/study.yaml", "test", ["--model.init_args.models={c: $CVLAB_TEST_TEACHER_3x10}",
     "--data.init_args.num_images=20", "--model.init_args.methods=[gradcam, scorecam]"]),
    ("experiments/attribution/imagenet_cs/study.yaml", "test", ["--data.init_args.image_size=32",  # generated
     "--data.init_args.num_workers=0", "--model.init_args.methods=[gradcam]", "--model.init_args.random_init=false"]),
    ("experiments/attribution/imagenet9/study.yaml", "test", ["--data.init_args.image_size=32",  # generated IN-9
     "--data.init_args.num_workers=0", "--model.init_args.methods=[gradcam]", "--model.init_args.random_init=false"]),
    # three categories of generated iNaturalist 2019 files (see fake_root)
    ("experiments/cbgan/inaturalist2019/classifier.yaml", "fit", ["--model.init_args.drw_epoch=0",
     "--model.init_args.num_classes=3", "--data.init_args.num_classes=3", "--data.init_args.num_workers=0"]),
    ("experiments/cbgan/inaturalist2019/*.yaml", "fit", ["--model.init_args.classifier=$CVLAB_TEST_TEACHER_3x3",
     *_CBGAN, "--data.init_args.num_classes=3", "--data.init_args.num_workers=0", "--data.init_args.val_size=3"]),
    ("experiments/cbgan/*/classifier.yaml", "fit", ["--model.init_args.drw_epoch=0"]),
    ("experiments/cbgan/[mf]*/*.yaml", "fit", ["--model.init_args.classifier=$CVLAB_TEST_TEACHER_1x10", *_CBGAN]),
    ("experiments/cbgan/cifar100_lt/*.yaml", "fit",
     ["--model.init_args.classifier=$CVLAB_TEST_TEACHER_3x100", *_CBGAN]),
    ("experiments/cbgan/cifar10_lt/*.yaml", "fit", ["--model.init_args.classifier=$CVLAB_TEST_TEACHER_3x10", *_CBGAN]),
    ("experiments/severity/cifar100/report.yaml", "test", ["--model.init_args.models={c: $CVLAB_TEST_TEACHER_3x100}",
                                                           "--model.init_args.eps=[0.1]", "--model.init_args.steps=2"]),
    ("experiments/severity/*/report.yaml", "test", ["--model.init_args.models={lenet5: $CVLAB_TEST_TEACHER_1x10}",
                                                    "--model.init_args.eps=[0.1]", "--model.init_args.steps=2"]),
    # the gray-box test (PGD-40 and more) after fit is covered by tests/test_adversarial_training.py
    ("experiments/gat/*", "fit", ["--model.init_args.pgd_steps=2", "--model.init_args.regime=gat",
                                  "--run.test_after_fit=false"]),
    ("experiments/lra/[mf]*/*.yaml", "fit", ["--model.init_args.teacher=$CVLAB_TEST_TEACHER_1x10", *_LRA]),
    ("experiments/lra/generative_replay.yaml", "fit",
     ["--model.init_args.teacher=$CVLAB_TEST_TEACHER_1x10", *_LRA, "--model.init_args.memory_generator_updates=1"]),
    ("experiments/lra/cifar100/*.yaml", "fit", ["--model.init_args.teacher=$CVLAB_TEST_TEACHER_3x100", *_LRA]),
    ("experiments/lra/*/*.yaml", "fit", ["--model.init_args.teacher=$CVLAB_TEST_TEACHER_3x10", *_LRA]),
    ("experiments/dc/cpu.yaml", "fit", [*_DC, "--model.init_args.compile_real=false"]),  # compile: a slow test
    ("experiments/dc/*", "fit", _DC),
    ("experiments/idlg/shapes/*.yaml", "predict", [*_IDLG, "--data.init_args.source.init_args.num_train=100",
                                                   "--data.init_args.source.init_args.num_test=20"]),
    ("experiments/idlg/*/*.yaml", "predict", _IDLG),
    ("experiments/teachers/evaluate.yaml", "test", ["--model.init_args.teacher=$CVLAB_TEST_TEACHER_1x10",
                                                    "--data.init_args.image_size=32"]),
    ("experiments/zskd/shapes/synthesize.yaml", "predict",
     ["--model.init_args.teacher=$CVLAB_TEST_TEACHER_3x10", *_ZSKD_SYNTH]),
    ("experiments/zskd/cifar10/synthesize.yaml", "predict",
     ["--model.init_args.teacher=$CVLAB_TEST_TEACHER_3x10", *_ZSKD_SYNTH]),
    ("experiments/zskd/*/synthesize.yaml", "predict",
     ["--model.init_args.teacher=$CVLAB_TEST_TEACHER_1x10", *_ZSKD_SYNTH]),
    ("experiments/zskd/shapes/student.yaml", "fit", ["--model.init_args.teacher=$CVLAB_TEST_TEACHER_3x10",
     "--data.init_args.pool.init_args.folder=$CVLAB_TEST_IMPRESSIONS_3x10", *_SHAPES_TASK]),
    ("experiments/zskd/cifar10/student.yaml", "fit", ["--model.init_args.teacher=$CVLAB_TEST_TEACHER_3x10",
     "--data.init_args.pool.init_args.folder=$CVLAB_TEST_IMPRESSIONS_3x10"]),
    ("experiments/zskd/*/student.yaml", "fit", ["--model.init_args.teacher=$CVLAB_TEST_TEACHER_1x10",
     "--data.init_args.pool.init_args.folder=$CVLAB_TEST_IMPRESSIONS_1x10"]),
    ("experiments/zskd/[cs][ih]*/student_real.yaml", "fit", ["--model.init_args.teacher=$CVLAB_TEST_TEACHER_3x10"]),
    ("experiments/zskd/*/student_real.yaml", "fit", ["--model.init_args.teacher=$CVLAB_TEST_TEACHER_1x10"]),
    ("experiments/data_impressions/*/uap_impressions.yaml", "fit", ["--model.init_args.model=$CVLAB_TEST_TEACHER_1x10",
     "--data.init_args.pool.init_args.folder=$CVLAB_TEST_IMPRESSIONS_1x10"]),
    ("experiments/data_impressions/*/uap_real.yaml", "fit", ["--model.init_args.model=$CVLAB_TEST_TEACHER_1x10",
     "--data.init_args.pool.init_args.max_size=16"]),
    ("experiments/data_impressions/*/cl_step.yaml", "fit", ["--model.init_args.num_impressions=10",
     "--model.init_args.impression_iterations=2", "--model.init_args.replay_batch=4"]),
    ("experiments/data_impressions/svhn_mnist/sfda_impressions.yaml", "fit",
     ["--model.init_args.source_model=$CVLAB_TEST_TEACHER_3x10",
      "--model.init_args.source.init_args.folder=$CVLAB_TEST_IMPRESSIONS_3x10", "--model.init_args.source_batch=4"]),
    ("experiments/data_impressions/svhn_mnist/sfda_real.yaml", "fit",
     ["--model.init_args.source_model=$CVLAB_TEST_TEACHER_3x10",
      "--model.init_args.source.init_args.max_size=16", "--model.init_args.source_batch=4"]),
    ("experiments/data_impressions/*/sfda_impressions.yaml", "fit",
     ["--model.init_args.source_model=$CVLAB_TEST_TEACHER_1x10",
      "--model.init_args.source.init_args.folder=$CVLAB_TEST_IMPRESSIONS_1x10", "--model.init_args.source_batch=4"]),
    ("experiments/data_impressions/*/sfda_real.yaml", "fit", ["--model.init_args.source_model=$CVLAB_TEST_TEACHER_1x10",
     "--model.init_args.source.init_args.max_size=16", "--model.init_args.source_batch=4"]),
    ("experiments/data_impressions/*/sfda_im_only.yaml", "fit",
     ["--model.init_args.source_model=$CVLAB_TEST_TEACHER_1x10"]),
    ("experiments/transfer_sets/shapes/student.yaml", "fit", ["--model.init_args.teacher=$CVLAB_TEST_TEACHER_3x10",
     "--data.init_args.pool.init_args.size=32", *_SHAPES_TASK]),
    ("experiments/transfer_sets/cifar100/student.yaml", "fit", ["--model.init_args.teacher=$CVLAB_TEST_TEACHER_3x100",
     "--data.init_args.pool.init_args.size=32"]),
    ("experiments/transfer_sets/cifar10/student.yaml", "fit", ["--model.init_args.teacher=$CVLAB_TEST_TEACHER_3x10",
     "--data.init_args.pool.init_args.size=32"]),
    ("experiments/transfer_sets/*/student.yaml", "fit", ["--model.init_args.teacher=$CVLAB_TEST_TEACHER_1x10",
     "--data.init_args.pool.init_args.size=32"]),
]

#: overlay configs (budget settings to stack after a full config) -> the config they are tested on top of
OVERLAYS = {
    "experiments/cbgan/cpu.yaml": "experiments/cbgan/mnist_lt/cbgan.yaml",
    "experiments/lra/mnist/cpu_hour.yaml": "experiments/lra/mnist/lra.yaml",
    "experiments/dc/cpu.yaml": "experiments/dc/mnist/ipc1.yaml",
    "experiments/lra/generative_replay.yaml": "experiments/lra/mnist/lra.yaml",
    "experiments/zskd/tf_port_impressions.yaml": "experiments/zskd/mnist/synthesize.yaml",
    "experiments/zskd/smooth_impressions.yaml": "experiments/zskd/fashion_mnist/synthesize.yaml",
    "experiments/gat/cpu.yaml": "experiments/gat/mnist/train.yaml",
    "experiments/gat/gat.yaml": "experiments/gat/mnist/train.yaml",
    "experiments/gat/mnist/madry_cnn.yaml": "experiments/gat/mnist/train.yaml",
    "experiments/gat/cifar10/wrn.yaml": "experiments/gat/cifar10/train.yaml",
}

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
    base = OVERLAYS.get(config, config)
    sub, extra = "fit", []
    # the config's own smoke arguments, else (an overlay) its base config's
    found = [(s, e) for p, s, e in SMOKE if fnmatch.fnmatch(config, p)] or \
        [(s, e) for p, s, e in SMOKE if fnmatch.fnmatch(base, p)]
    if found:
        sub, extra = found[0]
    if base != config:
        spec = yaml.safe_load((REPO / base).read_text())
    data_cls = (spec.get("data") or {}).get("class_path", "")
    configs = [f"--config={base}"] + ([f"--config={config}"] if base != config else [])
    args = [sub, *configs, *GENERIC, *DATA_SHRINK.get(data_cls, [])]
    if "batch_size" in _init_params(data_cls) and data_cls != "datamodules.ShapesDataModule":
        args.append("--data.init_args.batch_size=8")
    cli = run_cli(*args, *[os.path.expandvars(e) for e in extra], run_dir=tmp_path / "run")
    assert (tmp_path / "run" / "metrics.json").is_file(), "the run wrote no metrics.json"
    assert cli.trainer is not None


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
