"""Benchmark layouts as released (MMAU, MMAR, MMSU jsonl and parquet): the committed fixtures and variants."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from benchmark_files import FIXTURES, MMSU_ROWS, mmsu_parquet_rows, write_parquet, write_tone
from mapo.data import check
from mapo.data.adapters import hidden_answers_allowed, layout_notes
from mapo.data.validate import ManifestError, read_manifest, scan_manifest
from mapo.eval.benchmark import load_benchmark


def test_mmau_test_mini_fixture():
    result = read_manifest(FIXTURES / "mmau" / "mmau-test-mini.json")
    assert result.layout == "mmau" and result.bad == []
    one, two, three, four = result.records
    audio = FIXTURES / "mmau" / "test-mini-audios"
    assert [r.audio for r in result.records] == [str(audio / f"mmau-{k}.wav") for k in (1, 2, 3, 4)]
    assert (one.task, one.split, one.category, one.answer) == ("sound", "test-mini", "Sound Event Recognition", "Dog barking")
    assert one.meta == {"dataset": "fixture", "sub-category": "Animal sounds", "difficulty": "easy"}
    # key order differs; a list category is joined, the list kept; a null sub-category stays null
    assert (two.id, two.task, two.answer, two.answer_index) == ("mmau-2", "music", "Violin", 2)
    assert two.category == "Instrument Identification; Timbre"
    assert two.meta["category_list"] == ["Instrument Identification", "Timbre"] and two.meta["sub-category"] is None
    # duplicated choice strings are kept as released and marked
    assert three.choices == ["Happy", "Sad", "Happy", "Angry"] and three.answer == "Happy"
    assert three.meta["duplicate_choices"] == ["Happy"]
    assert four.meta["duplicate_choices"] == ["Two"] and four.answer_index == 3
    assert layout_notes(result.records) == [
        "2 row(s) have duplicated choice strings (1 of them duplicate the answer); kept as released, scoring compares texts"
    ]


def test_our_layout_still_refuses_duplicated_choices(tmp_path):
    write_tone(tmp_path / "a.wav", 440)
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "x", "audio": "a.wav", "question": "q",
                                                  "choices": ["yes", "yes"], "answer": "yes"}) + "\n")
    (bad,) = scan_manifest(tmp_path / "m.jsonl").bad
    assert bad.problem == "duplicate choice 'yes' in 'choices'"


def test_mmau_test_split_hides_its_answers():
    path = FIXTURES / "mmau" / "mmau-test.json"
    # Outside evaluation a hidden answer is a bad row: nothing trains on it.
    with pytest.raises(ManifestError, match="mmau-test.json:2: mmau-t1: empty 'answer': the answer is hidden"):
        read_manifest(path)
    with hidden_answers_allowed():
        records = read_manifest(path).records
    assert [(r.id, r.answer, r.meta["answer_hidden"]) for r in records] == [("mmau-t1", "", True), ("mmau-t2", "", True)]
    assert records[0].audio == str(FIXTURES / "mmau" / "test-audios" / "mmau-t1.wav")
    assert layout_notes(records) == [
        "2 row(s) have a hidden answer (e.g. the MMAU test split): accuracy cannot be computed"
    ]
    # the context is left as it was: hidden answers are bad rows again
    assert len(scan_manifest(path).bad) == 2


def test_mmar_meta_fixture_matches_answers_by_tokens():
    result = read_manifest(FIXTURES / "mmar" / "MMAR-meta.json")
    assert result.layout == "mmar" and result.bad == []
    one, two, three = result.records
    assert (one.task, one.category, one.answer, one.split) == ("sound", "Signal Layer", "three", "test")
    assert one.audio == str(FIXTURES / "mmar" / "audio" / "mmar-1.wav")
    assert one.meta == {"sub-category": "Counting", "language": "None", "source": "fixture",
                        "url": "https://example.org/v", "timestamp": "00:00:01-00:00:02"}
    assert (two.answer, two.meta["source_answer"]) == ("Piano", "piano.")
    assert (three.task, three.answer, three.meta["source_answer"]) == ("mix-sound-speech", "Angry", "The speaker is angry")
    assert layout_notes(result.records) == [
        "2 answer(s) are not literally a choice; matched to a choice by the benchmark tokenisation "
        "(benchmark scoring uses the source text, as the benchmark's script does)"
    ]


def test_mmar_answer_naming_no_choice_is_a_bad_row(tmp_path):
    shutil.copytree(FIXTURES / "mmar", tmp_path / "mmar")
    meta = tmp_path / "mmar" / "MMAR-meta.json"
    rows = json.loads(meta.read_text())
    rows[0]["answer"] = "two or three"
    meta.write_text(json.dumps(rows, indent=1))
    (bad,) = scan_manifest(meta).bad
    assert (bad.line, bad.id, bad.problem) == (2, "mmar-1", "answer 'two or three' is not among the choices ['two', 'three', 'four']")


def test_mmsu_jsonl_fixture():
    result = read_manifest(FIXTURES / "MMSU" / "question" / "mmsu.jsonl")
    assert result.layout == "mmsu" and result.bad == []
    one, two, three, four = result.records
    # "/audio/<id>.wav" means the MMSU folder, the parent of question/
    assert one.audio == str(FIXTURES / "MMSU" / "audio" / "mmsu_0001.wav")
    assert (one.task, one.category, one.choices, one.answer) == (
        "emotion_recognition", "perception", ["happy", "sad", "angry", "neutral"], "sad")
    assert one.meta == {"sub-category": "paralinguistics", "sub-sub-category": "fixture",
                        "linguistics_sub_discipline": "phonetics"}
    assert two.choices == ["rising", "falling", "flat"]  # choice_d null: no such option
    assert (three.choices, three.answer) == (["1", "2", "3", "4"], "3")  # numbers become text
    assert (four.choices, four.answer) == (["yes", "no"], "no")  # answer_gt "B" is a letter
    assert layout_notes(result.records) == []


def test_mmsu_audio_next_to_the_manifest_is_found_too(tmp_path):
    # A flat copy (manifest and audio/ in one folder) resolves against the manifest's own folder.
    for row in MMSU_ROWS[:1]:
        write_tone(tmp_path / "audio" / f"{row['id']}.wav", 500)
    (tmp_path / "mmsu.jsonl").write_text(json.dumps(MMSU_ROWS[0]) + "\n")
    (record,) = read_manifest(tmp_path / "mmsu.jsonl").records
    assert record.audio == str(tmp_path / "audio" / "mmsu_0001.wav")
    # missing everywhere: the error names the path under the manifest's folder
    (tmp_path / "mmsu.jsonl").write_text(json.dumps({**MMSU_ROWS[0], "audio_path": "/audio/nope.wav"}) + "\n")
    (bad,) = scan_manifest(tmp_path / "mmsu.jsonl").bad
    assert bad.problem == f"audio file not found: {tmp_path / 'audio' / 'nope.wav'}"


def test_mmsu_bad_choices(tmp_path):
    write_tone(tmp_path / "audio" / "mmsu_0001.wav", 500)
    base = {**MMSU_ROWS[0], "audio_path": "audio/mmsu_0001.wav"}
    rows = [{**base, "id": "n", "choice_a": None, "choice_b": None, "choice_c": None, "choice_d": None},
            {**base, "id": "b", "choice_b": True},
            {**base, "id": "x", "answer_gt": "E"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [(b.id, b.problem) for b in scan_manifest(tmp_path / "m.jsonl").bad] == [
        ("n", "no choices: every choice_a … field is missing or null"),
        ("b", "wrong type: 'choice_b' is bool, expected a string or a number"),
        ("x", "answer 'E' is not among the choices ['happy', 'sad', 'angry', 'neutral']"),
    ]


def test_mmsu_parquet_with_embedded_audio(tmp_path):
    pytest.importorskip("pyarrow")
    path = write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", mmsu_parquet_rows(FIXTURES / "MMSU"))
    result = read_manifest(path)
    assert result.layout == "mmsu" and result.bad == []
    clips = tmp_path / "data" / "test-00000-of-00001_audio"
    assert [r.audio for r in result.records] == [str(clips / f"{row['id']}.wav") for row in MMSU_ROWS]
    # the clips are the embedded bytes, unchanged
    for row in MMSU_ROWS:
        assert (clips / f"{row['id']}.wav").read_bytes() == (FIXTURES / "MMSU" / row["audio_path"].lstrip("/")).read_bytes()
    jsonl = read_manifest(FIXTURES / "MMSU" / "question" / "mmsu.jsonl").records
    strip = lambda r: (r.id, r.question, r.choices, r.answer, r.task, r.category, r.meta)  # noqa: E731
    assert [strip(r) for r in result.records] == [strip(r) for r in jsonl]
    # a second read reuses the clips (same size: not rewritten)
    stamp = (clips / "mmsu_0001.wav").stat().st_mtime_ns
    read_manifest(path)
    assert (clips / "mmsu_0001.wav").stat().st_mtime_ns == stamp


def test_the_committed_parquet_fixture_reads_as_the_jsonl_release(tmp_path):
    """tests/fixtures/mmsu_hf holds a parquet file in the Hub layout (what `make prep BENCH=mmsu` and the
    README's fixture commands use); read from a copy so its clips land under tmp_path."""
    pytest.importorskip("pyarrow")
    committed = sorted((FIXTURES / "mmsu_hf").rglob("*.parquet"))
    assert len(committed) == 1
    copy = tmp_path / committed[0].name
    shutil.copyfile(committed[0], copy)
    result = read_manifest(copy)
    assert result.layout == "mmsu" and result.bad == []
    jsonl = read_manifest(FIXTURES / "MMSU" / "question" / "mmsu.jsonl").records
    strip = lambda r: (r.id, r.question, r.choices, r.answer, r.task, r.category, r.meta)  # noqa: E731
    assert [strip(r) for r in result.records] == [strip(r) for r in jsonl]
    for record in result.records:  # the embedded clips are the release's files, byte for byte
        assert Path(record.audio).read_bytes() == (FIXTURES / "MMSU" / "audio" / f"{record.id}.wav").read_bytes()


def test_parquet_bad_file_and_bad_row(tmp_path):
    pytest.importorskip("pyarrow")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(ManifestError, match=r"broken\.parquet: not a readable parquet file"):
        read_manifest(broken)
    rows = mmsu_parquet_rows(FIXTURES / "MMSU")
    rows[1]["audio"] = None  # a row without its clip is reported with its row number
    path = write_parquet(tmp_path / "m.parquet", rows)
    (bad,) = scan_manifest(path).bad
    assert (bad.line, bad.id, bad.problem) == (2, "mmsu_0002", "missing field(s): audio_path")


def test_check_cli_accepts_every_fixture(capsys):
    for path in ("mmau/mmau-test-mini.json", "mmar/MMAR-meta.json", "MMSU/question/mmsu.jsonl"):
        assert check.main([str(FIXTURES / path)]) == 0
    assert capsys.readouterr().out.splitlines() == ["4 rows, 0 bad", "3 rows, 0 bad", "4 rows, 0 bad"]


def test_load_benchmark_limit_and_notes():
    bench = load_benchmark(FIXTURES / "mmau" / "mmau-test-mini.json", limit=2)
    # evenly over tasks: sound, music, speech → 2 // 3 = 0 → at least one per task
    assert [r.id for r in bench.records] == ["mmau-2", "mmau-1", "mmau-3"]
    assert bench.layout == "mmau" and bench.name == "mmau-test-mini"
    assert bench.notes == [
        "1 row(s) have duplicated choice strings (1 of them duplicate the answer); kept as released, scoring compares texts",
        "limited to 3 of 4 items, evenly over tasks",
    ]
    hidden = load_benchmark(FIXTURES / "mmau" / "mmau-test.json", check_audio=False)
    assert [r.answer for r in hidden.records] == ["", ""]


def test_detection_order(tmp_path):
    # A row with the MMAR keys and our keys reads as MMAR; our layout (key `audio`) stays ours.
    from mapo.data.adapters import detect_layout

    assert detect_layout(json.loads((FIXTURES / "mmar" / "MMAR-meta.json").read_text())[0]) == "mmar"
    assert detect_layout(MMSU_ROWS[0]) == "mmsu"
    assert detect_layout({"id": 1, "audio": None, "question": "q", "choices": ["a"], "answer": "a"}) == "ours"
    assert Path(FIXTURES).is_dir()
