"""Context vs object volumes (Lost in Context): worked answers on hand-built maps and masks, the filters, the
prediction shift, and the torchmetrics equal on 2 processes and 1."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cvlab.errors import CvlabError
from lit_modules.explanation.volume import (
    GROUPS,
    VOLUME_FIELDS,
    ContextVolume,
    VariantAccuracy,
    attribution_volumes,
    background_filter,
    background_share,
    correct_in_every_variant,
    normalize_attribution,
    prediction_shift,
)

# image 0: raw [[1, 3], [0, -2]] -> ReLU [1, 3, 0, 0] -> minmax [1/3, 1, 0, 0]; object = the top-right pixel
# image 1: raw [[2, -1], [0, 4]] -> ReLU [2, 0, 0, 4] -> minmax [1/2, 0, 0, 1]; object = the diagonal
RAW = torch.tensor([[[1.0, 3.0], [0.0, -2.0]], [[2.0, -1.0], [0.0, 4.0]]])
MASK = torch.tensor([[[0, 1], [0, 0]], [[1, 0], [0, 1]]], dtype=torch.bool)


def test_normalize_is_minmax_of_relu() -> None:
    a = normalize_attribution(RAW)
    torch.testing.assert_close(a, torch.tensor([[[1 / 3, 1.0], [0.0, 0.0]], [[0.5, 0.0], [0.0, 1.0]]]))
    # a flat or all-negative map has no positive spread: all zero, never NaN
    flat = normalize_attribution(torch.stack([torch.full((2, 2), 3.0), -torch.ones(2, 2)]))
    assert torch.equal(flat, torch.zeros(2, 2, 2))


def test_volumes_worked_answer() -> None:
    v = attribution_volumes(normalize_attribution(RAW), MASK)
    exp = {
        # image 0: O = 1, C = 1/3; object area 1 of 4 pixels; non-zero pixels: 2 (1 inside)
        # image 1: O = 1.5, C = 0; object area 2; non-zero pixels: 2 (both inside)
        "object_volume": [1.0, 1.5],
        "context_volume": [1 / 3, 0.0],
        "object_share": [0.75, 1.0],
        "object_density": [1.0, 0.75],
        "context_density": [1 / 9, 0.0],
        "object_per_nonzero": [1.0, 0.75],
        "context_per_nonzero": [1 / 3, 0.0],  # image 1 has no non-zero context pixel: 0, not NaN
        "nonzero_inside": [0.5, 1.0],
        "uniform_object_share": [0.25, 0.5],
        "uniform_density": [1 / 3, 1.5 / 4],
    }
    assert set(exp) == set(VOLUME_FIELDS)
    for k, want in exp.items():
        torch.testing.assert_close(getattr(v, k), torch.tensor(want, dtype=torch.float64), msg=k)


def test_uniform_map_matches_the_uniform_baseline() -> None:
    # A = 1 everywhere (a uniform map): its shares equal the baseline exactly
    a = torch.ones(1, 4, 4)
    m = torch.zeros(1, 4, 4, dtype=torch.bool)
    m[0, :2, :2] = True
    v = attribution_volumes(a, m)
    torch.testing.assert_close(v.object_share, v.uniform_object_share)
    torch.testing.assert_close(v.object_density, v.uniform_density)
    torch.testing.assert_close(v.context_density, v.uniform_density)


def test_background_filter_is_strictly_more_than_30_percent() -> None:
    m = torch.zeros(3, 1, 10, 10, dtype=torch.bool)
    m[0, :, :7] = True  # 70% object: background exactly 30% -> dropped
    m[1, :, :6] = True  # 60% object -> kept
    torch.testing.assert_close(background_share(m), torch.tensor([0.3, 0.4, 1.0], dtype=torch.float64))
    assert background_filter(m).tolist() == [False, True, True]
    with pytest.raises(CvlabError, match="threshold"):
        background_filter(m, 1.5)


def test_correct_in_every_variant() -> None:
    preds = torch.tensor([[1, 1, 1], [2, 2, 0], [0, 0, 0]])
    assert correct_in_every_variant(preds, torch.tensor([1, 2, 1])).tolist() == [True, False, False]


def test_prediction_shift_worked_answer() -> None:
    p1 = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    p2 = torch.tensor([[0.0, 0.0, 1.0], [0.2, 0.3, 0.5]])
    # CDFs [1, 1, 1] vs [0, 0, 1]: |1| + |1| + 0 = 2 (= K - 1, the largest); equal vectors: 0
    torch.testing.assert_close(prediction_shift(p1, p2), torch.tensor([2.0, 0.0], dtype=torch.float64))
    with pytest.raises(CvlabError, match="differ in shape"):
        prediction_shift(p1, p2[:, :2])


def _study_inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    maps = normalize_attribution(torch.randn(10 * 3, 6, 6, generator=g)).view(10, 3, 6, 6)
    masks = torch.rand(10, 1, 6, 6, generator=g) > 0.6
    correct = torch.rand(10, generator=g) > 0.4
    keep = torch.rand(10, generator=g) > 0.2
    preds = torch.randint(0, 4, (10, 3), generator=g)
    labels = torch.randint(0, 4, (10,), generator=g)
    probs = torch.softmax(torch.randn(10, 3, 4, generator=g), -1)
    return maps, masks, correct, keep, preds, labels, probs


def _check_metrics(vol: dict[str, torch.Tensor], acc: dict[str, torch.Tensor]) -> None:
    maps, masks, correct, keep, preds, labels, probs = _study_inputs()
    for vi in range(3):
        v = attribution_volumes(maps[:, vi], masks[:, 0])
        vals = torch.stack(list(v), -1)
        for gi, sel in enumerate([keep, keep & correct, keep & ~correct]):
            assert vol["count"][vi, gi] == sel.sum()
            torch.testing.assert_close(vol["mean"][vi, gi], vals[sel].mean(0), msg=f"variant {vi} {GROUPS[gi]}")
        torch.testing.assert_close(acc["accuracy"][vi], (preds[keep, vi] == labels[keep]).double().mean())
        torch.testing.assert_close(acc["shift"][vi], prediction_shift(probs[keep, 0], probs[keep, vi]).mean())


def test_metrics_equal_per_image_means() -> None:
    maps, masks, correct, keep, preds, labels, probs = _study_inputs()
    vol, acc = ContextVolume(3), VariantAccuracy(3)
    for s in (slice(0, 4), slice(4, 10)):  # two batches
        vol.update(maps[s], masks[s], correct[s], keep[s])
        acc.update(preds[s], labels[s], probs[s], keep[s])
    _check_metrics(vol.compute(), acc.compute())
    with pytest.raises(CvlabError, match="holds 3 variants"):
        vol.update(maps[:, :2], masks, correct, keep)


def _ddp_worker(rank: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        maps, masks, correct, keep, preds, labels, probs = _study_inputs()
        s = slice(0, 3) if rank == 0 else slice(3, 10)  # uneven shards
        vol, acc = ContextVolume(3), VariantAccuracy(3)
        vol.update(maps[s], masks[s], correct[s], keep[s])
        acc.update(preds[s], labels[s], probs[s], keep[s])
        out = {"vol": vol.compute(), "acc": acc.compute()}  # synced
        if rank == 0:
            torch.save(out, out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_metrics_two_processes_equal_one(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    out_file = tmp_path / "out.pt"
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(out_file)), nprocs=2, join=True)
    out = torch.load(out_file, weights_only=True)
    _check_metrics(out["vol"], out["acc"])
