"""Any network is a teacher: outside classes, foreign state_dict layouts and TorchScript, each with its own
input contract, loaded from config alone and driving every distillation and leakage method.

The weights are generated here in the real external layouts: a tanh LeNet-5 (an outside class, 28x28,
[-1, 1] pixels) saved under ``model`` with other layer names (mapped back with ``key_map``), a BatchNorm
LeNet (32x32), a torchvision ResNet-18 saved through DataParallel (``module.`` prefix, ImageNet
normalisation), and a TorchScript LeNet.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

from experiments.examples.outside_nets import BNLeNet5, TanhLeNet5
from lit_modules.teacher import TeacherLoadError, TeacherSpec, export_torchscript, load_teacher
from tests.cli_runs import run_cli
from tests.fakedata import write_cifar, write_mnist_idx

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def _tanh_lenet(root: Path) -> dict:
    torch.manual_seed(0)
    net = TanhLeNet5()
    renamed = {k.replace("c1.", "conv1.").replace("c3.", "conv2.").replace("f5.", "fc1."): v
               for k, v in net.state_dict().items()}
    torch.save({"model": renamed, "epoch": 20}, root / "tanh_lenet.pth")
    return {"weights": str(root / "tanh_lenet.pth"),
            "arch": {"class_path": "experiments.examples.outside_nets.TanhLeNet5"},
            "num_classes": 10, "in_channels": 1, "image_size": 28, "mean": [0.5], "std": [0.5],
            "key_map": {r"^conv1\.": "c1.", r"^conv2\.": "c3.", r"^fc1\.": "f5."}}


def _bn_lenet(root: Path) -> dict:
    torch.manual_seed(1)
    net = BNLeNet5()
    net.train()(torch.rand(16, 1, 32, 32))  # non-trivial running statistics
    torch.save(net.state_dict(), root / "bn_lenet.pt")
    return {"weights": str(root / "bn_lenet.pt"), "arch": {"class_path": "experiments.examples.outside_nets.BNLeNet5"},
            "num_classes": 10, "in_channels": 1, "image_size": 32, "mean": [0.1307], "std": [0.3081]}


def _resnet18(root: Path) -> dict:
    torch.manual_seed(2)
    net = torchvision.models.resnet18(num_classes=10)
    torch.save(torch.nn.DataParallel(net).state_dict(), root / "resnet18_dp.pth")  # keys start with module.
    return {"weights": str(root / "resnet18_dp.pth"),
            "arch": {"class_path": "torchvision.models.resnet18", "init_args": {"num_classes": 10}},
            "num_classes": 10, "in_channels": 3, "image_size": 32, **IMAGENET}


def _torchscript(root: Path) -> dict:
    torch.manual_seed(3)
    torch.jit.save(torch.jit.script(TanhLeNet5().eval()), str(root / "lenet_script.pt"))
    return {"weights": str(root / "lenet_script.pt"), "num_classes": 10, "in_channels": 1, "image_size": 28,
            "mean": [0.5], "std": [0.5]}


TEACHERS = {"tanh_lenet": _tanh_lenet, "bn_lenet": _bn_lenet, "resnet18_dp": _resnet18, "torchscript": _torchscript}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_mnist_idx(root, "MNIST", n_train=60, n_test=40)
    write_cifar(root, 10, n_train=60, n_test=40)
    return root


def _overlay(path: Path, section: str, key: str, spec: dict) -> str:
    path.write_text(yaml.safe_dump({section: {"init_args": {key: spec}}}))
    return f"--config={path}"


SHRINK = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--run.logger=csv"]


@pytest.mark.parametrize("name", sorted(TEACHERS))
def test_outside_teacher_drives_zskd_kd_lra_and_idlg(name: str, tmp_path: Path, data_root: Path) -> None:
    spec = TEACHERS[name](tmp_path)
    rgb = spec["in_channels"] == 3
    ds = "cifar10" if rgb else "mnist"
    teacher_cfg = _overlay(tmp_path / "teacher.yaml", "model", "teacher", spec)
    size = spec["image_size"]

    # ZSKD synthesis: impressions of the teacher's own shape, in pixels
    synth = tmp_path / "synth"
    run_cli("predict", f"--config=experiments/zskd/{ds}/synthesize.yaml", teacher_cfg, *SHRINK,
            "--model.init_args.iterations=3", "--data.init_args.num_impressions=20", "--data.init_args.batch_size=10",
            "--model.init_args.grid_per_class=1", f"--data.init_args.task.init_args.data_dir={data_root}",
            run_dir=synth)
    shards = sorted((synth / "shards").glob("*.pt"))
    images = torch.cat([torch.load(p, weights_only=True)["image"] for p in shards])
    assert images.shape == (20, spec["in_channels"], size, size) and torch.isfinite(images).all()
    m = json.loads((synth / "metrics.json").read_text())
    assert m["synthesis/loss_mean"] < m["synthesis/loss_start_mean"]  # the impressions moved towards their targets

    # KD student on those impressions (resized to the task's 32x32), evaluated on the real test split
    student_cfg = "experiments/zskd/cifar10/student.yaml" if rgb else "experiments/zskd/mnist/student.yaml"
    kd = run_cli("fit", f"--config={student_cfg}", teacher_cfg, *SHRINK, "--trainer.max_epochs=1",
                 f"--data.init_args.pool.init_args.folder={synth / 'shards'}",
                 f"--data.init_args.task.init_args.data_dir={data_root}",
                 "--model.init_args.arch=lenet5_half" if not rgb else "--model.init_args.arch=alexnet_cifar_half",
                 "--model.init_args.image_size=32", run_dir=tmp_path / "kd")
    assert kd.model.teacher.spec.mean == spec["mean"] and "test/acc" in json.loads(
        (tmp_path / "kd" / "metrics.json").read_text())

    # one LRA generator step (+ student step) at the teacher's size; TorchScript exposes no features
    lra_args = ["--model.init_args.batch_size=4", "--model.init_args.student_steps=1", "--model.init_args.latent_dim=8",
                "--model.init_args.generator_kwargs={widths: [8, 4]}", "--data.init_args.steps_per_epoch=1",
                "--data.init_args.eval_batch_size=20", "--trainer.max_epochs=1", f"--model.init_args.image_size={size}",
                f"--data.init_args.task.init_args.image_size={size}",
                f"--data.init_args.task.init_args.data_dir={data_root}",
                "--run.test_after_fit=false"]
    if name == "torchscript":
        lra_args.append("--model.init_args.generator_loss.activation=0")
    lra_cfg = f"experiments/lra/{ds}/lra.yaml"
    lra = run_cli("fit", f"--config={lra_cfg}", teacher_cfg, *SHRINK, *lra_args, run_dir=tmp_path / "lra")
    assert lra.trainer.global_step == 1 and torch.isfinite(torch.tensor(lra.trainer.callback_metrics["train/kd"]))

    # one gradient-leakage trial against the teacher as the victim (the shared gradient of its normalised input):
    # iDLG where its label extraction applies (non-negative features into the last layer), DLG for the tanh nets
    victim_cfg = _overlay(tmp_path / "victim.yaml", "model", "victim", spec)
    method = "dlg" if name in ("tanh_lenet", "torchscript") else "idlg"
    idlg_cfg = "experiments/idlg/cifar100/idlg.yaml" if rgb else "experiments/idlg/mnist/idlg.yaml"
    source = ["--data.init_args.source=datamodules.CIFAR10DataModule"] if rgb else []
    run_cli("predict", f"--config={idlg_cfg}", victim_cfg, *SHRINK, *source, "--model.init_args.iterations=2",
            f"--model.init_args.method={method}",
            "--data.init_args.num_trials=1", "--data.init_args.trials_per_batch=1",
            f"--data.init_args.source.init_args.data_dir={data_root}",
            f"--data.init_args.source.init_args.image_size={size}",
            run_dir=tmp_path / "idlg")
    shard = torch.load(next((tmp_path / "idlg" / "shards").glob("*.pt")), weights_only=True)
    assert shard["reconstruction"].shape == (1, 1, spec["in_channels"], size, size)
    assert torch.isfinite(shard["loss"]).all()


def test_torchscript_teacher_without_features_fails_clearly_for_lra_activation(tmp_path: Path, data_root: Path) -> None:
    spec = _torchscript(tmp_path)
    from cvlab.errors import CvlabError
    from lit_modules.distillation import LRA

    m = LRA(teacher=spec, batch_size=4, student_steps=1, latent_dim=8, generator_kwargs={"widths": [8, 4]})
    with pytest.raises(CvlabError, match="exposes no penultimate features.*TorchScript"):
        m.teacher.features_and_logits(torch.rand(2, 1, 28, 28))


def test_imagenet_normalised_teacher_sees_its_own_statistics_on_another_task(tmp_path: Path, data_root: Path) -> None:
    spec = _resnet18(tmp_path)
    kd = run_cli("fit", "--config=experiments/zskd/cifar10/student_real.yaml",
                 _overlay(tmp_path / "t.yaml", "model", "teacher", spec), *SHRINK, "--trainer.max_epochs=1",
                 "--trainer.limit_train_batches=1", "--run.test_after_fit=false",
                 f"--data.init_args.data_dir={data_root}",
                 run_dir=tmp_path / "kd")
    dm, teacher = kd.datamodule, kd.model.teacher
    assert list(dm.mean) != IMAGENET["mean"]  # the task normalises otherwise
    x = dm.test_x[:8].float() / 255  # pixels, as every datamodule hands them out
    net = torchvision.models.resnet18(num_classes=10)
    state = torch.load(spec["weights"], weights_only=True)
    net.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    by_hand = net.eval()((x - torch.tensor(IMAGENET["mean"]).view(1, 3, 1, 1))
                         / torch.tensor(IMAGENET["std"]).view(1, 3, 1, 1))
    torch.testing.assert_close(teacher(x), by_hand)
    # and the student normalises with the task's statistics, recorded in its checkpoint
    assert kd.model.hparams.mean == [float(m) for m in dm.mean]


def test_torchscript_export_carries_its_contract(tmp_path: Path) -> None:
    net = TanhLeNet5().eval()
    spec = TeacherSpec(weights="", num_classes=10, in_channels=1, image_size=28, mean=[0.5], std=[0.5])
    export_torchscript(net, tmp_path / "t.pt", spec)
    teacher = load_teacher(str(tmp_path / "t.pt"))
    assert (teacher.spec.image_size, teacher.spec.mean, teacher.num_classes) == (28, [0.5], 10)
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(teacher(x), net((x - 0.5) / 0.5))
    # pixels of another size are resized to the teacher's own
    assert teacher(torch.rand(3, 1, 32, 32)).shape == (3, 10)


def test_key_mismatch_names_every_layer_and_suggests_the_closest_zoo_net(tmp_path: Path) -> None:
    from lit_modules.nets import create_net

    state = create_net("lenet5", 10, 1, 32).state_dict()
    state = {k.replace("fc", "head", 1) if k.startswith("fc") else k: v for k, v in state.items()}
    torch.save(state, tmp_path / "w.pt")
    spec = {"weights": str(tmp_path / "w.pt"), "arch": "lenet5", "in_channels": 1, "image_size": 32,
            "normalization": "none"}
    with pytest.raises(TeacherLoadError, match=r"missing fc\.\{weight,bias\} \(2 keys\); "
                       r"unexpected head\.\{weight,bias\} \(2 keys\).*closest zoo architecture is 'lenet5'"):
        load_teacher(spec)
    # the same file loads once the keys are mapped
    t = load_teacher({**spec, "key_map": {r"^head\.(weight|bias)$": r"fc.\1"}})
    assert t.num_classes == 10


def test_pipeline_starts_from_an_existing_teacher_file(tmp_path: Path) -> None:
    from cvlab.errors import CvlabError
    from experiments.pipeline import run_pipeline

    spec = _tanh_lenet(tmp_path)
    pipe = tmp_path / "p.yaml"
    pipe.write_text(yaml.safe_dump({"name": "outside", "stages": [
        {"name": "teacher", "teacher": spec},
        {"name": "synthesize", "command": "predict", "config": ["experiments/zskd/mnist/synthesize.yaml"],
         "args": {"model.init_args.teacher": "${teacher}/checkpoints/last.ckpt"}}]}))
    metrics = run_pipeline(pipe, root=tmp_path / "runs", only=["teacher"])  # the import stage alone, like any stage
    assert metrics["teacher"]["teacher/image_size"] == 28
    folder = next((tmp_path / "runs" / "outside").glob("teacher-*"))
    imported = load_teacher(str(folder / "checkpoints" / "last.ckpt"))  # cvlab's layout, contract inside
    original = load_teacher(spec)
    assert imported.spec.mean == [0.5] and imported.spec.image_size == 28
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(imported(x), original(x))
    # a broken teacher fails at its own stage, before anything after it runs
    bad = dict(spec, key_map={})
    pipe.write_text(yaml.safe_dump({"name": "bad", "stages": [{"name": "teacher", "teacher": bad},
                                   {"name": "s", "command": "fit", "config": ["experiments/quickstart.yaml"]}]}))
    with pytest.raises(CvlabError, match="do not fit experiments.examples.outside_nets.TanhLeNet5: missing c1"):
        run_pipeline(pipe, root=tmp_path / "runs")
    assert not list((tmp_path / "runs" / "bad").glob("s-*"))
