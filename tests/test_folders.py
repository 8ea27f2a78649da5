"""Class-folder datamodules (ImageNet layout): reading, crops against torchvision, clear errors, and the
severity report on ImageNet's layout under a WordNet hierarchy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.transforms import v2

from datamodules.errors import CvlabError, DatasetCorruptError, DatasetNotFoundError
from datamodules.folders import (
    ImageFolderDataModule,
    ImageNetDataModule,
    center_crop,
    random_resized_crop,
    scan_class_folders,
)
from tests.fakedata import save_cvlab_checkpoint, write_data_noun, write_image_folders

WNIDS = ["n02084071", "n02121620", "n09999999"]  # dog, cat, Einstein in tests.fakedata.DATA_NOUN


def test_scan_sorted_classes_and_files(tmp_path: Path) -> None:
    write_image_folders(tmp_path, ["b", "a", "c"], {"val": 2}, suffix=".png")
    (tmp_path / "val" / "a" / "notes.txt").write_text("not an image")
    classes, files, labels = scan_class_folders(tmp_path / "val")
    assert classes == ["a", "b", "c"]
    assert [f.parent.name for f in files] == ["a", "a", "b", "b", "c", "c"] and labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_datamodule_splits_batches_and_class_names(tmp_path: Path) -> None:
    write_image_folders(tmp_path / "imagenet", WNIDS, {"train": 4, "val": 2})
    dm = ImageNetDataModule(data_dir=str(tmp_path), num_classes=3, image_size=32, val_size=3, batch_size=5,
                            num_workers=0)
    dm.setup("fit")
    assert dm.class_names == WNIDS
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (9, 3, 6)
    # the validation images come out of the training folder, never the test folder
    assert not set(dm.val_set.files) & set(dm.train_set.files) and all("train" in f.parts for f in dm.val_set.files)
    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.uint8 and x.shape == (5, 3, 32, 32) and y.dtype == torch.long
    xt, yt = next(iter(dm.test_dataloader()))
    assert xt.shape == (5, 3, 32, 32) and yt.tolist() == [0, 0, 1, 1, 2]
    xf, _ = dm.on_after_batch_transfer((xt, yt), 0)
    assert xf.dtype == torch.float32 and 0 <= xf.min() and xf.max() <= 1


def test_test_only_run_needs_no_train_folder(tmp_path: Path) -> None:
    write_image_folders(tmp_path, WNIDS, {"val": 1})
    dm = ImageNetDataModule(root=str(tmp_path), num_classes=3, image_size=16, num_workers=0)
    dm.setup("test")
    assert len(dm.test_set) == 3 and dm.class_names == WNIDS
    with pytest.raises(DatasetNotFoundError, match=r"no folder .*train"):
        dm.setup("fit")


def test_center_crop_matches_torchvision() -> None:
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8, generator=g)
    ours = center_crop(img, 32, 37)
    ref = v2.CenterCrop(32)(v2.Resize(37, antialias=True)(img))
    assert ours.shape == ref.shape == (3, 32, 32)
    assert (ours.int() - ref.int()).abs().max() <= 2  # both antialiased bilinear; rounding differs by a level or two
    # no resize needed: the exact central pixels
    sq = torch.randint(0, 256, (3, 37, 37), dtype=torch.uint8, generator=g)
    assert torch.equal(center_crop(sq, 33, 37), sq[:, 2:35, 2:35])


def test_random_resized_crop_size_and_seed() -> None:
    img = torch.randint(0, 256, (3, 60, 40), dtype=torch.uint8)
    a = random_resized_crop(img, 24, torch.Generator().manual_seed(1))
    b = random_resized_crop(img, 24, torch.Generator().manual_seed(1))
    c = random_resized_crop(img, 24, torch.Generator().manual_seed(2))
    assert a.shape == (3, 24, 24) and a.dtype == torch.uint8 and torch.equal(a, b) and not torch.equal(a, c)


def test_bad_layouts_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="no folder .*imagenet/val"):
        ImageNetDataModule(data_dir=str(tmp_path), num_workers=0).setup("test")
    write_image_folders(tmp_path / "x", ["a", "b"], {"train": 1, "val": 1})
    with pytest.raises(DatasetCorruptError, match="2 class folders, ImageNetDataModule expects 1000"):
        ImageNetDataModule(root=str(tmp_path / "x"), num_workers=0).setup("test")
    write_image_folders(tmp_path / "x", ["c"], {"train": 1})
    with pytest.raises(DatasetCorruptError, match="other class folders than the other split"):
        ImageFolderDataModule(root=str(tmp_path / "x"), num_classes=2, num_workers=0).setup("fit")
    (tmp_path / "e" / "val" / "a").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="no images"):
        ImageFolderDataModule(root=str(tmp_path / "e"), num_classes=1, num_workers=0).setup("test")
    with pytest.raises(DatasetNotFoundError, match="cannot download"):
        ImageNetDataModule(download=True)
    with pytest.raises(CvlabError, match="augment 'crop'"):
        ImageNetDataModule(augment="crop")


def test_undecodable_image_names_the_file(tmp_path: Path) -> None:
    write_image_folders(tmp_path, ["a"], {"val": 1})
    bad = tmp_path / "val" / "a" / "broken.JPEG"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    dm = ImageFolderDataModule(root=str(tmp_path), num_classes=1, num_workers=0, batch_size=2, image_size=16)
    with pytest.raises(DatasetCorruptError, match="cannot decode image .*broken.JPEG"):
        next(iter(dm.test_dataloader()))


def test_severity_report_on_imagenet_layout_with_wordnet(tmp_path: Path) -> None:
    """The ImageNet report config end to end: wnids from the folders, WordNet tree from data.noun."""
    import csv

    from lit_modules.classifier import ClassifierModule
    from tests.cli_runs import run_cli

    write_image_folders(tmp_path / "data" / "imagenet", WNIDS, {"val": 4})
    noun = write_data_noun(tmp_path / "data.noun")
    m = ClassifierModule(arch="lenet5", num_classes=3, in_channels=3, image_size=32)
    save_cvlab_checkpoint(m, tmp_path / "net.ckpt")
    run = tmp_path / "run"
    run_cli("test", "--config=experiments/severity/imagenet/report.yaml",
            f"--model.init_args.models={{n: {tmp_path / 'net.ckpt'}}}",
            f"--model.init_args.hierarchy=wordnet:{noun}", "--model.init_args.eps=[0.1]", "--model.init_args.steps=2",
            f"--data.init_args.data_dir={tmp_path / 'data'}", "--data.init_args.num_classes=3",
            "--data.init_args.image_size=32", "--data.init_args.num_workers=0", "--data.init_args.batch_size=6",
            "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false", "--run.logger=csv", run_dir=run)
    rows = list(csv.DictReader(open(run / "severity_report.csv")))
    assert len(rows) == 5 and all(int(r["images"]) == 12 for r in rows)
    # dog/cat share 'object' (LCA height 1), Einstein meets them at the root (height 3): a 4-bin histogram
    assert all(len(r["hist_lca"].split()) == 4 for r in rows)
    assert "largest LCA height 3" in (run / "severity_report.md").read_text()


def test_wordnet_hierarchy_without_class_names_says_how(tmp_path: Path) -> None:
    from lit_modules.robustness.severity_report import SeverityReport

    noun = write_data_noun(tmp_path / "data.noun")
    report = SeverityReport(models={"n": "x.ckpt"}, hierarchy=f"wordnet:{noun}")
    assert report.hier is None  # built from the datamodule's class names when the run starts
    with pytest.raises(CvlabError, match="needs the class names"):
        report.setup("test")


def test_inaturalist2019_splits_from_json(tmp_path: Path) -> None:
    from datamodules.folders import INaturalist2019DataModule
    from tests.fakedata import write_inaturalist2019

    counts = {0: (6, 1), 1: (3, 1), 2: (1, 1)}  # a long tail
    ref = write_inaturalist2019(tmp_path / "inaturalist", counts)
    dm = INaturalist2019DataModule(data_dir=str(tmp_path), num_classes=3, image_size=16, val_size=2, batch_size=4,
                                   num_workers=0)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (8, 2, 3)
    assert sorted(dm.train_set.labels.tolist() + dm.val_set.labels.tolist()) == sorted(ref["train"])
    assert dm.test_set.labels.tolist() == ref["val"] and all("val_" in f.name for f in dm.test_set.files)
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (3, 3, 16, 16) and y.tolist() == [0, 1, 2]


def test_inaturalist2019_errors(tmp_path: Path) -> None:
    import json

    from datamodules.folders import INaturalist2019DataModule
    from tests.fakedata import write_inaturalist2019

    with pytest.raises(DatasetNotFoundError, match="iNaturalist 2019 not found.*train2019.json"):
        INaturalist2019DataModule(data_dir=str(tmp_path), num_workers=0).setup("fit")
    write_inaturalist2019(tmp_path / "inaturalist", {0: (2, 1), 1: (2, 1)})
    ann = tmp_path / "inaturalist" / "val2019.json"
    meta = json.loads(ann.read_text())
    meta["annotations"][0]["category_id"] = 1  # an image filed under category 0 labelled 1
    ann.write_text(json.dumps(meta))
    with pytest.raises(DatasetCorruptError, match="category 1.*is not in .*under category 0"):
        INaturalist2019DataModule(data_dir=str(tmp_path), num_classes=2, num_workers=0).setup("test")
    ann.write_text("{\"images\": []")
    with pytest.raises(DatasetCorruptError, match="is not an iNaturalist annotation file"):
        INaturalist2019DataModule(data_dir=str(tmp_path), num_classes=2, num_workers=0).setup("test")
