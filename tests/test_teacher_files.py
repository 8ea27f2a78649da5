"""Teachers from anywhere: weight files load exactly when PyTorch's strict ``load_state_dict`` accepts them, the
input contract is complete or refused and checked at import by one forward pass, a pipeline's imported teacher
takes ``--set``, and ``experiments/teachers/evaluate.yaml`` gives the accuracy a hand loop gives, for every
teacher form. All weights are generated here, in the layouts published files have.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import Tensor, nn

from experiments.examples.outside_nets import TanhLeNet5
from lit_modules.nets import create_net
from lit_modules.teacher import TeacherLoadError, TeacherSpec, export_torchscript, load_teacher
from tests.cli_runs import run_cli
from tests.fakedata import save_cvlab_checkpoint, write_cifar, write_mnist_idx

CIFAR = {"mean": [0.4914, 0.4822, 0.4465], "std": [0.247, 0.243, 0.261]}
RESNET20 = {"arch": "resnet20", "num_classes": 10, "in_channels": 3, "image_size": 32, **CIFAR}
TANH = {"arch": {"class_path": "experiments.examples.outside_nets.TanhLeNet5"}, "num_classes": 10, "in_channels": 1,
        "image_size": 28, "mean": [0.5], "std": [0.5]}


def _resnet20() -> nn.Module:
    torch.manual_seed(0)
    net = create_net("resnet20", 10, 3, 32)
    net.train()(torch.rand(8, 3, 32, 32))  # running statistics that differ from the defaults
    return net.eval()


def _as_old_pytorch_saved(state: dict[str, Tensor]) -> collections.OrderedDict:
    """``state`` as PyTorch < 0.4.1 saved it: no ``num_batches_tracked``, BatchNorm's metadata at version 1."""
    old = collections.OrderedDict((k, v) for k, v in state.items() if not k.endswith("num_batches_tracked"))
    old._metadata = collections.OrderedDict(
        (k, {**v, "version": 1} if v.get("version") == 2 else v) for k, v in state._metadata.items())
    return old


def _by_hand(net: nn.Module, x: Tensor, mean: list[float], std: list[float]) -> Tensor:
    return net.eval()((x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1))


# --- weight files as PyTorch reads them -------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["old_dataparallel_th", "old_dataparallel_legacy_tar", "resaved_plain_dict_pth",
                                    "compiled_ddp_nested_pt"])
def test_resnet20_file_without_num_batches_tracked_loads_and_equals_the_class(layout: str, tmp_path: Path) -> None:
    net = _resnet20()
    dp = nn.DataParallel(net).state_dict()  # keys start with module.
    old = _as_old_pytorch_saved(dp)
    assert sum(k.endswith("num_batches_tracked") for k in dp) == 19 and not any("num_batches_tracked" in k for k in old)
    path = tmp_path / {"old_dataparallel_th": "resnet20.th", "old_dataparallel_legacy_tar": "model_best.pth.tar",
                       "resaved_plain_dict_pth": "resnet20.pth", "compiled_ddp_nested_pt": "ckpt.pt"}[layout]
    if layout == "old_dataparallel_th":  # the layout of the public CIFAR ResNet-20 files
        torch.save({"state_dict": old, "best_prec1": 91.7}, path)
    elif layout == "old_dataparallel_legacy_tar":  # and in PyTorch's old (non-zip) format
        torch.save({"state_dict": old, "epoch": 200}, path, _use_new_zipfile_serialization=False)
    elif layout == "resaved_plain_dict_pth":  # a dict comprehension drops the metadata: PyTorch accepts it too
        torch.save({"state_dict": {k: v for k, v in old.items()}}, path)
    else:  # DDP around a compiled model, under {"model": {"state_dict": ...}}
        compiled = collections.OrderedDict((k.replace("module.", "module._orig_mod.", 1), v) for k, v in old.items())
        compiled._metadata = collections.OrderedDict(
            (k.replace("module", "module._orig_mod", 1), v) for k, v in old._metadata.items())
        torch.save({"model": {"state_dict": compiled}, "optimizer": {"lr": torch.tensor(0.1)}}, path)
    teacher = load_teacher({"weights": str(path), **RESNET20})
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), _by_hand(net, x, CIFAR["mean"], CIFAR["std"]), rtol=0, atol=0)
    assert all(int(b) == 0 for k, b in teacher.net.state_dict().items() if k.endswith("num_batches_tracked"))


