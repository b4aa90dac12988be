"""mapo.atomic: the target is replaced whole on success, left as it was on failure, and no temporary stays."""

from __future__ import annotations

import enum
import json
import os
from pathlib import Path

import numpy as np
import pytest

from mapo.atomic import (
    replacing,
    write_json_atomic,
    write_jsonl_atomic,
    write_text_atomic,
)


class _Boom(RuntimeError):
    pass


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_file_replaces_the_old_one_and_no_temporary_stays(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with replacing(target) as tmp:
        assert tmp.parent == tmp_path  # same folder: the rename is atomic
        assert tmp != target and not tmp.exists()
        tmp.write_bytes(b"new")
        assert target.read_text() == "old"  # readers still see the old file while it is written
    assert target.read_bytes() == b"new"
    assert _names(tmp_path) == ["out.txt"]


def test_a_writer_that_raises_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(_Boom), replacing(target) as tmp:
        tmp.write_text("half")
        raise _Boom
    assert target.read_text() == "old"
    assert _names(tmp_path) == ["out.txt"]


def test_a_writer_that_raises_before_any_file_leaves_no_target(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    with pytest.raises(_Boom), replacing(target):
        raise _Boom
    assert _names(tmp_path / "sub") == []  # the folder is made, nothing in it


def test_a_folder_replaces_the_old_folder_whole(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale.bin").write_text("x")
    with replacing(target) as tmp:
        tmp.mkdir()
        (tmp / "weights.bin").write_text("w")
    assert _names(target) == ["weights.bin"]
    assert _names(tmp_path) == ["model"]


def test_a_failed_folder_write_keeps_the_old_folder(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights.bin").write_text("old")
    with pytest.raises(_Boom), replacing(target) as tmp:
        tmp.mkdir()
        (tmp / "weights.bin").write_text("new")
        raise _Boom
    assert (target / "weights.bin").read_text() == "old"
    assert _names(tmp_path) == ["model"]


def test_a_stale_temporary_of_this_process_is_cleared_first(tmp_path):
    target = tmp_path / "model"
    stale = tmp_path / f".model.tmp{os.getpid()}"
    stale.mkdir()
    (stale / "leftover").write_text("from a killed run")
    with replacing(target) as tmp:
        assert tmp == stale and not tmp.exists()
        tmp.mkdir()
    assert _names(target) == []
    assert _names(tmp_path) == ["model"]


def test_a_block_that_makes_nothing_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError), replacing(tmp_path / "out.txt"):
        pass
    assert _names(tmp_path) == []


def test_text_json_and_jsonl_writers_give_these_bytes(tmp_path):
    class Colour(enum.Enum):
        RED = "red"

    write_text_atomic(tmp_path / "a.md", "ü\n")
    assert (tmp_path / "a.md").read_bytes() == "ü\n".encode()
    write_json_atomic(tmp_path / "b.json", {"p": Path("x/y"), "n": np.float32(0.5), "c": Colour.RED})
    assert (tmp_path / "b.json").read_text() == '{\n  "p": "x/y",\n  "n": 0.5,\n  "c": "red"\n}\n'
    write_jsonl_atomic(tmp_path / "c.jsonl", ({"id": i, "t": "é"} for i in range(2)))
    assert (tmp_path / "c.jsonl").read_text(encoding="utf-8") == '{"id": 0, "t": "é"}\n{"id": 1, "t": "é"}\n'
    assert [json.loads(line)["id"] for line in (tmp_path / "c.jsonl").read_text().splitlines()] == [0, 1]


def test_json_that_cannot_be_written_leaves_the_old_file(tmp_path):
    target = tmp_path / "b.json"
    target.write_text("{}\n")
    with pytest.raises(TypeError, match="value of type object is not JSON serialisable"):
        write_json_atomic(target, {"x": object()})
    assert target.read_text() == "{}\n"
    assert _names(tmp_path) == ["b.json"]


def _dead_pid() -> int:
    """A process id that no process has now (a finished child's)."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_what_killed_writers_of_a_folder_left_is_cleared(tmp_path):
    """Other processes' leftovers beside a folder: a dead writer's temporary and set-aside old folder go when
    the folder is next written; a live writer's temporary stays (it may still be writing); a file write and
    another target's write leave them alone (they do not list the folder)."""
    dead = _dead_pid()
    target = tmp_path / "final_model"
    target.mkdir()
    (tmp_path / f".final_model.tmp{dead}").mkdir()
    (tmp_path / f".final_model.tmp{dead}" / "half.safetensors").write_text("half")
    (tmp_path / f".final_model.old{dead}").mkdir()
    live = tmp_path / f".final_model.tmp{os.getppid()}"  # the test runner's parent: alive
    live.mkdir()
    (tmp_path / ".other.tmp1").write_text("another target's")
    leftovers = sorted([f".final_model.old{dead}", f".final_model.tmp{dead}", ".other.tmp1", live.name])
    write_text_atomic(tmp_path / "unrelated.txt", "x")
    assert _names(tmp_path) == sorted([*leftovers, "final_model", "unrelated.txt"])
    with replacing(target) as tmp:
        tmp.mkdir()
        (tmp / "weights.bin").write_text("new")
    assert (target / "weights.bin").read_text() == "new"
    assert _names(tmp_path) == sorted([".other.tmp1", live.name, "final_model", "unrelated.txt"])


def test_a_failed_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights.bin").write_text("old")
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(src).name.startswith(".model.tmp"):
            raise OSError("disk went away")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk went away"), replacing(target) as tmp:
        tmp.mkdir()
        (tmp / "weights.bin").write_text("new")
    assert (target / "weights.bin").read_text() == "old"
    assert _names(tmp_path) == ["model"]


def test_a_file_write_does_not_list_the_folder_even_for_its_own_leftovers(tmp_path):
    """File writes skip the listing (a data folder may hold many thousands of files written one by one): a
    dead writer's temporary of the very file being written stays; a folder write clears its own."""
    dead = _dead_pid()
    own_file_leftover = tmp_path / f".out.txt.tmp{dead}"
    own_file_leftover.write_text("half")
    write_text_atomic(tmp_path / "out.txt", "new")
    assert (tmp_path / "out.txt").read_text() == "new"
    assert _names(tmp_path) == sorted([own_file_leftover.name, "out.txt"])
    (tmp_path / f".cache.tmp{dead}").mkdir()
    with replacing(tmp_path / "cache") as tmp:
        tmp.mkdir()
    assert _names(tmp_path) == sorted([own_file_leftover.name, "cache", "out.txt"])
