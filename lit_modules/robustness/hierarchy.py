"""Class hierarchies: a rooted tree over a task's classes, for measuring how severe a misclassification is.

A :class:`ClassHierarchy` holds the parent of every node (classes are nodes ``0..K-1``, in the task's label
order; inner nodes follow), each node's depth (root 0), and two ``(K, K)`` integer matrices computed once:

- ``distance[a, b] = depth(a) + depth(b) - 2 depth(lca(a, b))``: the number of tree edges between two classes;
- ``lca_height[a, b] = max(depth(a), depth(b)) - depth(lca(a, b))``: how many levels one climbs from the
  deeper class to reach their lowest common ancestor (0 for ``a == b``; 1 for siblings; the tree's height
  for classes whose only common ancestor is the root). On trees whose classes all sit at one depth (the
  shipped MNIST / Fashion-MNIST hierarchies, CIFAR-100's superclasses) it is the usual "height of the LCA"
  of Bertinetto et al. (CVPR 2020) and of arXiv 2108.11785.

The depth of every pair's LCA comes from one matrix product: with ``A[k, n] = 1`` when node ``n`` is on the
path from class ``k`` to the root (itself included), the common ancestors of two classes are the path from the
root to their LCA, so ``depth(lca(a, b)) = (A @ A.T)[a, b] - 1``.

Sources: a user YAML/JSON tree (:meth:`ClassHierarchy.from_file`), CIFAR-100's 20 superclasses read from the
dataset's own pickle (:meth:`ClassHierarchy.from_cifar100`), WordNet 3.0's noun hypernyms for ImageNet ids
(:meth:`ClassHierarchy.from_wordnet`), and the two-level MNIST / Fashion-MNIST trees shipped here
(:data:`BUILTIN`, :func:`load_hierarchy`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from cvlab.errors import CvlabError
from datamodules.vision import read_pickled_batch


class HierarchyError(CvlabError):
    """A class hierarchy that is not a rooted tree over the task's classes."""


#: The two-level hierarchies shipped with cvlab (root -> group -> class; the classes in label order).
#:
#: Fashion-MNIST: *tops* are the garments worn on the torso (T-shirt/top, pullover, dress, coat, shirt: the five
#: classes a classifier confuses among themselves, and a flip among them is the mildest kind); *footwear* the
#: three shoes; *others* the trouser and the bag, which share nothing with either group. A flip from a sneaker
#: to an ankle boot stays in footwear (height 1); a flip from a sneaker to a bag crosses the root (height 2).
#:
#: MNIST digits have no semantic hierarchy; we group them by the shape of the usual handwritten glyph, so
#: that a flip inside a group is one a human also finds plausible: *loops* (0, 6, 8, 9: a closed loop),
#: *strokes* (1, 4, 7: straight strokes), *open curves* (2, 3, 5). The grouping is ours, a convention: read
#: MNIST severities as "did the attack leave the glyph's shape family", nothing more.
BUILTIN: dict[str, dict[str, Any]] = {
    "fashion_mnist": {
        "clothing": {
            "tops": ["T-shirt/top", "Pullover", "Dress", "Coat", "Shirt"],
            "footwear": ["Sandal", "Sneaker", "Ankle boot"],
            "others": ["Trouser", "Bag"],
        }
    },
    "mnist": {
        "digit": {
            "loops": ["0", "6", "8", "9"],
            "strokes": ["1", "4", "7"],
            "open_curves": ["2", "3", "5"],
        }
    },
}

#: The class names in label order of the shipped hierarchies.
BUILTIN_CLASSES: dict[str, list[str]] = {
    "fashion_mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"],
    "mnist": [str(d) for d in range(10)],
}


