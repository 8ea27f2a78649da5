"""Class hierarchies and severity-aware fooling metrics: worked answers on toy trees."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_modules.robustness.hierarchy import (
    BUILTIN, BUILTIN_CLASSES, ClassHierarchy, HierarchyError, load_hierarchy, read_cifar_pickle,
)
from tests.fakedata import write_cifar

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
    train = read_cifar_pickle(folder / "train")
    fine = np.asarray(train["fine_labels"])
    coarse = fine // 5  # our generated superclasses: 5 consecutive fine classes each
    train["coarse_labels"] = coarse.tolist()
    with open(folder / "train", "wb") as f:
        pickle.dump(train, f)
    meta = read_cifar_pickle(folder / "meta")
    meta["coarse_label_names"] = [f"super{i}" for i in range(20)]
    with open(folder / "meta", "wb") as f:
        pickle.dump(meta, f)
    assert len(set(fine.tolist())) == 100  # write_cifar cycles the labels: every class has images
    h = ClassHierarchy.from_cifar100(tmp_path)
    assert h.num_classes == 100 and h.height == 2
    assert h.lca_height[0, 4] == 1 and h.lca_height[4, 5] == 2 and h.distance[0, 4] == 2 and h.distance[4, 5] == 4
    assert list(h.names[:3]) == list(meta["fine_label_names"][:3])


def test_cifar_reader_refuses_code(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    p = tmp_path / "train"
    with open(p, "wb") as f:
        pickle.dump({"fine_labels": [Evil()]}, f)
    with pytest.raises(HierarchyError, match="refusing to unpickle builtins.print"):
        read_cifar_pickle(p)


def test_cifar100_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(HierarchyError, match="CIFAR-100 not found"):
        ClassHierarchy.from_cifar100(tmp_path)


# a small data.noun in WordNet 3.0's format: licence lines start with two spaces; w_cnt in hex, p_cnt 3 digits;
# pointers "symbol offset pos source/target"; '~' hyponym pointers ignored; '@i' used when there is no '@'.
DATA_NOUN = """\
  1 This software and database is being provided to you, the LICENSEE, by
  2 Princeton University under the following license.
00001740 03 n 01 entity 0 002 ~ 00001930 n 0000 ~ 00002137 n 0000 | that which is perceived
00001930 03 n 01 physical_entity 0 002 @ 00001740 n 0000 ~ 00002684 n 0000 | an entity that has physical existence
00002137 03 n 02 abstraction 0 abstract_entity 0 001 @ 00001740 n 0000 | a general concept
00002684 03 n 01 object 0 003 @ 00001930 n 0000 ~ 02084071 n 0000 ~ 02121620 n 0000 | a tangible thing
02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 003 @ 00002684 n 0000 @ 00002137 n 0000 #m 02083346 n 0000 | a member of the genus Canis
02121620 05 n 01 cat 0 001 @ 00002684 n 0000 | feline mammal
09999999 18 n 01 Einstein 0 002 @i 00002137 n 0000 ;u 06000000 n 0000 | physicist
"""


def test_wordnet_reader_on_generated_data_noun(tmp_path: Path) -> None:
    p = tmp_path / "data.noun"
    p.write_text(DATA_NOUN)
    h = ClassHierarchy.from_wordnet(p, ["n02084071", "n02121620", "n09999999"])
    # dog, cat: entity/physical_entity/object/{dog,cat} (dog's first '@' is object); Einstein: entity/abstraction/Einstein
    assert h.depth[:3] == (3, 3, 2)
    assert h.names[h.lca(0, 1)] == "n00002684" and h.names[h.lca(0, 2)] == "n00001740"
    assert h.lca_height[0, 1] == 1 and h.distance[0, 1] == 2
    assert h.lca_height[0, 2] == 3 and h.distance[0, 2] == 5


def test_wordnet_errors(tmp_path: Path) -> None:
    with pytest.raises(HierarchyError, match="data.noun not found.*wordnet-base"):
        ClassHierarchy.from_wordnet(tmp_path / "nope" / "data.noun", ["n02084071"])
    p = tmp_path / "data.noun"
    p.write_text(DATA_NOUN)
    with pytest.raises(HierarchyError, match="n01234567 is not a synset"):
        ClassHierarchy.from_wordnet(p, ["n01234567"])
    with pytest.raises(HierarchyError, match="not a WordNet noun id"):
        ClassHierarchy.from_wordnet(p, ["dog"])
