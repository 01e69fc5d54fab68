"""The run-directory helpers every command writes through: atomic files and folders, checkpoint rotation,
metrics cut back on resume, and the settings guard."""

import json

import pytest

from astarpo.rundir import OutputError, atomic_path, check_same_settings, truncate_jsonl, write_json_atomic
from astarpo.training.checkpoint import Checkpoints


def test_atomic_path_replaces_only_when_complete(tmp_path):
    target = tmp_path / "out.json"
    write_json_atomic(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"a": 1}  # the old file survives an interrupted write
    folder = tmp_path / "final"
    for content in ("one", "two"):  # a folder is replaced whole, also over an existing one
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            (tmp / "f").write_text(content)
    assert (folder / "f").read_text() == "two" and not (tmp_path / ".final.tmp").exists()


def test_checkpoints_rotate_and_ignore_unfinished(tmp_path):
    ckpts = Checkpoints(tmp_path, keep=2)
    for step in (1, 2, 3):
        ckpts.save(step, lambda d: d.mkdir(), lambda d, s=step: (d / "s").write_text(str(s)))
    assert [p.name for p in ckpts.all()] == ["step-000002", "step-000003"]
    (tmp_path / ".step-000004.tmp").mkdir()  # a kill during the next save
    path, step = ckpts.latest()
    assert (path.name, step) == ("step-000003", 3) and not (tmp_path / ".step-000004.tmp").exists()
    assert Checkpoints(tmp_path / "none", keep=1).latest() == (None, 0)


def test_truncate_jsonl_keeps_finished_steps(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 0}\n{"step": 1}\n{"step": 2}\n{"step": 3, "rew')
    truncate_jsonl(f, 1)
    assert [json.loads(x)["step"] for x in f.read_text().splitlines()] == [0, 1]
    truncate_jsonl(f, 0)
    assert f.read_text() == ""


def test_check_same_settings(tmp_path):
    f = tmp_path / "run" / "settings.json"
    check_same_settings(f, {"a": 1}, "fix it")  # nothing there yet
    write_json_atomic(f, {"a": 1, "b": 2})
    check_same_settings(f, {"a": 1}, "fix it")
    with pytest.raises(OutputError, match="run holds a run with other settings \\(a: 1 -> 3\\); fix it"):
        check_same_settings(f, {"a": 3}, "fix it")