@dataclass(frozen=True, eq=False)
class ClassHierarchy:
    """A rooted tree whose first ``num_classes`` nodes are the task's classes, in label order.

    Build with :meth:`from_parents` (or the readers); ``parent[root] == -1``.
    """

    names: tuple[str, ...]
    parent: tuple[int, ...]
    num_classes: int
    depth: tuple[int, ...] = field(init=False)
    distance: Tensor = field(init=False, repr=False)  # (K, K) int64
    lca_height: Tensor = field(init=False, repr=False)  # (K, K) int64

    def __post_init__(self) -> None:
        n = len(self.parent)
        roots = [i for i, p in enumerate(self.parent) if p == -1]
        if len(roots) != 1:
            found = ", ".join(repr(self.names[r]) for r in roots[:5]) or "none"
            raise HierarchyError(f"a class hierarchy needs exactly one root, found {len(roots)}: {found}")
        depth = [-1] * n
        depth[roots[0]] = 0
        for start in range(n):  # walk up to a node of known depth; a walk longer than n is a cycle
            path, node = [], start
            while depth[node] < 0:
                path.append(node)
                node = self.parent[node]
                if len(path) > n:
                    raise HierarchyError(f"the class hierarchy has a cycle through {self.names[start]!r}")
            for i, v in enumerate(reversed(path), start=1):
                depth[v] = depth[node] + i
        object.__setattr__(self, "depth", tuple(depth))
        k = self.num_classes
        on_path = torch.zeros(k, n, dtype=torch.float64)  # (K, N): node n is an ancestor of class k (or k itself)
        for c in range(k):
            node = c
            while node != -1:
                on_path[c, node] = 1.0
                node = self.parent[node]
        lca_depth = (on_path @ on_path.T).round().long() - 1  # (K, K)
        d = torch.tensor(depth[:k], dtype=torch.long)
        object.__setattr__(self, "distance", d[:, None] + d[None, :] - 2 * lca_depth)
        object.__setattr__(self, "lca_height", torch.maximum(d[:, None], d[None, :]) - lca_depth)

    # --- construction -----------------------------------------------------------------------------------

    @classmethod
    def from_parents(cls, parents: Mapping[str, str | None], classes: Sequence[str]) -> ClassHierarchy:
        """From ``{node: parent}`` (the root's parent ``None``) and the class names in label order."""
        classes = [str(c) for c in classes]
        if len(set(classes)) != len(classes):
            raise HierarchyError("the class names must be distinct")
        missing = [c for c in classes if c not in parents]
        if missing:
            raise HierarchyError(
                f"the class hierarchy misses {len(missing)} class(es): {', '.join(map(repr, missing[:5]))}")
        unknown = sorted({str(p) for p in parents.values() if p is not None and p not in parents})
        if unknown:
            raise HierarchyError(f"parent(s) {', '.join(map(repr, unknown[:5]))} are not nodes of the hierarchy")
        names = classes + [str(n) for n in parents if n not in set(classes)]
        index = {n: i for i, n in enumerate(names)}
        parent = tuple(-1 if parents[n] is None else index[parents[n]] for n in names)
        return cls(tuple(names), parent, len(classes))

    @classmethod
    def from_tree(cls, tree: Mapping[str, Any], classes: Sequence[str]) -> ClassHierarchy:
        """From a nested mapping ``{root: {group: [class, ...], ...}}`` (a leaf: a list item, or a key whose
        value is ``null`` / ``{}``), or a flat ``{"parents": {node: parent-or-null}}``."""
        if set(tree) == {"parents"}:
            return cls.from_parents({str(k): (None if v is None else str(v)) for k, v in tree["parents"].items()},
                                    classes)
        parents: dict[str, str | None] = {}

        def add(node: Any, parent: str | None) -> None:
            name = str(node)
            if name in parents:
                raise HierarchyError(f"node {name!r} appears twice in the class hierarchy")
            parents[name] = parent

        def walk(sub: Any, parent: str) -> None:
            if isinstance(sub, Mapping):
                for k, v in sub.items():
                    add(k, parent)
                    if v:
                        walk(v, str(k))
            elif isinstance(sub, list):
                for item in sub:
                    if isinstance(item, Mapping):
                        walk(item, parent)
                    else:
                        add(item, parent)
            else:
                raise HierarchyError(f"under {parent!r}: expected a mapping or a list, got {type(sub).__name__}")

        if not isinstance(tree, Mapping):
            raise HierarchyError(f"a class hierarchy is a mapping {{root: {{...}}}}, got {type(tree).__name__}")
        for root, sub in tree.items():
            add(root, None)
            if sub:
                walk(sub, str(root))
        return cls.from_parents(parents, classes)

    @classmethod
    def from_file(cls, path: str | Path, classes: Sequence[str]) -> ClassHierarchy:
        """From a YAML or JSON file holding a tree as :meth:`from_tree` reads it."""
        path = Path(path)
        if not path.is_file():
            raise HierarchyError(f"class hierarchy file {path} not found")
        text = path.read_text()
        tree = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        return cls.from_tree(tree or {}, classes)

    @classmethod
    def from_cifar100(cls, data_dir: str | Path) -> ClassHierarchy:
        """CIFAR-100's 20 superclasses: root -> superclass -> the 100 fine classes (fine label order).

        Reads ``coarse_labels`` next to ``fine_labels`` in ``<data_dir>/cifar-100-python/train`` and the names
        in ``meta`` (torchvision keeps only the fine labels), with a restricted unpickler.
        """
        folder = Path(data_dir) / "cifar-100-python"
        if not (folder / "train").is_file() or not (folder / "meta").is_file():
            raise HierarchyError(f"CIFAR-100 not found: expected {folder}/train and {folder}/meta (the python version)")
        train, meta = read_cifar_pickle(folder / "train"), read_cifar_pickle(folder / "meta")
        fine_names, coarse_names = list(meta["fine_label_names"]), list(meta["coarse_label_names"])
        pairs = set(zip((int(v) for v in train["fine_labels"]), (int(v) for v in train["coarse_labels"])))
        coarse_of: dict[int, int] = {}
        for f, c in sorted(pairs):
            if coarse_of.setdefault(f, c) != c:
                raise HierarchyError(
                    f"CIFAR-100 fine class {fine_names[f]!r} has two superclasses in {folder / 'train'}")
        parents: dict[str, str | None] = {"root": None}
        for c in coarse_names:
            parents[f"super:{c}"] = "root"
        for f, name in enumerate(fine_names):
            if f not in coarse_of:
                raise HierarchyError(f"CIFAR-100 fine class {name!r} has no training image, so no superclass")
            parents[name] = f"super:{coarse_names[coarse_of[f]]}"
        return cls.from_parents(parents, fine_names)

    @classmethod
    def from_wordnet(cls, data_noun: str | Path, wnids: Sequence[str]) -> ClassHierarchy:
        """ImageNet-style classes (``"n" + 8-digit WordNet 3.0 noun offset``) under WordNet's is-a tree.

        Reads ``data.noun`` (Debian ``wordnet-base``: ``/usr/share/wordnet/data.noun``). Each synset's parent is
        its first hypernym pointer (``@``, else the instance hypernym ``@i``): WordNet is a DAG, this makes a tree.
        """
        path = Path(data_noun)
        if not path.is_file():
            raise HierarchyError(
                f"WordNet 3.0 data.noun not found at {path}; install Debian's wordnet-base "
                "(/usr/share/wordnet/data.noun) or give the path of a WordNet 3.0 dict/data.noun"
            )
        synsets = read_wordnet_nouns(path)
        parents: dict[str, str | None] = {}
        todo = []
        for w in wnids:
            if len(w) != 9 or w[0] != "n" or not w[1:].isdigit():
                raise HierarchyError(f"{w!r} is not a WordNet noun id (n + 8 digits, e.g. n01440764)")
            todo.append(int(w[1:]))
        while todo:
            off = todo.pop()
            key = f"n{off:08d}"
            if key in parents:
                continue
            if off not in synsets:
                raise HierarchyError(f"{key} is not a synset of {path}")
            p = synsets[off]
            parents[key] = None if p is None else f"n{p:08d}"
            if p is not None:
                todo.append(p)
        return cls.from_parents(parents, list(wnids))

    # --- queries ----------------------------------------------------------------------------------------

    @property
    def height(self) -> int:
        """The largest LCA height between two classes."""
        return int(self.lca_height.max())

    @property
    def max_distance(self) -> int:
        return int(self.distance.max())

    def lca(self, a: int, b: int) -> int:
        """The lowest common ancestor node of nodes ``a`` and ``b``."""
        seen = set()
        while a != -1:
            seen.add(a)
            a = self.parent[a]
        while b not in seen:
            b = self.parent[b]
        return b


