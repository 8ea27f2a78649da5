"""Class hierarchies and severity-aware fooling metrics: worked answers on toy trees."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from cvlab.errors import CvlabError
from lit_modules.robustness.hierarchy import (
    BUILTIN,
    BUILTIN_CLASSES,
    ClassHierarchy,
    HierarchyError,
    load_hierarchy,
    read_cifar_pickle,
)
from tests.fakedata import save_cvlab_checkpoint, write_cifar, write_data_noun

# root -> {animal -> {cat, dog}, vehicle -> {car, truck -> {lorry}}}, plus 'fish' straight under the root.
# classes in label order: cat 0, dog 1, car 2, lorry 3, fish 4; depths: 2, 2, 2, 3, 1.
TOY = {"root": {"animal": ["cat", "dog"], "vehicle": ["car", {"truck": ["lorry"]}], "fish": None}}
TOY_CLASSES = ["cat", "dog", "car", "lorry", "fish"]


@pytest.fixture
def toy() -> ClassHierarchy:
    return ClassHierarchy.from_tree(TOY, TOY_CLASSES)


def test_toy_depth_lca_distance_height(toy: ClassHierarchy) -> None:
    assert toy.depth[:5] == (2, 2, 2, 3, 1)
    idx = {n: i for i, n in enumerate(toy.names)}
    assert toy.lca(0, 1) == idx["animal"]
    assert toy.lca(2, 3) == idx["vehicle"]
    assert toy.lca(0, 3) == idx["root"]
    assert toy.lca(3, idx["truck"]) == idx["truck"]
    # distance: cat-dog 2, car-lorry 3, cat-lorry 5, cat-fish 3, lorry-fish 4
    d = toy.distance
    assert d[0, 1] == 2 and d[2, 3] == 3 and d[0, 3] == 5 and d[0, 4] == 3 and d[3, 4] == 4
    assert torch.equal(d, d.T) and torch.all(d.diagonal() == 0)
    # LCA height = max(depths) - depth(lca): cat-dog 1, car-lorry 3-1=2, cat-lorry 3, cat-fish 2, lorry-fish 3
    h = toy.lca_height
    assert h[0, 1] == 1 and h[2, 3] == 2 and h[0, 3] == 3 and h[0, 4] == 2 and h[3, 4] == 3
    assert torch.all(h.diagonal() == 0) and toy.height == 3 and toy.max_distance == 5


def test_flat_parents_format_equals_nested(toy: ClassHierarchy, tmp_path: Path) -> None:
    flat = {"parents": {"root": None, "animal": "root", "vehicle": "root", "cat": "animal", "dog": "animal",
                        "car": "vehicle", "truck": "vehicle", "lorry": "truck", "fish": "root"}}
    p = tmp_path / "h.json"
    import json

    p.write_text(json.dumps(flat))
    h = ClassHierarchy.from_file(p, TOY_CLASSES)
    assert torch.equal(h.distance, toy.distance) and torch.equal(h.lca_height, toy.lca_height)
    y = tmp_path / "h.yaml"
    y.write_text("root:\n  animal: [cat, dog]\n  vehicle: [car, {truck: [lorry]}]\n  fish:\n")
    assert torch.equal(ClassHierarchy.from_file(y, TOY_CLASSES).lca_height, toy.lca_height)


@pytest.mark.parametrize("tree, classes, message", [
    (TOY, [*TOY_CLASSES, "bird"], "misses 1 class"),
    ({"parents": {"root": None, "a": "b", "b": "a", "c": "root"}}, ["c", "a"], "cycle"),
    ({"r1": ["a"], "r2": ["b"]}, ["a", "b"], "exactly one root, found 2"),
    ({"parents": {"a": "b", "b": "a"}}, ["a"], "exactly one root, found 0"),
    ({"root": {"x": ["a"], "y": ["a"]}}, ["a"], "appears twice"),
    ({"parents": {"root": None, "a": "ghost"}}, ["a"], "not nodes"),
])
def test_bad_hierarchies_fail_clearly(tree: dict, classes: list[str], message: str) -> None:
    with pytest.raises(HierarchyError, match=message) as e:
        ClassHierarchy.from_tree(tree, classes)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_builtin_two_level(name: str) -> None:
    h = load_hierarchy(name)
    assert h.num_classes == 10 and list(h.names[:10]) == BUILTIN_CLASSES[name]
    assert h.height == 2 and set(h.lca_height.unique().tolist()) == {0, 1, 2}
    assert all(h.depth[c] == 2 for c in range(10))
    if name == "fashion_mnist":  # sneaker-ankle boot: siblings; sneaker-bag: across the root
        assert h.lca_height[7, 9] == 1 and h.lca_height[7, 8] == 2 and h.lca_height[0, 6] == 1


def test_cifar100_coarse_labels_from_generated_pickle(tmp_path: Path) -> None:
    write_cifar(tmp_path, num_classes=100, n_train=300, n_test=10)
    folder = tmp_path / "cifar-100-python"
    train, meta = read_cifar_pickle(folder / "train"), read_cifar_pickle(folder / "meta")
    assert len(set(train["fine_labels"])) == 100  # write_cifar cycles the labels; superclass = fine // 5
    h = ClassHierarchy.from_cifar100(tmp_path)
    assert h.num_classes == 100 and h.height == 2
    assert h.lca_height[0, 4] == 1 and h.lca_height[4, 5] == 2 and h.distance[0, 4] == 2 and h.distance[4, 5] == 4
    assert list(h.names[:3]) == list(meta["fine_label_names"][:3]) and h.names[h.lca(0, 4)] == "super:coarse_0"
    train["coarse_labels"][train["fine_labels"].index(0)] = 7  # fine class 0 now in two superclasses
    with open(folder / "train", "wb") as f:
        pickle.dump(train, f)
    with pytest.raises(HierarchyError, match="fine_0.*two superclasses"):
        ClassHierarchy.from_cifar100(tmp_path)


def test_cifar_reader_refuses_code(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    p = tmp_path / "train"
    with open(p, "wb") as f:
        pickle.dump({"fine_labels": [Evil()]}, f)
    with pytest.raises(CvlabError, match="refused CIFAR-100 file .*builtins.print"):
        read_cifar_pickle(p)


def test_cifar100_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(HierarchyError, match="CIFAR-100 not found"):
        ClassHierarchy.from_cifar100(tmp_path)




def test_wordnet_reader_on_generated_data_noun(tmp_path: Path) -> None:
    p = write_data_noun(tmp_path / "data.noun")
    h = ClassHierarchy.from_wordnet(p, ["n02084071", "n02121620", "n09999999"])
    # dog, cat: entity/physical_entity/object/{dog,cat} (dog's first '@' is object);
    # Einstein: entity/abstraction/Einstein
    assert h.depth[:3] == (3, 3, 2)
    assert h.names[h.lca(0, 1)] == "n00002684" and h.names[h.lca(0, 2)] == "n00001740"
    assert h.lca_height[0, 1] == 1 and h.distance[0, 1] == 2
    assert h.lca_height[0, 2] == 3 and h.distance[0, 2] == 5


def test_wordnet_errors(tmp_path: Path) -> None:
    with pytest.raises(HierarchyError, match="data.noun not found.*wordnet-base"):
        ClassHierarchy.from_wordnet(tmp_path / "nope" / "data.noun", ["n02084071"])
    p = write_data_noun(tmp_path / "data.noun")
    with pytest.raises(HierarchyError, match="n01234567 is not a synset"):
        ClassHierarchy.from_wordnet(p, ["n01234567"])
    with pytest.raises(HierarchyError, match="not a WordNet noun id"):
        ClassHierarchy.from_wordnet(p, ["dog"])


# --- metrics ----------------------------------------------------------------------------------------------------
from lit_modules.robustness.severity import FoolingSeverity, true_class_rank  # noqa: E402

# four images, labels cat, dog, car, fish. Clean predictions: cat (right), dog (right), lorry (wrong), fish (right);
# adversarial: dog, lorry, lorry, fish. Flips: cat->dog (height 1, distance 2), dog->lorry (height 3, distance 5).
# The model's own mistake: car->lorry (height 2, distance 3).
Y = torch.tensor([0, 1, 2, 4])
CLEAN = torch.tensor([[5., 1, 0, 0, 0], [0, 5, 0, 0, 0], [0, 0, 3, 4, 0], [0, 0, 0, 0, 5]])
ADV = torch.tensor([[2., 3, 0, 0, 0], [0, 1, 0, 4, 2], [0, 0, 1, 4, 0], [0, 0, 0, 0, 5]])


def _expected() -> dict[str, float]:
    p_clean, p_adv = CLEAN.softmax(-1)[torch.arange(4), Y], ADV.softmax(-1)[torch.arange(4), Y]
    return {
        "count": 4, "clean_accuracy": 0.75, "adv_accuracy": 0.25,
        "fooling_rate": 0.5, "severity_lca": 2.0, "severity_distance": 3.5, "weighted_fooling_rate": 4 / 4 / 3,
        "rank_before": 1.25, "rank_after": 2.0, "confidence_drop": float((p_clean - p_adv).mean()),
        "mistake_rate": 0.25, "mistake_lca": 2.0, "mistake_distance": 3.0, "weighted_mistake_rate": 2 / 4 / 3,
    }


def _check_values(out: dict[str, torch.Tensor]) -> None:
    for k, v in _expected().items():
        assert float(out[k]) == pytest.approx(v, abs=1e-6), k
    assert out["hist_lca"].tolist() == [2, 1, 0, 1]
    assert out["hist_mistake_lca"].tolist() == [3, 0, 1, 0]


def test_true_class_rank_worked() -> None:
    assert true_class_rank(ADV, Y).tolist() == [2, 3, 2, 1]
    assert true_class_rank(CLEAN, Y).tolist() == [1, 1, 2, 1]


def test_fooling_severity_hand_computed(toy: ClassHierarchy) -> None:
    m = FoolingSeverity(toy)
    m.update(CLEAN, ADV, Y)
    _check_values(m.compute())
    m2 = FoolingSeverity(toy)  # two batches accumulate to the same values
    m2.update(CLEAN[:1], ADV[:1], Y[:1])
    m2.update(CLEAN[1:], ADV[1:], Y[1:])
    _check_values(m2.compute())


def test_fooling_severity_no_flip_is_nan_severity(toy: ClassHierarchy) -> None:
    m = FoolingSeverity(toy)
    m.update(CLEAN, CLEAN, Y)
    out = m.compute()
    assert float(out["fooling_rate"]) == 0 and float(out["weighted_fooling_rate"]) == 0
    assert torch.isnan(out["severity_lca"]) and float(out["confidence_drop"]) == 0


def test_fooling_severity_bad_input(toy: ClassHierarchy) -> None:
    m = FoolingSeverity(toy)
    with pytest.raises(HierarchyError, match=r"must be \(B, 5\).*outside the tree"):
        m.update(torch.zeros(4, 6), torch.zeros(4, 6), Y)
    with pytest.raises(HierarchyError, match=r"class indices in \[0, 4\].*got \[0, 7\]"):
        m.update(CLEAN, ADV, torch.tensor([0, 1, 7, 4]))


def _ddp_worker(rank: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        m = FoolingSeverity(ClassHierarchy.from_tree(TOY, TOY_CLASSES))
        idx = slice(rank * 2, rank * 2 + 2) if rank == 0 else slice(2, 3)  # uneven shards: 2 and 1 images
        m.update(CLEAN[idx], ADV[idx], Y[idx])
        if rank == 1:
            m.update(CLEAN[3:], ADV[3:], Y[3:])
        out = m.compute()  # synced over the two processes
        if rank == 0:
            torch.save({k: v.cpu() for k, v in out.items()}, out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fooling_severity_two_processes_equal_one(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    out_file = tmp_path / "out.pt"
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(out_file)), nprocs=2, join=True)
    _check_values(torch.load(out_file, weights_only=True))


# --- the report stage -------------------------------------------------------------------------------------------
def test_report_stage_writes_table_csv_histograms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import csv

    from lit_modules.classifier import ClassifierModule
    from tests.cli_runs import read_metrics, run_cli
    from tests.fakedata import write_mnist_idx

    write_mnist_idx(tmp_path / "data", "FashionMNIST", n_train=20, n_test=24)
    monkeypatch.setenv("CVLAB_DATA", str(tmp_path / "data"))
    torch.manual_seed(0)
    ckpts = {}
    for arch in ("lenet5", "lenet5_half"):
        m = ClassifierModule(arch=arch, num_classes=10, in_channels=1, image_size=32)
        ckpts[arch] = tmp_path / f"{arch}.ckpt"
        save_cvlab_checkpoint(m, ckpts[arch])
    models = "{" + ", ".join(f"{k}: {v}" for k, v in ckpts.items()) + "}"
    run = tmp_path / "run"
    run_cli("test", "--config=experiments/severity/fashion_mnist/report.yaml", f"--model.init_args.models={models}",
            "--model.init_args.eps=[0.1, 0.3]", "--model.init_args.steps=3", "--data.init_args.batch_size=12",
            "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false", "--run.logger=csv", run_dir=run)
    rows = list(csv.DictReader(open(run / "severity_report.csv")))
    assert len(rows) == 2 * 5 * 2 and {r["attack"] for r in rows} == {"fgsm", "ifgsm", "pgd", "mifgsm", "noise"}
    for r in rows:
        fr, swfr = float(r["fooling_rate"]), float(r["weighted_fooling_rate"])
        hist = [int(v) for v in r["hist_lca"].split()]
        assert int(r["images"]) == 24 and sum(hist) == 24 and hist[0] == round(24 * (1 - fr))
        assert 0 <= swfr <= fr <= 1 and float(r["rank_after"]) >= 1
    md = (run / "severity_report.md").read_text()
    assert md.count("\n| lenet5 |") == 10 and "LCA height (own mistakes)" in md
    assert all((run / "images" / f"severity_hist_{a}.png").is_file() for a in ("fgsm", "pgd", "noise"))
    logged = read_metrics(run)
    assert "test/lenet5/pgd/eps0.1/fooling_rate" in logged
    pgd = next(r for r in rows if (r["model"], r["attack"], r["eps"]) == ("lenet5_half", "pgd", "0.3"))
    assert logged["test/lenet5_half/pgd/eps0.3/adv_accuracy"] == pytest.approx(float(pgd["adv_accuracy"]), abs=1e-6)


# --- the universal perturbation in the report -------------------------------------------------------------------
def test_apply_uap_worked() -> None:
    from lit_modules.robustness.severity_report import apply_uap

    x = torch.tensor([0.95, 0.5, 0.02, 0.5]).view(1, 1, 2, 2)
    v = torch.tensor([0.1, -0.2, -0.1, 0.05]).view(1, 2, 2)
    # clipped to the eps-ball (-0.2 -> -0.1) and to [0, 1] (0.95 + 0.1 -> 1, 0.02 - 0.1 -> 0)
    assert torch.allclose(apply_uap(x, v, 0.1), torch.tensor([1.0, 0.4, 0.0, 0.55]).view(1, 1, 2, 2))


def _uap_ckpt(path: Path, w: torch.Tensor, budgets: list[float]) -> Path:
    torch.save({"state_dict": {"w": w, "eps": torch.tensor(budgets)}, "hyper_parameters": {"budgets": budgets}}, path)
    return path


def test_report_uap_attack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A zero perturbation moves nothing, a strong one moves the outputs; each eps row uses the matching budget."""
    import csv

    from lit_modules.classifier import ClassifierModule
    from tests.cli_runs import run_cli
    from tests.fakedata import write_mnist_idx

    write_mnist_idx(tmp_path / "data", "FashionMNIST", n_train=20, n_test=24)
    monkeypatch.setenv("CVLAB_DATA", str(tmp_path / "data"))
    torch.manual_seed(0)
    m = ClassifierModule(arch="lenet5", num_classes=10, in_channels=1, image_size=32)
    save_cvlab_checkpoint(m, tmp_path / "net.ckpt")
    w = torch.zeros(3, 1, 32, 32)
    w[2] = torch.where(torch.arange(32 * 32).view(1, 32, 32) % 2 == 0, 1.0, -1.0)  # budget 0.9: a checkerboard
    uap = _uap_ckpt(tmp_path / "uap.ckpt", w, [0.1, 0.5, 0.9])
    run = tmp_path / "run"
    run_cli("test", "--config=experiments/severity/fashion_mnist/report.yaml",
            f"--model.init_args.models={{n: {tmp_path / 'net.ckpt'}}}",
            "--model.init_args.attacks=[uap]", f"--model.init_args.uaps={{n: {uap}}}",
            "--model.init_args.eps=[0.1, 0.9]",
            "--data.init_args.batch_size=12", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
            "--run.logger=csv", run_dir=run)
    rows = {float(r["eps"]): r for r in csv.DictReader(open(run / "severity_report.csv"))}
    assert set(rows) == {0.1, 0.9} and all(r["attack"] == "uap" and int(r["images"]) == 24 for r in rows.values())
    # budget 0.1's perturbation is zero: nothing moves; budget 0.9's checkerboard moves the true-class confidence
    assert float(rows[0.1]["fooling_rate"]) == 0.0 and float(rows[0.1]["confidence_drop"]) == 0.0
    assert float(rows[0.9]["confidence_drop"]) != 0.0


