"""The arbitrary transfer sets selection stage (WACV 2021): a worked answer on a hand-made teacher, the student's
datamodule reading the selection back, a selection from another pool refused, 2 processes equal to 1, and no
datamodule that runs a network."""

from __future__ import annotations

import ast
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import Tensor

from datamodules.transfer_sets import (
    SELECTION_FILE,
    NoisePool,
    TransferPool,
    TransferSetDataModule,
    TransferSetError,
    read_selection,
)
from lit_modules.distillation import ArbitraryTransferSetSelection
from lit_modules.distillation.transfer_set_selection import balance_by_confidence, gather_by_index, selection_stats
from tests.test_methods_learn import SIZE, K, StripesDataModule, save_stripe_teacher

REPO = Path(__file__).resolve().parents[1]

# the worked example: pool image i lights band PRED[i] at brightness v = CONF[i] / 10 (all else 0). The stripe
# teacher's logits are 40 (0.75 v) for that band and -10 v for the others, so it predicts PRED[i] with a
# confidence that rises with v (unsaturated: logit gaps of at most 3.8). Two per class, most confident first:
# class 0 keeps .95 (5) and .9 (0), class 1 .7 (4) and .6 (7), class 2 .8 (3) and .4 (9); class 3 is never
# predicted and keeps none.
PRED = [0, 1, 0, 2, 1, 0, 2, 1, 0, 2]
CONF = [0.9, 0.5, 0.3, 0.8, 0.7, 0.95, 0.1, 0.6, 0.2, 0.4]
KEEP = [0, 3, 4, 5, 7, 9]


class BandPool(TransferPool):
    """The worked example's 10 images (uint8 ``(10, 1, 16, 16)``); ``bump`` brightens image 0 (another pool)."""

    def __init__(self, bump: int = 0) -> None:
        self.bump = bump

    def load(self, task, seed: int) -> tuple[Tensor, Tensor]:
        x = torch.zeros(len(PRED), 1, SIZE, SIZE)
        rows = torch.arange(SIZE) // (SIZE // K)  # (H,): row -> band
        for i, (k, v) in enumerate(zip(PRED, CONF)):
            x[i, 0, rows == k] = v / 10
        x = (x * 255).round().to(torch.uint8)
        x[0, 0, 0, 0] += self.bump
        return x, torch.full((len(PRED),), -1)


