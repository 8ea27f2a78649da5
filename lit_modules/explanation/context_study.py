"""The context vs object attribution study ("Lost in Context", Adhikari, Kumar, Mopuri, Pachamuthu, ICVGIP 2024,
arXiv 2411.02833), run as a ``cvlab test`` stage over a :class:`datamodules.context_variants.ContextVariantsDataModule`.

For every test batch ``(x (B, V, 3, H, W), masks (B, 1, H, W), labels)`` and every model:

1. classify every variant (1000-class outputs mapped to the dataset's classes through ``class_map``, e.g.
   ``in_to_in9.json``: the prediction is the map of the arg-max, the class probabilities are summed);
2. keep images whose context covers more than ``background_threshold`` of the image; call an image *correct*
   when it is right in every variant of ``correct_variants`` (original, only_fg and the three mixed ones);
3. for every attribution method, explain the model's own prediction on every variant, batched
   (:mod:`lit_modules.explanation.attribution`), normalise ``A = minmax(ReLU(map))`` and accumulate the object /
   context volumes per variant and group (all / correct / incorrect) in a synced
   :class:`~lit_modules.explanation.volume.ContextVolume`; accuracy and prediction shift from the original in
   :class:`~lit_modules.explanation.volume.VariantAccuracy`.

``random_init`` adds, per model, a copy with re-initialised weights (``<name>_random``): the control.

At the end it writes ``context_report.csv`` (every number) and ``context_report.md`` (accuracy, shift, volume
shares per model x method x variant, and the paper's findings (a)-(d) each judged confirmed or not with the
numbers behind it) into the run folder, and logs heatmap grids (``images/heatmaps_<model>_<method>``: per image
one column, per variant the image and its map) through the loggers.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from cvlab.errors import CvlabError
from cvlab.task import task_of
from lit_modules.explanation.attribution import attribute, check_methods, find_layer
from lit_modules.explanation.volume import (
    CORRECT_VARIANTS,
    GROUPS,
    VOLUME_FIELDS,
    ContextVolume,
    VariantAccuracy,
    background_filter,
    correct_in_every_variant,
    normalize_attribution,
)

CONTEXT_CHANGE = ("mixed_same", "mixed_rand", "mixed_next")
NO_INFORMATION = ("noise_gaussian", "noise_white", "mean_colour")
#: thresholds that turn the findings into yes / no (ours; the paper states them in words)
STABLE_RANGE = 0.10  # (b): the context share moves less than this across context changes
NONTRIVIAL_CONTEXT = 0.10  # (d): at least this share of the volume on a no-information context


def load_class_map(path: str | os.PathLike, num_outputs: int = 1000) -> Tensor:
    """``in_to_in9.json`` (``{"<output index>": <class or -1>}``) -> int64 ``(num_outputs,)``, -1 for unmapped."""
    p = Path(path)
    if not p.is_file():
        raise CvlabError(f"class map {p} not found (ImageNet-9's in_to_in9.json maps 1000 classes to 9)")
    raw = json.loads(p.read_text())
    out = torch.full((num_outputs,), -1, dtype=torch.long)
    for k, v in raw.items():
        if not 0 <= int(k) < num_outputs:
            raise CvlabError(f"class map {p}: output index {k} outside 0..{num_outputs - 1}")
        out[int(k)] = int(v)
    return out


def map_outputs(logits: Tensor, class_map: Tensor | None, num_classes: int) -> tuple[Tensor, Tensor]:
    """``(N, K_out)`` logits -> predictions ``(N,)`` in the dataset's classes (-1: an unmapped output) and class
    probabilities ``(N, num_classes)`` (the mapped outputs' softmax mass, renormalised)."""
    probs = logits.float().softmax(-1)
    if class_map is None:
        return logits.argmax(-1), probs
    cm = class_map.to(logits.device)
    valid = cm >= 0
    mapped = torch.zeros(logits.shape[0], num_classes, device=logits.device).index_add_(1, cm[valid], probs[:, valid])
    return cm[logits.argmax(-1)], mapped / mapped.sum(-1, keepdim=True).clamp_min(1e-12)


def random_init_copy(net: nn.Module, seed: int) -> nn.Module:
    """A copy of ``net`` with every layer re-initialised (its own default init, seeded), frozen, in eval mode."""
    rnd = copy.deepcopy(net)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in rnd.modules():
            if hasattr(m, "reset_parameters") and m is not rnd:
                m.reset_parameters()
    for p in rnd.parameters():
        p.requires_grad_(False)
    return rnd.eval()


class ContextAttributionStudy(L.LightningModule):
    """Models x attribution methods x context variants -> volume report, findings (a)-(d), heatmaps.

    Args:
        models: ``{name: checkpoint path}`` (anything :func:`lit_modules.load_teacher` reads) or ``{name:
            {class_path: ..., init_args: {...}}}`` / a zoo name (a network that brings its own weights, e.g.
            :class:`lit_modules.nets.efficientnet_lite.EfficientNetLite0` with ``pretrained: true``).
        methods: attribution methods (:data:`lit_modules.explanation.attribution.ATTRIBUTIONS`).
        random_init: add a re-initialised copy of every model as a control.
        target_layer: layer name for the CAM methods (``{model: name}`` per model); ``None``: the last Conv2d.
        class_map: a JSON file mapping model outputs to the dataset's classes (``in_to_in9.json``).
        background_threshold: keep images whose context covers more than this share.
        correct_variants: the variants an image must be right in to count as correct (those present).
        attribution_batch_size: internal batch of ScoreCAM / Occlusion / Integrated Gradients.
        grid_images: images per heatmap grid (first test batch).
        seed: seeds the random-init controls.
    """

    def __init__(
        self,
        models: dict[str, Any],
        methods: list[str] | None = None,
        random_init: bool = True,
        target_layer: str | dict[str, str] | None = None,
        class_map: str | None = None,
        background_threshold: float = 0.3,
        correct_variants: list[str] | None = None,
        attribution_batch_size: int = 256,
        grid_images: int = 8,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not models:
            raise CvlabError("ContextAttributionStudy needs models: {name: checkpoint path or network spec}")
        self.methods = list(methods or ["gradcam", "gradcampp", "scorecam", "fullgrad", "guided_backprop"])
        check_methods(self.methods)
        self.model_names = [n for name in models for n in ([name, f"{name}_random"] if random_init else [name])]
        self.nets = nn.ModuleDict()
        self.layers: dict[str, nn.Module] = {}
        self.class_map = load_class_map(class_map) if class_map else None
        self.metrics_ready = False

    # --- setup: the networks, then one metric per model x method -----------------------------------------------
    def _build(self, name: str, spec: Any) -> nn.Module:
        from lit_modules.nets import create_net
        from lit_modules.teacher import load_teacher

        if isinstance(spec, str) and (Path(spec).suffix or os.sep in spec):
            return load_teacher(spec)
        net = create_net(spec, num_classes=self.num_classes, in_channels=3, image_size=self.image_size)
        for p in net.parameters():
            p.requires_grad_(False)
        return net.eval()

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self.trainer is not None else None
        if dm is None or not hasattr(dm, "variant_names"):
            raise CvlabError("the context study needs a context-variants datamodule (datamodules.context_variants)")
        self.variant_names = list(dm.variant_names)
        task = task_of(self.trainer)
        self.num_classes, self.image_size = task.num_classes, task.image_size
        wanted = self.hparams.correct_variants or list(CORRECT_VARIANTS)
        self.correct_idx = [self.variant_names.index(v) for v in wanted if v in self.variant_names]
        if len(self.nets) == 0:
            for i, (name, spec) in enumerate(self.hparams.models.items()):
                net = self._build(name, spec)
                self.nets[name] = net
                if self.hparams.random_init:
                    self.nets[f"{name}_random"] = random_init_copy(net, self.hparams.seed + i)
            tl = self.hparams.target_layer
            for name, net in self.nets.items():
                base = name[: -len("_random")] if name.endswith("_random") and name not in self.hparams.models else name
                layer_name = tl.get(base) if isinstance(tl, dict) else tl
                self.layers[name] = find_layer(net, layer_name)
        if not self.metrics_ready:
            v = len(self.variant_names)
            self.volumes = nn.ModuleDict({f"{m}__{a}": ContextVolume(v) for m in self.nets for a in self.methods})
            self.accuracy = nn.ModuleDict({m: VariantAccuracy(v) for m in self.nets})
            self.metrics_ready = True

    def on_test_epoch_start(self) -> None:
        if torch.is_inference_mode_enabled():
            raise CvlabError("the context study takes input gradients: run with --trainer.inference_mode=false")
        self.grids: dict[str, Tensor] = {}

    # --- the study ----------------------------------------------------------------------------------------------
    def test_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        x, masks, labels = batch  # (B, V, 3, H, W), (B, 1, H, W), (B,)
        b, v = x.shape[:2]
        flat = x.flatten(0, 1)  # (B V, 3, H, W)
        keep = background_filter(masks, self.hparams.background_threshold)
        for name, net in self.nets.items():
            with torch.no_grad():
                logits = net(flat)  # (B V, K_out)
            preds, probs = map_outputs(logits, self.class_map, self.num_classes)
            preds, probs = preds.view(b, v), probs.view(b, v, -1)
            self.accuracy[name].update(preds, labels, probs, keep)
            correct = correct_in_every_variant(preds[:, self.correct_idx], labels)
            target = logits.argmax(-1)  # explain the model's own prediction (grad-cam's default)
            for method in self.methods:
                maps = attribute(method, net, flat, target, self.layers[name], self.hparams.attribution_batch_size)
                a = normalize_attribution(maps).view(b, v, *maps.shape[-2:])
                self.volumes[f"{name}__{method}"].update(a, masks, correct, keep)
                if batch_idx == 0:
                    self.grids[f"{name}__{method}"] = self._grid(x, a)

    def _grid(self, x: Tensor, a: Tensor) -> Tensor:
        """Rows: per variant, the images then their heatmaps (jet-like red-yellow over grey); columns: images."""
        n = min(self.hparams.grid_images, x.shape[0])
        imgs = x[:n].transpose(0, 1)  # (V, n, 3, H, W)
        heat = a[:n].transpose(0, 1)[:, :, None]  # (V, n, 1, H, W)
        colour = torch.cat([heat.clamp(0, 1), (2 * heat - 1).clamp(0, 1), torch.zeros_like(heat)], 2)
        over = 0.45 * imgs.mean(2, keepdim=True).expand_as(imgs) + 0.55 * colour
        return torch.stack([imgs, over], 1).flatten(0, 2).detach().cpu()  # (V * 2 * n, 3, H, W)

    def on_test_epoch_end(self) -> None:
        rows = self.collect_rows()
        findings = judge_findings(rows, self.variant_names)
        self.rows, self.findings = rows, findings
        for r in rows:
            if r["variant"] == "original":
                self.log(f"test/{r['model']}/{r['method']}/object_share_correct", _nan0(r["correct_object_share"]),
                         sync_dist=False)
        for m in self.nets:
            acc = self.accuracy[m].compute()
            self.log(f"test/{m}/acc_original", float(acc["accuracy"][0]), sync_dist=False)
        if self.trainer.is_global_zero:
            folder = Path(self.trainer.default_root_dir)
            write_report(rows, findings, folder, self.variant_names)
            from cvlab.image_log import log_image_grid

            for key, grid in self.grids.items():
                log_image_grid(self.trainer, f"heatmaps_{key}", grid, nrow=min(self.hparams.grid_images,
                                                                                  grid.shape[0]))

    def collect_rows(self) -> list[dict[str, Any]]:
        rows = []
        for m in self.nets:
            acc = self.accuracy[m].compute()
            for method in self.methods:
                out = self.volumes[f"{m}__{method}"].compute()
                for vi, variant in enumerate(self.variant_names):
                    row: dict[str, Any] = {"model": m, "method": method, "variant": variant,
                                           "images": int(acc["count"]), "accuracy": float(acc["accuracy"][vi]),
                                           "shift": float(acc["shift"][vi])}
                    for gi, g in enumerate(GROUPS):
                        row[f"{g}_count"] = int(out["count"][vi, gi])
                        for fi, f in enumerate(VOLUME_FIELDS):
                            row[f"{g}_{f}"] = float(out["mean"][vi, gi, fi])
                    rows.append(row)
        return rows


def _nan0(v: float) -> float:
    return 0.0 if math.isnan(v) else v


def _fmt(v: float, digits: int = 3) -> str:
    return "-" if isinstance(v, float) and math.isnan(v) else f"{v:.{digits}f}"


def judge_findings(rows: list[dict[str, Any]], variants: list[str]) -> list[dict[str, Any]]:
    """The paper's findings as yes / no per model (x method), with the numbers:

    (a) correct images put more of the volume on the object than a uniform map would (object share above the
        object's area share) and more per pixel on the object than on the context (original images);
    (b) the context share ``C / (O + C)`` moves by less than :data:`STABLE_RANGE` across original and the
        context changes, for correct and for incorrect images alike;
    (c) the accuracy drop under context change (mean over the mixed variants) exceeds the drop under context
        perturbation (mean over ``ctx_*`` corruptions), same images;
    (d) in the no-information contexts the context share is at least :data:`NONTRIVIAL_CONTEXT`.
    """
    out: list[dict[str, Any]] = []
    get = {(r["model"], r["method"], r["variant"]): r for r in rows}
    models = list(dict.fromkeys(r["model"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    change = [v for v in CONTEXT_CHANGE if v in variants]
    perturb = [v for v in variants if v.startswith("ctx_")]
    noinfo = [v for v in NO_INFORMATION if v in variants]
    for m in models:
        r0 = get[(m, methods[0], "original")]
        if change and perturb:
            d_change = sum(r0["accuracy"] - get[(m, methods[0], v)]["accuracy"] for v in change) / len(change)
            d_pert = sum(r0["accuracy"] - get[(m, methods[0], v)]["accuracy"] for v in perturb) / len(perturb)
            out.append({"finding": "c", "model": m, "method": "-", "confirmed": d_change > d_pert,
                        "evidence": f"acc original {r0['accuracy']:.3f}; drop under context change "
                                    f"{d_change:+.3f} vs perturbation {d_pert:+.3f}"})
        for meth in methods:
            o = get[(m, meth, "original")]
            if o["correct_count"] > 0:
                share, base = o["correct_object_share"], o["correct_uniform_object_share"]
                dens_o, dens_c = o["correct_object_density"], o["correct_context_density"]
                out.append({"finding": "a", "model": m, "method": meth,
                            "confirmed": share > base and dens_o > dens_c,
                            "evidence": f"correct (n={o['correct_count']}): O/(O+C) {share:.3f} vs uniform {base:.3f}; "
                                        f"O/sumM {dens_o:.3f} vs C/sum(1-M) {dens_c:.3f}; incorrect O/(O+C) "
                                        f"{_fmt(o['incorrect_object_share'])}"})
            else:
                out.append({"finding": "a", "model": m, "method": meth, "confirmed": None,
                            "evidence": "no image correct in every variant"})
            if change:
                spans = []
                for g in ("correct", "incorrect"):
                    vals = [1 - get[(m, meth, v)][f"{g}_object_share"] for v in ["original", *change]]
                    vals = [x for x in vals if not math.isnan(x)]
                    if vals:
                        spans.append((g, min(vals), max(vals)))
                ok = bool(spans) and all(hi - lo < STABLE_RANGE for _, lo, hi in spans)
                out.append({"finding": "b", "model": m, "method": meth, "confirmed": ok if spans else None,
                            "evidence": "; ".join(f"{g} C/(O+C) {lo:.3f}..{hi:.3f}" for g, lo, hi in spans)})
            if noinfo:
                ctx = {v: 1 - get[(m, meth, v)]["all_object_share"] for v in noinfo}
                out.append({"finding": "d", "model": m, "method": meth,
                            "confirmed": min(ctx.values()) >= NONTRIVIAL_CONTEXT,
                            "evidence": ", ".join(f"{v} C/(O+C) {c:.3f}" for v, c in ctx.items())
                                        + " (uniform "
                                          f"{1 - get[(m, meth, noinfo[0])]['all_uniform_object_share']:.3f})"})
    return out


MD_COLUMNS = [("accuracy", "acc"), ("shift", "shift"), ("correct_count", "n correct"),
              ("correct_object_share", "O/(O+C) correct"), ("incorrect_object_share", "O/(O+C) incorrect"),
              ("all_uniform_object_share", "uniform"), ("all_object_density", "O/sumM"),
              ("all_context_density", "C/sum(1-M)"), ("all_nonzero_inside", "nonzero in mask")]


def write_report(rows: list[dict[str, Any]], findings: list[dict[str, Any]], folder: Path,
                 variants: list[str]) -> None:
    """``context_report.csv`` (every number) and ``context_report.md`` (tables and the findings)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "context_report.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    word = {True: "confirmed", False: "not confirmed", None: "undecided"}
    lines = [f"# Context vs object attribution ({rows[0]['images']} images with > 30% context)", "",
             "## Findings", "", "| finding | model | method | verdict | numbers |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| ({f['finding']}) | {f['model']} | {f['method']} | {word[f['confirmed']]} | {f['evidence']} |"
              for f in sorted(findings, key=lambda f: (f["finding"], f["model"]))]
    lines += ["", "## Volumes per model x method x variant", "",
              "| model | method | variant | " + " | ".join(h for _, h in MD_COLUMNS) + " |",
              "|" + " --- |" * (3 + len(MD_COLUMNS))]
    for r in rows:
        cells = [r["model"], r["method"], r["variant"]]
        cells += [str(r[k]) if k.endswith("count") else _fmt(r[k]) for k, _ in MD_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    (folder / "context_report.md").write_text("\n".join(lines) + "\n")