def read_cifar_pickle(path: str | Path) -> dict[str, Any]:
    """A CIFAR python-version pickle read with the data layer's restricted unpickler
    (:func:`datamodules.vision.read_pickled_batch`: plain data and numpy arrays only, no code)."""
    return read_pickled_batch(path, "CIFAR-100")


def read_wordnet_nouns(path: str | Path) -> dict[int, int | None]:
    """``data.noun`` -> {synset offset: offset of its first hypernym (``@``, else ``@i``), or None}.

    Line format (wndb(5WN)): ``offset lex_filenum ss_type w_cnt(hex) [word lex_id]... p_cnt(3 digits)
    [symbol offset pos source/target]... | gloss``; the licence header lines start with two spaces.
    """
    out: dict[int, int | None] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if line.startswith("  ") or not line.strip():
                continue
            fields = line.split(" | ", 1)[0].split()
            try:
                offset, w_cnt = int(fields[0]), int(fields[3], 16)
                i = 4 + 2 * w_cnt
                p_cnt = int(fields[i])
                ptrs = [fields[i + 1 + 4 * j: i + 5 + 4 * j] for j in range(p_cnt)]
            except (IndexError, ValueError) as e:
                raise HierarchyError(f"{path}:{lineno} is not a WordNet data.noun line ({e})") from None
            hyper = [int(p[1]) for p in ptrs if p[0] == "@" and p[2] == "n"]
            hyper = hyper or [int(p[1]) for p in ptrs if p[0] == "@i" and p[2] == "n"]
            out[offset] = hyper[0] if hyper else None
    return out