def test_report_uap_bad_input(tmp_path: Path) -> None:
    from lit_modules.robustness.severity_report import SeverityReport

    with pytest.raises(CvlabError, match="attack 'uap' needs a UniversalPerturbation checkpoint per model"):
        SeverityReport(models={"n": "x.ckpt"}, attacks=["uap"])
    report = SeverityReport(models={"n": "x.ckpt"}, attacks=["uap"], eps=[0.2],
                            uaps={"n": str(_uap_ckpt(tmp_path / "u.ckpt", torch.zeros(1, 1, 4, 4), [0.1]))})
    with pytest.raises(CvlabError, match=r"has budgets \[0.1.*\], the report asks eps 0.2"):
        report._uaps_for("n")
    torch.save({"state_dict": {"weight": torch.zeros(1)}}, tmp_path / "other.ckpt")
    report.hparams.uaps["n"] = str(tmp_path / "other.ckpt")
    with pytest.raises(CvlabError, match="not a UniversalPerturbation checkpoint"):
        report._uaps_for("n")


def test_report_unknown_attack_is_one_line_listing_the_registry() -> None:
    from cvlab.errors import CvlabError
    from lit_modules.robustness.severity_report import SeverityReport

    with pytest.raises(CvlabError, match=r"^unknown attacks \['cw'\]; available: fgsm, ifgsm, mifgsm, noise, pgd, "
                                         r"rfgsm, uap$"):
        SeverityReport(models={"a": "a.ckpt"}, attacks=["pgd", "cw"], hierarchy="mnist")