def _select(tmp_path: Path, pool: TransferPool, per_class: int = 2, **dm_kw) -> Path:
    """Run the selection stage as ``cvlab predict`` would: one process, the run folder ``tmp_path/select``."""
    model = ArbitraryTransferSetSelection(teacher=save_stripe_teacher(tmp_path / "t.pt"), per_class=per_class)
    dm = TransferSetDataModule(StripesDataModule(val_size=40), pool, **dm_kw)
    root = tmp_path / "select"
    trainer = L.Trainer(logger=False, default_root_dir=root, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", devices=1)
    trainer.predict(model, datamodule=dm, return_predictions=False)
    return root


def test_balancing_keeps_the_most_confident_equal_number_per_class() -> None:
    pred, conf = torch.tensor(PRED), torch.tensor(CONF)
    keep = balance_by_confidence(pred, conf, 3, per_class=2)
    assert keep.tolist() == KEEP
    assert selection_stats(pred, keep, 4) == {
        "data/pool_size": 10.0, "data/transfer_size": 6.0, "data/pool_classes_predicted": 3.0,
        "data/transfer_min_per_class": 0.0, "data/transfer_max_per_class": 2.0}


def test_selection_stage_on_a_hand_made_teacher_writes_the_worked_answer(tmp_path: Path) -> None:
    import json

    root = _select(tmp_path, BandPool(), batch_size=3)  # 4 predict batches, the last one short
    r = torch.load(root / SELECTION_FILE, weights_only=True)
    assert r["index"].tolist() == KEEP and r["pred"].tolist() == [PRED[i] for i in KEEP]
    conf = r["conf"]
    assert conf.shape == (6,) and (conf > 0.5).all() and conf[KEEP.index(5)] > conf[KEEP.index(0)]  # .95 > .9
    assert r["pool_size"] == 10 and r["per_class"] == 2 and r["num_classes"] == K
    m = json.loads((root / "metrics.json").read_text())
    assert m["data/transfer_size"] == 6 and m["data/pool_classes_predicted"] == 3
    assert m["data/transfer_min_per_class"] == 0 and m["data/transfer_max_per_class"] == 2


def test_the_student_datamodule_reads_the_selection_back_in_pool_order(tmp_path: Path) -> None:
    path = _select(tmp_path, BandPool()) / SELECTION_FILE
    dm = TransferSetDataModule(StripesDataModule(val_size=40), BandPool(), balance="confidence", selection=str(path))
    dm.setup("fit")
    pool, _ = BandPool().load(None, 0)
    assert torch.equal(dm.train_x, pool[KEEP]) and dm.train_y.tolist() == [-1] * 6
    with pytest.raises(TransferSetError, match="drop data.init_args.selection"):
        dm.predict_dataloader()


def test_a_selection_from_another_pool_or_a_bad_file_is_refused(tmp_path: Path) -> None:
    path = _select(tmp_path, BandPool()) / SELECTION_FILE
    task = StripesDataModule(val_size=40)
    for pool in (BandPool(bump=1), NoisePool("uniform", 10)):  # same size, other images
        with pytest.raises(TransferSetError, match="another pool"):
            TransferSetDataModule(task, pool, balance="confidence", selection=str(path)).setup("fit")
    with pytest.raises(TransferSetError, match="not found.*run the selection stage"):
        read_selection(tmp_path / "none.pt", 10, "x")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(path.read_bytes()[:100])
    with pytest.raises(TransferSetError, match="truncated"):
        read_selection(bad, 10, "x")
    torch.save({"index": torch.arange(3)}, bad)
    with pytest.raises(TransferSetError, match="not a transfer-set selection"):
        read_selection(bad, 10, "x")


def test_balance_and_selection_must_agree() -> None:
    task = StripesDataModule()
    with pytest.raises(TransferSetError, match="balance: confidence trains on a selection"):
        TransferSetDataModule(task, NoisePool(), balance="confidence")
    with pytest.raises(TransferSetError, match="balance is none"):
        TransferSetDataModule(task, NoisePool(), selection="s.pt")
    with pytest.raises(Exception, match="per_class"):
        ArbitraryTransferSetSelection(teacher="t.pt", per_class=0)


def test_a_predict_run_that_skips_part_of_the_pool_writes_no_selection(tmp_path: Path) -> None:
    model = ArbitraryTransferSetSelection(teacher=save_stripe_teacher(tmp_path / "t.pt"), per_class=2)
    dm = TransferSetDataModule(StripesDataModule(val_size=40), BandPool(), batch_size=3)
    trainer = L.Trainer(logger=False, default_root_dir=tmp_path, enable_progress_bar=False, accelerator="cpu",
                        devices=1, limit_predict_batches=2)
    with pytest.raises(Exception, match="saw 6 of the pool's 10"):
        trainer.predict(model, datamodule=dm, return_predictions=False)
    assert not (tmp_path / SELECTION_FILE).exists()


# --- two processes --------------------------------------------------------------------------------------------
def _gather_worker(rank: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        def all_gather(t: Tensor) -> Tensor:
            out = [torch.empty_like(t) for _ in range(2)]
            dist.all_gather(out, t)
            return torch.stack(out)

        index = torch.arange(rank, 7, 2)  # uneven shares, as predict's sampler deals them: 4 and 3
        pred, conf = gather_by_index(index, [index * 10, index.float() / 10], 7, all_gather)
        if rank == 0:
            torch.save({"pred": pred, "conf": conf}, out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_gather_over_two_processes_puts_every_share_in_pool_order(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    out = tmp_path / "out.pt"
    mp.spawn(_gather_worker, args=(str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    r = torch.load(out, weights_only=True)
    assert r["pred"].tolist() == [0, 10, 20, 30, 40, 50, 60]
    assert torch.allclose(r["conf"], torch.arange(7) / 10)


@pytest.mark.slow
def test_selection_stage_on_two_processes_equals_one(tmp_path: Path) -> None:
    from tests.cli_runs import read_metrics, run_cli_subprocess
    from tests.test_zskd import save_teacher

    teacher = save_teacher(tmp_path / "t.ckpt", arch_kwargs={"width": 8, "depth": 2, "norm": "instancenorm"})
    common = ["predict", "--config=experiments/transfer_sets/shapes/select.yaml",
              f"--model.init_args.teacher={teacher}", "--model.init_args.per_class=20",
              "--data.init_args.task.init_args.num_train=100", "--data.init_args.task.init_args.num_test=50",
              "--data.init_args.pool.init_args.size=301",
              "--data.init_args.batch_size=40", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
              "--run.logger=csv"]
    runs = {}
    for name, extra in (("one", []), ("two", ["--trainer.devices=2", "--trainer.strategy=ddp"])):
        runs[name] = tmp_path / name
        r = run_cli_subprocess(*common, *extra, f"--run.dir={runs[name]}")
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = (torch.load(runs[n] / SELECTION_FILE, weights_only=True) for n in ("one", "two"))
    assert a["index"].numel() > 0 and torch.equal(a["index"], b["index"]) and torch.equal(a["pred"], b["pred"])
    torch.testing.assert_close(a["conf"], b["conf"])
    assert a["pool_fingerprint"] == b["pool_fingerprint"] and a["pool_size"] == b["pool_size"] == 301
    ma, mb = read_metrics(runs["one"]), read_metrics(runs["two"])
    assert {k: v for k, v in ma.items() if k.startswith("data/")} == {k: v for k, v in mb.items()
                                                                      if k.startswith("data/")}


# --- layering: a datamodule never runs a network ----------------------------------------------------------------
def _network_imports(path: Path) -> list[str]:
    """``torch.nn`` modules (other than ``torch.nn.functional``) a file imports."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names]
        bad += [n for n in names if (n == "torch.nn" or n.startswith("torch.nn."))
                and not n.startswith("torch.nn.functional")]
    return bad


def test_no_datamodule_imports_network_modules_or_takes_a_network() -> None:
    files = sorted((REPO / "datamodules").rglob("*.py"))
    assert not {str(f): m for f in files if (m := _network_imports(f))}
    takes = {f"{f.name}:{fn.name}" for f in files for fn in ast.walk(ast.parse(f.read_text()))
             if isinstance(fn, ast.FunctionDef)
             and {a.arg for a in fn.args.args + fn.args.kwonlyargs} & {"teacher", "net", "network", "model"}}
    assert not takes, f"datamodule functions that take a network: {sorted(takes)}"


def test_the_network_import_check_can_fail(tmp_path: Path) -> None:
    f = tmp_path / "x.py"
    f.write_text("import torch.nn.functional as F\nfrom torch import nn\nfrom torch.nn import Module\n")
    assert _network_imports(f) == ["torch.nn", "torch.nn.Module"]
