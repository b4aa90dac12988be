"""`make prep`: AVQA annotations + videos → 16 kHz mono WAVs and an AVQA manifest; MMSU parquet → jsonl."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile as sf

from benchmark_files import AVQA_ROWS, FIXTURES, MMSU_ROWS, mmsu_parquet_rows, write_mp4, write_parquet
from mapo.data import check
from mapo.data.prep import audio_question, main as prep_main
from mapo.data.validate import read_manifest


def test_video_becomes_audio_in_questions():
    assert audio_question("What is making the sound in the video?") == "What is making the sound in the audio?"
    assert audio_question("Video: are there two VIDEO clips or Videos?") == "Audio: are there two AUDIO clips or Audios?"
    assert audio_question("No such word") == "No such word"


def _peak_hz(samples: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / sr)[spectrum.argmax()])


def test_avqa_prep_extracts_audio_and_reports_bad_rows(tmp_path, capsys):
    pytest.importorskip("av")
    src = tmp_path / "avqa"
    # Videos built here with PyAV: a 440 Hz stereo 22.05 kHz AAC track with frames, and an audio-only 660 Hz one.
    write_mp4(src / "videos" / "vid_a.mp4", 440, seconds=0.5)
    write_mp4(src / "videos" / "vid_b.mp4", 660, seconds=0.5, video=False)
    (src / "videos" / "vid_broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video")
    (src / "val_qa.json").write_text(json.dumps(AVQA_ROWS, indent=2))
    (src / "train_qa.jsonl").write_text(json.dumps({"id": 7, "video_name": "vid_b", "question_text": "q?",
                                                    "multi_choice": ["x", "y"], "answer": 5}) + "\n")
    out = tmp_path / "out"
    assert prep_main(["avqa", str(src), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    # bad rows by file and line (the line where the JSON object starts), then the summary
    expected_problems = [
        f"{src / 'train_qa.jsonl'}:1: 7: 'answer' must be a 0-based index into the 2 choices, got 5",
        f"{src / 'val_qa.json'}:32: 103: video {src / 'videos' / 'vid_broken.mp4'}: unreadable video (Invalid data found when processing input)",
        f"{src / 'val_qa.json'}:47: 104: video vid_missing.mp4 not found",
    ]
    assert printed[:3] == expected_problems
    assert (out / "prep_report.txt").read_text().splitlines() == expected_problems
    rows = [json.loads(line) for line in (out / "val_qa.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [101, 102, 105]
    assert rows[0]["question_text"] == "What is making the sound in the audio?"
    assert rows[0]["source_question"] == "What is making the sound in the video?"
    assert rows[1]["question_text"] == "Audio: how many times does it ring?"
    assert [r["audio_path"] for r in rows] == ["audio/vid_a.wav", "audio/vid_b.wav", "audio/vid_a.wav"]
    assert (out / "train_qa.jsonl").read_text() == ""
    # 16 kHz mono 16-bit WAV holding the tone, at the tone's level (channels averaged, not summed)
    for name, freq in (("vid_a", 440), ("vid_b", 660)):
        samples, sr = sf.read(out / "audio" / f"{name}.wav", dtype="float32")
        info = sf.info(out / "audio" / f"{name}.wav")
        assert (sr, info.channels, info.subtype) == (16_000, 1, "PCM_16")
        assert abs(len(samples) - 8000) < 1100  # 0.5 s, plus the AAC encoder's priming
        assert abs(_peak_hz(samples, sr) - freq) < 5
        assert 0.25 < np.abs(samples).max() < 0.35
    # the manifest is one `make check` accepts, and reads as the AVQA layout with the answer as text
    assert check.main([str(out / "val_qa.jsonl")]) == 0
    records = read_manifest(out / "val_qa.jsonl").records
    assert [(r.id, r.answer, r.task, r.meta["question_type"]) for r in records] == [
        ("101", "piano", "avqa", "Which"), ("102", "one", "avqa", "Count"), ("105", "yes", "avqa", "Judge")]
    # a rerun keeps the extracted WAVs (resumable)
    stamp = (out / "audio" / "vid_a.wav").stat().st_mtime_ns
    assert prep_main(["avqa", str(src / "val_qa.json"), "--out", str(out), "--videos", str(src / "videos"), "--strict"]) == 1
    assert (out / "audio" / "vid_a.wav").stat().st_mtime_ns == stamp


def test_avqa_prep_on_the_committed_fixture(tmp_path, capsys):
    pytest.importorskip("av")
    assert prep_main(["avqa", str(FIXTURES / "avqa" / "val_qa.json"), "--out", str(tmp_path)]) == 0
    assert "2 row(s) left out" in capsys.readouterr().out
    assert len(read_manifest(tmp_path / "val_qa.jsonl").records) == 3


def test_prep_usage_errors(tmp_path, capsys):
    assert prep_main(["avqa", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "no such annotation file or folder" in capsys.readouterr().err


def test_mmsu_prep_from_parquet(tmp_path, capsys):
    pytest.importorskip("pyarrow")
    rows = mmsu_parquet_rows(FIXTURES / "MMSU")
    write_parquet(tmp_path / "hf" / "data" / "a.parquet", rows[:2])
    write_parquet(tmp_path / "hf" / "data" / "b.parquet", rows[2:] + rows[:1])  # a duplicate id across files
    out = tmp_path / "out"
    assert prep_main(["mmsu", str(tmp_path / "hf"), "--out", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"{tmp_path / 'hf' / 'data' / 'b.parquet'}:3: mmsu_0001: duplicate id (kept the first)"
    written = [json.loads(line) for line in (out / "mmsu.jsonl").read_text().splitlines()]
    assert [w["id"] for w in written] == [r["id"] for r in MMSU_ROWS]
    assert written[0]["audio_path"] == "audio/mmsu_0001.wav" and "audio" not in written[0]
    records = read_manifest(out / "mmsu.jsonl").records
    assert [r.answer for r in records] == ["sad", "rising", "3", "no"]
    shutil.rmtree(out / "audio")
    assert check.main([str(out / "mmsu.jsonl")]) == 1  # the clips are what the manifest points at