def test_what_strict_loading_refuses_is_refused_naming_counted_layers(tmp_path: Path) -> None:
    net = _resnet20()
    modern = net.state_dict()  # BatchNorm at version 2: PyTorch refuses it without num_batches_tracked
    for k in [k for k in modern if k.endswith("num_batches_tracked")]:
        del modern[k]
    with pytest.raises(RuntimeError, match="Missing key"):
        create_net("resnet20", 10, 3, 32).load_state_dict(modern)
    torch.save(modern, tmp_path / "w.pt")
    with pytest.raises(TeacherLoadError) as e:
        load_teacher({"weights": str(tmp_path / "w.pt"), **RESNET20})
    line = str(e.value)
    assert "\n" not in line
    assert line.startswith(f"weights in {tmp_path / 'w.pt'} do not fit resnet20: "
                           "missing stem.1.{num_batches_tracked}; ")
    assert "+15 more layers (19 keys); unexpected none; shape mismatches none" in line
    # a shape mismatch and unexpected keys are counted and named too
    state = net.state_dict()
    state["fc.weight"] = torch.zeros(7, 64)
    state["head.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "w2.pt")
    with pytest.raises(TeacherLoadError, match=r"missing none; unexpected head\.\{weight\} \(1 key\); shape mismatches "
                                               r"fc\.weight \(7, 64\) vs \(10, 64\) \(1 key\)"):
        load_teacher({"weights": str(tmp_path / "w2.pt"), **RESNET20})


def test_a_lightning_checkpoint_of_another_project_is_read_as_a_state_dict_with_a_prefix_hint(tmp_path: Path) -> None:
    net = _resnet20()
    state = {f"model.{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"lr": 0.1}, "epoch": 3}, tmp_path / "other.ckpt")
    spec = {"weights": str(tmp_path / "other.ckpt"), **RESNET20}
    with pytest.raises(TeacherLoadError, match=r"every unexpected key starts with 'model\.': set teacher\.key_map "
                                               r"\{'\^model\\\.': ''\}"):
        load_teacher(spec)
    teacher = load_teacher({**spec, "key_map": {r"^model\.": ""}})
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(teacher(x), _by_hand(net, x, CIFAR["mean"], CIFAR["std"]))


def test_safetensors_file(tmp_path: Path) -> None:
    safetensors = pytest.importorskip("safetensors.torch")
    net = _resnet20()
    safetensors.save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "w.safetensors"))
    teacher = load_teacher({"weights": str(tmp_path / "w.safetensors"), **RESNET20})
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(teacher(x), _by_hand(net, x, CIFAR["mean"], CIFAR["std"]))


# --- the contract: complete or refused, checked at import -----------------------------------------------------
def _tanh_file(root: Path, seed: int = 0) -> tuple[nn.Module, str]:
    torch.manual_seed(seed)
    net = TanhLeNet5().eval()
    torch.save(net.state_dict(), root / f"tanh{seed}.pth")
    return net, str(root / f"tanh{seed}.pth")


def test_outside_teacher_without_normalisation_is_refused_in_one_line(tmp_path: Path) -> None:
    net, weights = _tanh_file(tmp_path)
    bare = {k: v for k, v in TANH.items() if k not in ("mean", "std")}
    with pytest.raises(TeacherLoadError) as e:
        load_teacher({"weights": weights, **bare})
    assert "\n" not in str(e.value)
    assert str(e.value).startswith(f"teacher {weights} does not carry its input contract: give teacher.mean and "
                                   "teacher.std (the per-channel normalisation it was trained with")
    assert "or teacher.normalization: none" in str(e.value) and "98.94% with its own, 83.39% without" in str(e.value)
    # TorchScript without cvlab's contract inside: the same
    torch.jit.save(torch.jit.script(net), str(tmp_path / "s.pt"))
    with pytest.raises(TeacherLoadError, match="does not carry its input contract: give teacher.image_size .*, "
                                               "teacher.in_channels, teacher.mean and teacher.std"):
        load_teacher(str(tmp_path / "s.pt"))
    # an explicit normalization: none is a complete contract (raw [0, 1] pixels)
    x = torch.rand(3, 1, 28, 28)
    for path in (weights, str(tmp_path / "s.pt")):
        t = load_teacher({"weights": path, **bare, "normalization": "none"})
        torch.testing.assert_close(t(x), net(x))
    with pytest.raises(TeacherLoadError, match="normalization none and teacher.mean/std are both given; keep one"):
        load_teacher({"weights": weights, **TANH, "normalization": "none"})
    with pytest.raises(TeacherLoadError, match="teacher.mean is given without teacher.std; give both"):
        load_teacher({"weights": weights, **bare, "mean": [0.5]})
    # cvlab's own files carry theirs: a checkpoint, and a TorchScript export
    contract = {k: v for k, v in TANH.items() if k != "arch"}
    export_torchscript(net, tmp_path / "e.pt", TeacherSpec(weights="", **contract))
    torch.testing.assert_close(load_teacher(str(tmp_path / "e.pt"))(x), net((x - 0.5) / 0.5))


class LeNetOtherForward(TanhLeNet5):
    """The tanh LeNet's layers (its weights load) with a forward that does not fit them."""

    def forward(self, x: Tensor) -> Tensor:
        return self.f7(self.f6(self.f5(self.c3(self.c1(x)))))


