"""`cvlab run`: stages in order, skip finished, resume killed, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cvlab.errors import CvlabError
from experiments.command_line import load_yaml_file
from experiments.pipeline import load_pipeline, run_pipeline
from tests.cli_runs import QUICKSTART, TINY_SHAPES


def _write(tmp_path: Path) -> Path:
    spec = {
        "name": "tiny",
        "stages": [
            {"name": "teacher", "command": "fit", "config": [str(QUICKSTART)],
             "args": TINY_SHAPES + ["--trainer.max_epochs=1"]},
            {
                "name": "evaluate",
                "command": "test",
                "config": [str(QUICKSTART)],
                "args": TINY_SHAPES + ["--ckpt_path=${teacher}/checkpoints/last.ckpt"],
            },
        ],
        "paper": {"evaluate:test/acc": 0.5},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.slow
def test_pipeline_runs_skips_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = _write(tmp_path)
    root = tmp_path / "runs"
    results = tmp_path / "RESULTS.md"
    m = run_pipeline(path, root=root, results_md=str(results))
    assert "test/acc" in m["evaluate"] and "fit/wall_s" in m["teacher"]
    # the evaluation stage tested exactly the teacher's weights
    assert m["evaluate"]["test/acc"] == pytest.approx(m["teacher"]["test/acc"])
    assert "| evaluate:test/acc |" in results.read_text()
    out = capsys.readouterr().out
    # second run: everything skipped
    run_pipeline(path, root=root)
    assert capsys.readouterr().out.count("done before, skipping") == 2
    # a killed teacher (checkpoint but no stage.json) is resumed, and the later stage is skipped
    (teacher_dir,) = (root / "tiny").glob("teacher-*")
    (teacher_dir / "stage.json").unlink()
    run_pipeline(path, root=root)
    out = capsys.readouterr().out
    assert "[teacher] resuming a killed run" in out and "[evaluate] done before" in out


def test_pipeline_changed_config_gets_new_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = _write(tmp_path)
    run_pipeline(path, root=tmp_path / "runs", dry_run=True)
    a = capsys.readouterr().out
    run_pipeline(path, root=tmp_path / "runs", sets=["*.trainer.max_epochs=3"], dry_run=True)
    b = capsys.readouterr().out
    assert "--trainer.max_epochs=3" in b
    folder = lambda out: [w for w in out.split() if w.startswith("--run.dir=")]  # noqa: E731
    assert folder(a) != folder(b)


def test_pipeline_errors_are_clear(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "x",
                                   "stages": [{"name": "a", "command": "train", "config": [str(QUICKSTART)]}]}))
    with pytest.raises(CvlabError, match="command 'train' is not one of"):
        load_pipeline(bad)
    bad.write_text(yaml.safe_dump({"name": "x", "stages": [{"name": "a", "config": ["nope.yaml"]}]}))
    with pytest.raises(CvlabError, match="config file not found: nope.yaml"):
        load_pipeline(bad)
    bad.write_text(yaml.safe_dump({"name": "x",
                                   "stages": [{"name": "a", "config": [str(QUICKSTART)], "args": ["--x=${later}"]}]}))
    with pytest.raises(CvlabError, match="not an earlier stage"):
        run_pipeline(bad, root=tmp_path, dry_run=True)
    with pytest.raises(CvlabError, match="no stage named 'b'"):
        run_pipeline(_write(tmp_path), root=tmp_path, sets=["b.trainer.max_epochs=1"], dry_run=True)
    with pytest.raises(CvlabError, match="pipeline file not found"):
        load_pipeline(tmp_path / "missing.yaml")


def test_pipeline_only_runs_the_named_stages(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = _write(tmp_path)
    run_pipeline(path, root=tmp_path / "runs", dry_run=True, only=["teacher"])
    out = capsys.readouterr().out
    assert "[teacher] " in out and "[evaluate] not in --only, not run" in out
    with pytest.raises(CvlabError, match="stage 'teacher' is needed by --only"):
        run_pipeline(path, root=tmp_path / "runs", dry_run=True, only=["evaluate"])
    with pytest.raises(CvlabError, match="--only 'nope': no such stage"):
        run_pipeline(path, root=tmp_path / "runs", dry_run=True, only=["nope"])


def test_seeds_with_only_reads_the_finished_stages_of_that_seed(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    """`--seeds N --only B`: the stage B reads (finished by an earlier `--seeds N` run) is found in its seed's
    folder, not asked for again (the seed's overrides give every stage the folder a full run gives it)."""
    from experiments.pipeline import run_seeds

    path = _write(tmp_path)
    run_seeds(path, [3], root=tmp_path / "runs", dry_run=True, only=["teacher"])
    (teacher,) = [w.split("=", 1)[1] for w in capsys.readouterr().out.split() if w.startswith("--run.dir=")]
    assert "/seed-3/teacher-" in teacher and "--seed_everything=3" not in teacher
    Path(teacher).mkdir(parents=True)
    (Path(teacher) / "stage.json").write_text("{}")
    run_seeds(path, [3], root=tmp_path / "runs", dry_run=True, only=["evaluate"])
    out = capsys.readouterr().out
    assert f"[teacher] done before, skipping: {teacher}" in out and f"--ckpt_path={teacher}/checkpoints" in out
    with pytest.raises(CvlabError, match="stage 'teacher' is needed by --only"):  # another seed: not finished
        run_seeds(path, [4], root=tmp_path / "runs", dry_run=True, only=["evaluate"])


def test_a_misspelled_override_fails_before_any_stage_runs(tmp_path: Path) -> None:
    from cvlab.errors import CvlabError
    from experiments.pipeline import run_pipeline

    pipe = tmp_path / "p.yaml"
    pipe.write_text(
        "name: typo\nstages:\n"
        "  - {name: teacher, command: fit, config: [experiments/quickstart.yaml]}\n"
        "  - name: student\n    command: fit\n    config: [experiments/zskd/shapes/student_real.yaml]\n"
        "    args: {model.init_args.teacher: '${teacher}/checkpoints/last.ckpt'}\n")
    with pytest.raises(CvlabError, match=r"stage 'student': --model.init_args.temprature is not an option of fit; "
                                         r"did you mean --model.init_args.temperature\? .*; nothing was run"):
        run_pipeline(pipe, root=tmp_path / "runs", sets=["student.model.init_args.temprature=3"])
    with pytest.raises(CvlabError, match="stage 'teacher': --trainer.max_epochs expects int .*got 'many'"):
        run_pipeline(pipe, root=tmp_path / "runs", sets=["*.trainer.max_epochs=many"])
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("config.yaml"))


