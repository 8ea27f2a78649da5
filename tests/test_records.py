"""Results records and the page rendered from them (cvlab.records, `cvlab results`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cvlab.errors import CvlabError
from cvlab.records import (
    Metric,
    Record,
    format_metric,
    load_record,
    mean_sd,
    portable,
    record_from_seeds,
    render_arms,
    render_results,
    render_table,
    save_record,
    stage_records,
)
from experiments.results import main as results_main

ROOT = Path(__file__).resolve().parents[1]


def test_committed_results_page_is_the_rendering_of_the_records() -> None:
    """docs/RESULTS.md is generated: edit docs/results/ and run `uv run cvlab results`."""
    assert (ROOT / "docs" / "RESULTS.md").read_text() == render_results(ROOT / "docs" / "results")


def test_every_committed_record_loads_and_has_a_portable_command() -> None:
    records = sorted((ROOT / "docs" / "results").glob("*/*.json"))
    assert len(records) >= 20
    for p in records:
        r = load_record(p)
        assert r.command and "/work/" not in r.command and "/tmp/" not in r.command, p
        assert p.parent.name == r.section, f"{p}: section {r.section!r} is not its folder"


def test_mean_sd_and_format_worked_answers() -> None:
    assert mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_sd([5.0]) == (5.0, 0.0)
    m = Metric(key="acc", scale=100, digits=2)
    assert format_metric(m, [0.9764, 0.9808, 0.9752]) == "97.75 +- 0.29: 97.64 / 98.08 / 97.52"
    assert format_metric(m, [0.5]) == "50.00"


def test_table_marks_old_protocol_and_judges_the_bar() -> None:
    cur = Record(section="s", setting="new", values={"a": [97.0, 99.0]}, seeds=[0, 1], command="c",
                 report=[Metric(key="a", label="acc", paper=98.77, bar=98.5)])
    old = Record(section="s", setting="legacy", values={"a": [99.0]}, protocol="old", command="c",
                 report=[Metric(key="a", label="acc", bar=98.5)])
    table = render_table([cur, old])
    assert "| new | acc | **98.00 +- 1.41**: 97.00 / 99.00 | 98.77 (bar 98.5: missed) |" in table
    assert "| *old protocol:* legacy | acc | 99.00 | - (bar 98.5: met) |" in table


def test_arms_table_is_one_row_per_record_with_a_column_per_label(tmp_path: Path) -> None:
    a = Record(section="s", setting="FGSM-AT", values={"f:acc": [0.9, 0.8], "f:pgd": [0.01, 0.03]}, seeds=[0, 1],
               command="c1", wall="5 min",
               report=[Metric(key="f:pgd", label="PGD %", scale=100, digits=1, paper=89),
                       Metric(key="f:acc", label="clean %", scale=100, digits=1)])
    b = Record(section="s", setting="clean", values={"c:acc": [0.99]}, seeds=[0], command="c2",
               report=[Metric(key="c:acc", label="clean %", scale=100, digits=1)])
    table = render_arms([a, b]).splitlines()
    assert table[0] == "| arm | PGD % | clean % | seeds | wall | command |"
    assert table[2] == "| FGSM-AT | 2.0 +- 1.4 | 85.0 +- 7.1 | 0, 1 | 5 min | `c1` |"
    assert table[3] == "| clean | - | 99.0 | 0 |  | `c2` |"
    assert table[4] == "| paper | 89 |  | | | |"
    (tmp_path / "01-a").mkdir()
    save_record(b, tmp_path / "01-a" / "x.json")
    (tmp_path / "01-a.md").write_text("## A\n\n{{arms}}\n")
    assert "| clean | 99.0 | 0 |  | `c2` |" in render_results(tmp_path)


def test_stage_records_split_a_pipeline_record_into_arms() -> None:
    rec = Record(section="s", setting="pipe", command="cvlab run p.yaml --seeds 2", seeds=[0, 1],
                 values={"a:test/acc": [0.5, 0.7], "b:test/acc": [0.9, 0.8], "b:test/x": [1.0, 2.0]},
                 report=[Metric(key="a:test/acc")])
    arms = stage_records(rec, {"b": "arm B", "a": "arm A"}, [Metric(key="test/acc", label="acc")], group="g")
    assert [r.setting for r in arms] == ["arm B", "arm A"]
    assert arms[0].values == {"test/acc": [0.9, 0.8], "test/x": [1.0, 2.0]} and arms[1].seeds == [0, 1]
    assert arms[1].command == "cvlab run p.yaml --seeds 2 --only a" and arms[1].group == "g"
    rec.command = "cvlab run p.yaml --seeds 2 --only a b --set x=1"
    assert stage_records(rec, {"b": "B"}, [])[0].command == "cvlab run p.yaml --seeds 2 --set x=1 --only b"
    with pytest.raises(CvlabError, match="no stage 'c'"):
        stage_records(rec, {"c": "C"}, [])
    with pytest.raises(CvlabError, match="reported metric 'test/y'"):
        stage_records(rec, {"a": "A"}, [Metric(key="test/y")])



def test_stage_records_by_prefix_gather_one_pools_arms_and_their_difference() -> None:
    rec = Record(section="s", setting="pipe", command="cvlab run p.yaml --seeds 2 --set *.x=1", seeds=[0, 1],
                 values={"teacher:test/acc": [0.99, 0.98], "noise_unbalanced:test/acc": [0.5, 0.6],
                         "noise_balanced:test/acc": [0.7, 0.9], "noise:balanced-unbalanced": [0.2, 0.3],
                         "noise_select:data/size": [10.0, 20.0], "natural_balanced:test/acc": [0.8, 0.8],
                         "noisy_balanced:test/acc": [0.1, 0.1]},
                 report=[Metric(key="teacher:test/acc")])
    rows = stage_records(rec, {"noise": "pool: noise"}, [Metric(key="balanced-unbalanced", scale=100)],
                         group="g", prefix=True, needs=("teacher",))
    assert rows[0].values == {"unbalanced:test/acc": [0.5, 0.6], "balanced:test/acc": [0.7, 0.9],
                              "balanced-unbalanced": [0.2, 0.3], "select:data/size": [10.0, 20.0]}
    assert rows[0].command == ("cvlab run p.yaml --seeds 2 --set *.x=1 "
                               "--only teacher noise_unbalanced noise_balanced noise_select")
    with pytest.raises(CvlabError, match="no stage 'shapes'"):
        stage_records(rec, {"shapes": "S"}, [], prefix=True)

def test_bad_records_are_one_line_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(CvlabError, match="reported metric 'b' has no values"):
        Record(section="s", setting="x", values={"a": [1.0]}, report=[Metric(key="b")], command="c")
    with pytest.raises(CvlabError, match="2 seeds but"):
        Record(section="s", setting="x", values={"a": [1.0]}, seeds=[0, 1], report=[Metric(key="a")], command="c")
    p = tmp_path / "r.json"
    p.write_text(json.dumps({"section": "s", "setting": "x", "values": {}, "report": [], "command": "c", "typo": 1}))
    with pytest.raises(CvlabError, match=r"r\.json: .*typo"):
        load_record(p)
    p.write_text("{not json")
    with pytest.raises(CvlabError, match="not a readable results record"):
        load_record(p)


def test_sections_render_placeholders_and_refuse_orphans(tmp_path: Path) -> None:
    (tmp_path / "01-a").mkdir()
    save_record(Record(section="01-a", setting="one", values={"k": [1.0]}, report=[Metric(key="k")], command="c",
                       group="g"), tmp_path / "01-a" / "x.json")
    (tmp_path / "01-a.md").write_text("## A\n\n{{table:g}}\n")
    page = render_results(tmp_path)
    assert "## A" in page and "| one | k | 1.00 |" in page
    (tmp_path / "01-a.md").write_text("## A\n\nno table\n")
    with pytest.raises(CvlabError, match="shown by no"):
        render_results(tmp_path)
    (tmp_path / "01-a.md").write_text("## A\n\n{{table:other}}\n")
    with pytest.raises(CvlabError, match="has no records"):
        render_results(tmp_path)
    # an ungrouped placeholder takes the records no named group of the section takes
    save_record(Record(section="01-a", setting="two", values={"k": [2.0]}, report=[Metric(key="k")], command="c"),
                tmp_path / "01-a" / "y.json")
    (tmp_path / "01-a.md").write_text("## A\n\n{{table}}\n\n### G\n\n{{table:g}}\n")
    page = render_results(tmp_path)
    first, second = page.split("### G")
    assert "| two |" in first and "| one |" not in first and "| one |" in second and "| two |" not in second
    (tmp_path / "01-a.md").write_text("## A\n\n{{table}}\n")
    assert "| one |" in render_results(tmp_path) and "| two |" in render_results(tmp_path)


def test_check_fails_on_a_stale_page(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "01-a").mkdir()
    save_record(Record(section="01-a", setting="one", values={"k": [1.0]}, report=[Metric(key="k")], command="c"),
                tmp_path / "01-a" / "x.json")
    (tmp_path / "01-a.md").write_text("## A\n\n{{table}}\n")
    page = tmp_path / "R.md"
    assert results_main(["--dir", str(tmp_path), "--out", str(page)]) == 0
    assert results_main(["--dir", str(tmp_path), "--out", str(page), "--check"]) == 0
    page.write_text(page.read_text().replace("1.00", "2.00"))
    assert results_main(["--dir", str(tmp_path), "--out", str(page), "--check"]) == 1
    assert "is not the rendering" in capsys.readouterr().out


def test_record_from_seeds_reports_the_paper_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CVLAB_DATA", "/data/root")
    spec = {"name": "zskd_mnist", "paper": {"student:test/acc": 0.9877},
            "record": {"section": "02-zskd", "setting": "MNIST", "budget": "short"}}
    per_seed = {s: {"teacher": {"test/acc": 0.99, "fit/wall_s": 60.0},
                    "student": {"test/acc": 0.97 + s / 100, "val/acc": 0.96, "train/loss": 0.1}} for s in (0, 1)}
    r = record_from_seeds(spec, per_seed, "uv run cvlab run p.yaml --set x=/data/root/MNIST", wall_s={0: 600, 1: 720})
    assert r.section == "02-zskd" and r.setting == "MNIST" and r.seeds == [0, 1]
    assert r.values["student:test/acc"] == [0.97, 0.98] and "student:train/loss" not in r.values
    assert "student:val/acc" in r.values and [m.key for m in r.report] == ["student:test/acc"]
    assert r.report[0].scale == 100 and r.report[0].paper == pytest.approx(98.77)
    assert r.command == "uv run cvlab run p.yaml --set x=<data>/MNIST" and r.wall == "10-12 min per seed"


def test_portable_drops_this_machines_folders(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    assert portable(f"cvlab run {tmp_path}/p.yaml --root {tmp_path}", data_root="/d") == "cvlab run p.yaml --root ."
    assert portable("x /d/MNIST", data_root="/d") == "x <data>/MNIST"


@pytest.mark.parametrize("page", ["README.md", "docs/RESULTS.md", "docs/PERFORMANCE.md"])
def test_markdown_tables_are_unbroken(page: str) -> None:
    """Every table of the user-facing pages is one block: a row that starts a block is a header followed by its
    separator (a blank line inside a table would start a headerless block, which renders as text), and each row
    has the header's number of cells."""
    import re

    lines = (ROOT / page).read_text().splitlines()
    cells = None
    for i, line in enumerate(lines):
        if not line.startswith("|"):
            cells = None
            continue
        n = len(re.split(r"(?<!\\)\|", line.strip())) - 2
        if cells is None:
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            assert re.fullmatch(r"\|( *:?-+:? *\|)+", nxt.strip()), f"{page}:{i + 1}: a table row without a header"
            cells = n
        assert n == cells, f"{page}:{i + 1}: {n} cells, the header has {cells}"