@pytest.mark.parametrize(("change", "message"), [
    ({"in_channels": 3}, ["the contract says in_channels 3 but the network's first convolution takes 1-channel images; "
                          "change teacher.in_channels to 1 (the contract value, not the teacher)"]),
    ({"image_size": 32}, ["does not run on 1x32x32 images (RuntimeError: ", "(2x576 and 400x120)) but runs on 1x28x28; "
                          "change teacher.image_size to the size it was trained at (28?)"]),
    ({"num_classes": 100}, ["shape mismatches f7.weight (10, 84) vs (100, 84); f7.bias (10,) vs (100,) (2 keys); the "
                            "file's output layer has 10 classes: change teacher.num_classes (the contract says 100)"]),
    ({"num_classes": 100, "weights": "torchscript"}, ["the contract says num_classes 100 but the network gives 10 "
                                                      "logits; change teacher.num_classes to 10"]),
    ({"arch": {"class_path": "tests.test_teacher_files.LeNetOtherForward"}},
     ["(tests.test_teacher_files.LeNetOtherForward) fails on a blank batch of its contract (1x28x28): RuntimeError: ",
      "mat1 and mat2 shapes cannot be multiplied",
      "; check that teacher.arch is the class these weights were saved from"]),
])
def test_the_whole_contract_is_checked_at_import_naming_the_key_to_change(change: dict, message: list[str],
                                                                          tmp_path: Path) -> None:
    net, weights = _tanh_file(tmp_path)
    if change.get("weights") == "torchscript":  # a network that is not built from the contract
        weights = change["weights"] = str(tmp_path / "script.pt")
        torch.jit.save(torch.jit.script(net), weights)
    with pytest.raises(TeacherLoadError) as e:
        load_teacher({"weights": weights, **TANH, **change})
    assert all(part in str(e.value) for part in message), str(e.value)
    assert str(e.value).startswith((f"teacher {weights} (", f"weights in {weights} ")) and "\n" not in str(e.value)


# --- a pipeline's imported teacher takes --set ----------------------------------------------------------------
def test_set_changes_the_imported_teacher_of_a_pipeline(tmp_path: Path) -> None:
    from cvlab.errors import CvlabError
    from experiments.pipeline import run_pipeline

    _, first = _tanh_file(tmp_path, seed=0)
    net, second = _tanh_file(tmp_path, seed=1)
    pipe = tmp_path / "p.yaml"
    pipe.write_text(yaml.safe_dump({"name": "p", "stages": [
        {"name": "teacher", "teacher": {"weights": first, **TANH}},
        {"name": "s", "command": "predict", "config": ["experiments/zskd/mnist/synthesize.yaml"],
         "args": {"model.init_args.teacher": "${teacher}/checkpoints/last.ckpt"}}]}))
    runs = tmp_path / "runs"

    def imported(sets: list[str]) -> dict[str, Tensor]:
        before = set((runs / "p").glob("teacher-*"))
        run_pipeline(pipe, root=runs, sets=sets, only=["teacher"])
        new = set((runs / "p").glob("teacher-*")) - before
        folder = new.pop() if new else max(before, key=lambda f: f.stat().st_mtime)
        state = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        return {k.removeprefix("net."): v for k, v in state.items()}

    as_given = imported([])
    swapped = imported([f"teacher.weights={second}", "*.trainer.max_epochs=1"])
    for k, v in net.state_dict().items():  # the loaded weights are the second file's
        torch.testing.assert_close(swapped[k], v, rtol=0, atol=0)
    assert not torch.equal(as_given["c1.weight"], swapped["c1.weight"])
    assert len(list((runs / "p").glob("teacher-*"))) == 2  # a new folder, the first kept
    # nested keys and values as YAML, like the CLI's
    run_pipeline(pipe, root=runs, sets=["teacher.mean=[0.25]", "teacher.arch.init_args.num_classes=10"],
                 only=["teacher"])
    stage = json.loads(max((runs / "p").glob("teacher-*/stage.json"), key=lambda f: f.stat().st_mtime).read_text())
    assert stage["contract"]["mean"] == [0.25] and stage["teacher"]["arch"]["init_args"] == {"num_classes": 10}
    with pytest.raises(CvlabError, match="'weight' is not a key of the imported teacher of stage 'teacher'; did you "
                                         "mean 'weights'"):
        run_pipeline(pipe, root=runs, sets=["teacher.weight=x.pth"])