def test_stage_hash_follows_config_content_not_comments(tmp_path: Path) -> None:
    from experiments.pipeline import Stage, stage_hash

    cfg = tmp_path / "c.yaml"
    cfg.write_text("trainer:\n  max_epochs: 20   # twenty\nmodel: {lr: 0.1}\n")
    stage = Stage("s", "fit", [str(cfg)], [])
    before = stage_hash(stage, ["--seed_everything=0"])
    cfg.write_text("# a new comment\ntrainer:\n    max_epochs: 20  # a changed comment, another indent\n"
                   "model:\n  lr: 0.1\n")
    assert stage_hash(stage, ["--seed_everything=0"]) == before
    cfg.write_text("trainer:\n  max_epochs: 21\nmodel: {lr: 0.1}\n")
    assert stage_hash(stage, ["--seed_everything=0"]) != before
    assert stage_hash(stage, ["--seed_everything=1"]) != stage_hash(stage, ["--seed_everything=0"])
    cfg.write_text("trainer: [unclosed\n")
    with pytest.raises(CvlabError, match="not valid YAML"):
        stage_hash(stage, [])
    cfg.write_text("trainer:\n  max_epochs: 2\nmodel: {lr: 0.1}\ntrainer:\n  max_epochs: 3\n")
    with pytest.raises(CvlabError, match=r"config .*: key 'trainer' is written twice .*lines 1 and 4"):
        stage_hash(stage, [])


def test_yaml_files_reject_a_key_written_twice(tmp_path: Path) -> None:
    """``load_yaml_file``: a duplicate key (block or flow style, at any depth) is an error naming both lines; an
    override of a merged (<<) key and equal list items are not duplicates; a pipeline file with two ``record:``
    blocks stops ``cvlab run`` before anything runs."""
    f = tmp_path / "x.yaml"
    f.write_text("a: 1\nb:\n  c: 2\n  d: 3\n  c: 4\n")
    with pytest.raises(CvlabError, match=r"^sweep file .*x.yaml: key 'c' is written twice .*lines 3 and 5"):
        load_yaml_file(f, "sweep file")
    f.write_text("x: {a: 1, a: 2}\n")
    with pytest.raises(CvlabError, match="key 'a' is written twice"):
        load_yaml_file(f)
    f.write_text("base: &b {a: 1, k: 0}\nd:\n  <<: *b\n  a: 2\nr: [{k: 1}, {k: 1}]\n")
    assert load_yaml_file(f) == {"base": {"a": 1, "k": 0}, "d": {"a": 2, "k": 0}, "r": [{"k": 1}, {"k": 1}]}
    with pytest.raises(CvlabError, match="cannot read config file"):
        load_yaml_file(tmp_path / "missing.yaml")
    pipe = tmp_path / "p.yaml"
    pipe.write_text("name: p\nstages:\n  - {name: a, command: fit, config: []}\nrecord: {section: s}\n"
                    "record: {section: t}\n")
    with pytest.raises(CvlabError, match=r"^pipeline file .*p.yaml: key 'record' is written twice .*lines 4 and 5"):
        load_pipeline(pipe)