def load_hierarchy(spec: str, classes: Sequence[str] | None = None, data_dir: str | None = None) -> ClassHierarchy:
    """A hierarchy by name: ``mnist`` / ``fashion_mnist`` (shipped), ``cifar100`` (from ``data_dir``, default the
    data root), ``wordnet:<path to data.noun>`` (``classes``: the wnids in label order), or a YAML/JSON file
    (``classes``: the class names in label order)."""
    if spec in BUILTIN:
        return ClassHierarchy.from_tree(BUILTIN[spec], BUILTIN_CLASSES[spec])
    if spec == "cifar100":  # data_dir None: $CVLAB_DATA, else ./data, as the datamodules
        from datamodules.data_root import resolve_data_dir

        return ClassHierarchy.from_cifar100(resolve_data_dir(data_dir))
    if classes is None:
        raise HierarchyError(f"hierarchy {spec!r} needs the class names (or wnids) in label order")
    if spec.startswith("wordnet:"):
        return ClassHierarchy.from_wordnet(spec.split(":", 1)[1], classes)
    if Path(spec).suffix in (".yaml", ".yml", ".json"):
        return ClassHierarchy.from_file(spec, classes)
    raise HierarchyError(
        f"unknown hierarchy {spec!r}: use one of {sorted(BUILTIN)}, cifar100, wordnet:<data.noun>, "
        "or a .yaml/.json file"
    )