def test_seeds_run_the_imported_teacher_with_its_set_keys(tmp_path: Path) -> None:
    from experiments.pipeline import run_seeds

    _, first = _tanh_file(tmp_path, seed=0)
    net, second = _tanh_file(tmp_path, seed=1)
    pipe = tmp_path / "p.yaml"
    stages = [{"name": "teacher", "teacher": {"weights": first, **TANH}}]
    pipe.write_text(yaml.safe_dump({"name": "p", "stages": stages}))
    run_seeds(pipe, [0, 1], root=tmp_path / "runs", sets=[f"teacher.weights={second}"])
    for seed in (0, 1):
        folder = next((tmp_path / "runs" / "p" / f"seed-{seed}").glob("teacher-*"))
        state = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        torch.testing.assert_close(state["net.c1.weight"], net.c1.weight, rtol=0, atol=0)


# --- evaluate a teacher ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_mnist_idx(root, "MNIST", n_train=30, n_test=60)
    write_cifar(root, 10, n_train=30, n_test=20)
    return root


def _teacher_forms(root: Path) -> dict[str, tuple[object, nn.Module, list[float] | None, list[float] | None]]:
    """``{form: (teacher config, its network, mean, std)}`` for the three teacher forms, all 28x28 MNIST nets."""
    from lit_modules.classifier import ClassifierModule

    torch.manual_seed(0)
    cvlab = ClassifierModule(arch="lenet5", num_classes=10, in_channels=1, image_size=28, mean=[0.1307], std=[0.3081])
    save_cvlab_checkpoint(cvlab, root / "cvlab.ckpt")
    tanh, weights = _tanh_file(root, seed=2)
    torch.manual_seed(3)
    scripted = TanhLeNet5().eval()
    torch.jit.save(torch.jit.script(scripted), str(root / "script.pt"))
    contract = {k: v for k, v in TANH.items() if k != "arch"}
    return {"cvlab_checkpoint": (str(root / "cvlab.ckpt"), cvlab.net, [0.1307], [0.3081]),
            "class_path_and_weights": ({"weights": weights, **TANH}, tanh, [0.5], [0.5]),
            "torchscript": ({"weights": str(root / "script.pt"), **contract, "mean": [0.2], "std": [0.4]}, scripted,
                            [0.2], [0.4])}


@pytest.mark.parametrize("form", ["cvlab_checkpoint", "class_path_and_weights", "torchscript"])
def test_evaluate_gives_the_accuracy_of_a_hand_loop(form: str, mnist_root: Path, tmp_path: Path) -> None:
    from datamodules import MNISTDataModule

    teacher, net, mean, std = _teacher_forms(tmp_path)[form]
    overlay = tmp_path / "teacher.yaml"
    overlay.write_text(yaml.safe_dump({"model": {"init_args": {"teacher": teacher}}}))
    run_cli("test", "--config=experiments/teachers/evaluate.yaml", f"--config={overlay}",
            f"--data.init_args.data_dir={mnist_root}", "--data.init_args.batch_size=16", "--run.logger=csv",
            "--trainer.enable_progress_bar=false", run_dir=tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    dm = MNISTDataModule(data_dir=str(mnist_root))
    x, y = dm.load_split(train=False)  # uint8 (60, 1, 28, 28), labels (60,)
    with torch.no_grad():
        pred = _by_hand(net, x.float() / 255, mean, std).argmax(-1)
    assert metrics["test/images"] == 60
    assert metrics["test/acc"] == pytest.approx(pred.eq(y).float().mean().item(), abs=1e-6)
    for k in range(10):
        assert metrics[f"test/acc_class/{k}"] == pytest.approx(pred[y == k].eq(k).float().mean().item(), abs=1e-6)


def test_evaluate_checks_the_contract_against_the_data_before_any_batch(mnist_root: Path, tmp_path: Path) -> None:
    from cvlab.errors import CvlabError

    teacher = _teacher_forms(tmp_path)["class_path_and_weights"][0]
    overlay = tmp_path / "teacher.yaml"
    overlay.write_text(yaml.safe_dump({"model": {"init_args": {"teacher": teacher}}}))
    args = ["test", "--config=experiments/teachers/evaluate.yaml", f"--config={overlay}",
            f"--data.init_args.data_dir={mnist_root}", "--run.logger=csv", "--trainer.enable_progress_bar=false"]
    with pytest.raises(CvlabError, match=r"takes 28x28 images but MNISTDataModule gives 32x32; set "
                                         r"--data.init_args.image_size 28, or let the teacher resize them"):
        run_cli(*args, "--data.init_args.image_size=32", run_dir=tmp_path / "r1")
    with pytest.raises(CvlabError, match="disagree on in_channels: 1 vs 3"):
        run_cli(*args, "--data=datamodules.CIFAR10DataModule", f"--data.init_args.data_dir={mnist_root}",
                run_dir=tmp_path / "r2")
    run_cli(*args, "--data.init_args.image_size=32", "--model.init_args.resize=true", run_dir=tmp_path / "r3")
    assert json.loads((tmp_path / "r3" / "metrics.json").read_text())["test/images"] == 60
