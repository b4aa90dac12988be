"""Audio loading, the three manifest adapters, every kind of bad row, skip_bad and the check CLI."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from mapo.data import validate
from mapo.data.audio import AudioError, load_audio, probe_audio
from mapo.data.schema import Record
from mapo.data.validate import ManifestError, ManifestFormatError, read_manifest, scan_manifest

torch.set_num_threads(1)

PYTHON = "/work/main/.venv/bin/python" if Path("/work/main/.venv/bin/python").exists() else sys.executable


def write_wav(path: Path, samples: np.ndarray, sr: int = 16_000) -> Path:
    """samples: [n] or [n, channels]; stored as 32-bit float so values round-trip exactly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), samples.astype(np.float32), sr, subtype="FLOAT")
    return path


def sine(freq: float, seconds: float, sr: int, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


# ------------------------------------------------------------------------------------------ audio


def test_stereo_opposite_channels_mix_to_silence_and_length_follows_16k(tmp_path):
    x = sine(440, 0.5, 44_100)  # 22050 frames
    path = write_wav(tmp_path / "opposite.wav", np.stack([x, -x], axis=1), sr=44_100)
    mono = load_audio(path)
    # 0.5 s at 16 kHz = 8000 samples (22050 * 16000 / 44100 = 8000 exactly).
    assert mono.dtype == np.float32 and mono.shape == (8000,)
    # mean(x, -x) = 0 per frame, and resampling silence gives silence.
    assert np.max(np.abs(mono)) < 1e-7


def test_stereo_is_averaged_not_first_channel(tmp_path):
    x = sine(440, 0.5, 44_100, amplitude=0.8)
    path = write_wav(tmp_path / "mixed.wav", np.stack([x, 0.25 * x], axis=1), sr=44_100)
    mono = load_audio(path)
    # mean(0.8 s, 0.2 s) = 0.5 s: a 440 Hz sine of amplitude 0.5 (channel 0 alone would give 0.8).
    middle = mono[2000:6000]  # away from the resampler's edge transients
    assert abs(np.max(np.abs(middle)) - 0.5) < 5e-3


def test_1khz_sine_keeps_its_fft_peak_after_resampling(tmp_path):
    path = write_wav(tmp_path / "tone.wav", sine(1000, 1.0, 44_100), sr=44_100)
    mono = load_audio(path)
    assert mono.shape == (16_000,)  # 1 s at 16 kHz
    spectrum = np.abs(np.fft.rfft(mono))
    # rfft of 16000 samples at 16 kHz: bin k is k * 16000 / 16000 = k Hz, so 1 kHz is bin 1000.
    assert int(np.argmax(spectrum)) == 1000
    # Nearly all the energy stays at 1 kHz (no aliasing or images from a poor filter).
    assert (spectrum[995:1006] ** 2).sum() / (spectrum**2).sum() > 0.999


def test_16k_mono_passes_through_unchanged(tmp_path):
    x = sine(300, 0.1, 16_000)
    mono = load_audio(write_wav(tmp_path / "m.wav", x))
    np.testing.assert_array_equal(mono, x)


def test_audio_errors_name_the_kind(tmp_path):
    write_wav(tmp_path / "empty.wav", np.zeros((0, 1)))
    (tmp_path / "zero_bytes.wav").write_bytes(b"")
    (tmp_path / "garbage.wav").write_text("not audio at all " * 8)
    expected = {
        "nope.wav": ("missing", "audio file not found"),
        "garbage.wav": ("unreadable", "unreadable audio"),
        "empty.wav": ("empty", "empty audio (0 samples)"),
        "zero_bytes.wav": ("empty", "empty audio (0-byte file)"),
    }
    for name, (kind, problem) in expected.items():
        for reader in (load_audio, probe_audio):
            with pytest.raises(AudioError) as info:
                reader(tmp_path / name)
            assert info.value.kind == kind and info.value.problem.startswith(problem)
            assert str(tmp_path / name) in str(info.value)
    assert probe_audio(write_wav(tmp_path / "ok.wav", np.zeros(123))) == 123


# ------------------------------------------------------------------------------------ adapters


@pytest.fixture()
def clips(tmp_path):
    write_wav(tmp_path / "clips" / "a.wav", sine(440, 0.1, 16_000))
    write_wav(tmp_path / "clips" / "b.wav", sine(880, 0.1, 16_000))
    return tmp_path


def test_ours_layout_round_trips_records(clips):
    records = [
        Record("r1", "clips/a.wav", "Higher or lower?", ["higher", "lower"], "lower", task="pitch",
               split="test", category="c", trace="the second is lower", meta={"seed": 3}),
        Record("r2", None, "Text only?", ["yes", "no"], "yes"),
    ]
    manifest = clips / "ours.jsonl"
    manifest.write_text("\n".join(json.dumps(r.to_json()) for r in records) + "\n")
    result = read_manifest(manifest)
    assert result.layout == "ours" and result.bad == [] and result.skipped == 0
    expected_first = Record(**{**records[0].to_json(), "audio": str(clips / "clips" / "a.wav")})
    assert result.records == [expected_first, records[1]]


def test_mmau_layout_maps_fields_and_resolves_dot_paths(clips):
    rows = [
        {"id": "m-1", "audio_id": "./clips/a.wav", "question": "What plays?", "choices": ["Piano", "Dog"],
         "answer": "Piano", "task": "music", "category": "Instrument", "sub-category": "Solo",
         "difficulty": "easy", "dataset": "x", "split": "test-mini"},
        {"id": "m-2", "audio_id": "./clips/b.wav", "question": "Who speaks?", "choices": ["A", "B"],
         "answer": "B ", "task": "speech"},  # stray space: matched to the unique stripped choice "B"
    ]
    manifest = clips / "mmau.json"
    manifest.write_text(json.dumps(rows, indent=4))
    result = read_manifest(manifest)
    assert result.layout == "mmau" and result.bad == []
    first, second = result.records
    assert first == Record("m-1", str(clips / "clips" / "a.wav"), "What plays?", ["Piano", "Dog"], "Piano",
                           task="music", split="test-mini", category="Instrument",
                           meta={"sub-category": "Solo", "difficulty": "easy", "dataset": "x"})
    assert second.answer == "B" and second.answer_index == 1 and second.split == "test"
    assert second.category is None and second.meta == {}


def test_avqa_layout_turns_the_index_into_the_choice_text(clips):
    rows = [
        {"id": 7, "question_text": "What makes the sound?", "multi_choice": ["car", "bird", "rain", "bell"],
         "answer": 2, "audio_path": "clips/b.wav", "question_type": "Which", "question_relation": "Both",
         "video_name": "-abc_000010"},
    ]
    manifest = clips / "avqa.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (record,) = read_manifest(manifest).records
    assert record == Record("7", str(clips / "clips" / "b.wav"), "What makes the sound?",
                            ["car", "bird", "rain", "bell"], "rain", task="avqa",
                            meta={"question_type": "Which", "question_relation": "Both",
                                  "video_name": "-abc_000010"})


def test_relative_audio_resolves_against_the_manifest_folder_not_the_cwd(clips, monkeypatch):
    (clips / "m.jsonl").write_text(json.dumps(Record("a", "clips/a.wav", "q", ["x", "y"], "x").to_json()))
    monkeypatch.chdir(clips.parent)
    (record,) = read_manifest(Path(clips.name) / "m.jsonl").records
    assert record.audio == str(clips / "clips" / "a.wav")


def test_unknown_layout_lists_the_valid_ones(tmp_path):
    manifest = tmp_path / "odd.jsonl"
    manifest.write_text(json.dumps({"id": 1, "prompt": "?", "label": 0}) + "\n")
    with pytest.raises(ManifestFormatError, match=r"odd\.jsonl:1: cannot tell the layout") as info:
        read_manifest(manifest)
    for name in ("ours", "mmau", "avqa"):
        assert name in str(info.value)
    with pytest.raises(ValueError, match="valid: auto, mmau, avqa, mmar, mmsu, ours"):
        read_manifest(manifest, layout="csv")


def test_explicit_layout_overrides_detection(clips):
    # An AVQA row read as "ours" lacks ours' fields: the chosen layout is the one that is enforced.
    manifest = clips / "avqa.jsonl"
    manifest.write_text(json.dumps({"id": 1, "question_text": "q", "multi_choice": ["a"], "answer": 0,
                                    "audio_path": "clips/a.wav"}) + "\n")
    (bad,) = scan_manifest(manifest, layout="ours").bad
    assert bad.problem == "missing field(s): question, choices"


# ------------------------------------------------------------------------------------ bad rows


def _ours(row_id, audio="clips/a.wav", **fields):
    row = {"id": row_id, "audio": audio, "question": "q?", "choices": ["yes", "no"], "answer": "yes"}
    row.update(fields)
    return json.dumps({k: v for k, v in row.items() if v is not _DROP})


_DROP = object()

# Line number -> (id in the report, exact problem). "{clips}" is the absolute clip folder.
OURS_BAD_ROWS = {
    2: ("?", "invalid JSON: Expecting value at column 8"),
    3: ("r3", "missing field(s): choices, answer"),
    4: ("r4", "wrong type: 'choices' is str, expected a list of strings"),
    5: ("r5", "empty choices: 'choices' is []"),
    6: ("r1", "duplicate id (first at line 1)"),
    7: ("r7", "answer 'maybe' is not among the choices ['yes', 'no']"),
    8: ("r8", "audio file not found: {clips}/nope.wav"),
    9: ("r9", "unreadable audio (Error opening '{clips}/garbage.wav': Format not recognised.): {clips}/garbage.wav"),
    10: ("r10", "empty audio (0 samples): {clips}/empty.wav"),
    11: ("r11", "empty audio (0-byte file): {clips}/zero.wav"),
    13: ("?", "wrong type: row is list, expected an object"),
    14: ("r14", "wrong type: 'question' is int, expected a string"),
    15: ("r15", "missing field(s): audio (use null for a text-only item)"),
    16: ("r16", "duplicate choice 'yes' in 'choices'"),
    17: ("r17", "wrong type: 'choices'[1] is int, expected a string"),
}


@pytest.fixture()
def bad_ours(clips):
    write_wav(clips / "clips" / "empty.wav", np.zeros((0, 1)))
    (clips / "clips" / "zero.wav").write_bytes(b"")
    (clips / "clips" / "garbage.wav").write_text("RIFF but not really " * 4)
    lines = [
        _ours("r1"),                                      # 1 good
        '{"id": ',                                        # 2
        _ours("r3", choices=_DROP, answer=_DROP),         # 3
        _ours("r4", choices="yes,no"),                    # 4
        _ours("r5", choices=[]),                          # 5
        _ours("r1"),                                      # 6 same id as line 1
        _ours("r7", answer="maybe"),                      # 7
        _ours("r8", audio="clips/nope.wav"),              # 8
        _ours("r9", audio="clips/garbage.wav"),           # 9
        _ours("r10", audio="clips/empty.wav"),            # 10
        _ours("r11", audio="clips/zero.wav"),             # 11
        "",                                               # 12 blank lines are not rows
        "[1, 2]",                                         # 13
        _ours("r14", question=5),                         # 14
        _ours("r15", audio=_DROP),                        # 15
        _ours("r16", choices=["yes", "yes"]),             # 16
        _ours("r17", choices=["yes", 2]),                 # 17
        _ours("r18", audio=None),                         # 18 good (text-only)
        _ours("r19", audio="clips/b.wav"),                # 19 good
    ]
    manifest = clips / "bad.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def test_each_bad_row_kind_gets_its_own_message_and_line(bad_ours):
    result = scan_manifest(bad_ours)
    clip_dir = str(bad_ours.parent / "clips")
    got = {row.line: (row.id, row.problem) for row in result.bad}
    expected = {line: (row_id, problem.format(clips=clip_dir)) for line, (row_id, problem) in OURS_BAD_ROWS.items()}
    assert got == expected
    assert all(row.file == str(bad_ours) for row in result.bad)
    # 18 non-blank lines: 15 bad, 3 good (lines 1, 18, 19).
    assert result.n_rows == 18 and [r.id for r in result.records] == ["r1", "r18", "r19"]


def test_bad_rows_stop_the_read_with_every_row_listed(bad_ours):
    with pytest.raises(ManifestError) as info:
        read_manifest(bad_ours)
    message = str(info.value)
    assert message.startswith(f"15 bad row(s) of 18 in {bad_ours} (ours layout):\n")
    assert f"{bad_ours}:7: r7: answer 'maybe' is not among the choices" in message
    assert f"{bad_ours}:2: ?: invalid JSON" in message
    assert len(info.value.bad) == 15 and not isinstance(info.value, ManifestFormatError)


def test_skip_bad_counts_and_logs_the_skips(bad_ours, caplog):
    with caplog.at_level(logging.WARNING, logger="mapo.data.validate"):
        result = read_manifest(bad_ours, skip_bad=True)
    assert result.skipped == 15 and [r.id for r in result.records] == ["r1", "r18", "r19"]
    assert "skipping 15 bad row(s) of 18" in caplog.text and f"{bad_ours}:13: ?: wrong type" in caplog.text


def test_check_audio_false_skips_only_the_audio_checks(bad_ours):
    problems = {row.line for row in scan_manifest(bad_ours, check_audio=False).bad}
    assert problems == set(OURS_BAD_ROWS) - {8, 9, 10, 11}


def test_audio_check_reads_headers_only_and_once_per_clip(clips, monkeypatch):
    manifest = clips / "shared.jsonl"
    manifest.write_text("\n".join(_ours(f"s{i}", audio="clips/a.wav" if i % 2 else "clips/b.wav") for i in range(6)))

    def no_full_reads(*args, **kwargs):
        raise AssertionError("the header check must not decode whole clips")

    monkeypatch.setattr(sf, "read", no_full_reads)
    monkeypatch.setattr(sf.SoundFile, "read", no_full_reads)
    probed: list[str] = []
    real_info = validate.audio_info
    monkeypatch.setattr(validate, "audio_info", lambda path: probed.append(path) or real_info(path))
    result = read_manifest(manifest, audio_check="header")
    assert len(result.records) == 6
    # 6 rows over 2 distinct clips: each header read once.
    assert sorted(probed) == [str(clips / "clips" / "a.wav"), str(clips / "clips" / "b.wav")]


def test_decode_check_decodes_each_clip_once(clips, monkeypatch):
    manifest = clips / "shared.jsonl"
    manifest.write_text("\n".join(_ours(f"s{i}", audio="clips/a.wav" if i % 2 else "clips/b.wav") for i in range(6)))
    decoded: list[str] = []
    real_verify = validate.verify_audio
    monkeypatch.setattr(validate, "verify_audio", lambda path: decoded.append(path) or real_verify(path))
    assert len(read_manifest(manifest).records) == 6  # "decode" is the default
    assert sorted(decoded) == [str(clips / "clips" / "a.wav"), str(clips / "clips" / "b.wav")]


def test_mmau_bad_rows_report_the_line_where_the_object_starts(clips):
    good = {"id": "g", "audio_id": "./clips/a.wav", "question": "q", "choices": ["a", "b"], "answer": "a",
            "task": "sound"}
    text = (
        "[\n"                                                           # 1
        f"  {json.dumps(good)},\n"                                      # 2
        "\n"                                                            # 3
        "  {\n"                                                         # 4 object starts here
        '    "id": "m-2", "audio_id": "./clips/a.wav", "question": "q",\n'  # 5
        '    "choices": ["a", "b"], "answer": "c", "task": "sound"\n'    # 6
        "  },\n"                                                        # 7
        '  {"id": "m-3", "question": "q", "audio_id": "x.wav", "choices": ["a"]},\n'  # 8
        "  [],\n"                                                       # 9
        f"  {json.dumps({**good, 'id': 'm-5', 'choices': 'a'})}\n"      # 10
        "]\n"
    )
    manifest = clips / "mmau.json"
    manifest.write_text(text)
    result = scan_manifest(manifest)
    assert result.layout == "mmau"
    assert [(r.line, r.id, r.problem) for r in result.bad] == [
        (4, "m-2", "answer 'c' is not among the choices ['a', 'b']"),
        (8, "m-3", "missing field(s): answer, task"),
        (9, "?", "wrong type: row is list, expected an object"),
        (10, "m-5", "wrong type: 'choices' is str, expected a list of strings"),
    ]


def test_mmau_syntax_error_stops_with_its_line(tmp_path):
    manifest = tmp_path / "broken.json"
    manifest.write_text('[\n  {"id": "a"},\n  {"id": "b" "x": 1}\n]\n')
    with pytest.raises(ManifestFormatError, match=r"broken\.json:3: invalid JSON: Expecting ',' delimiter"):
        read_manifest(manifest, skip_bad=True)  # not skippable: nothing after it can be located
    manifest.write_text('[{"id": "a"}] trailing')
    with pytest.raises(ManifestFormatError, match="extra data after the closing"):
        read_manifest(manifest)


def test_avqa_bad_answers(clips):
    base = {"question_text": "q", "multi_choice": ["a", "b", "c"], "audio_path": "clips/a.wav"}
    rows = [{**base, "id": 1, "answer": 3}, {**base, "id": 2, "answer": -1}, {**base, "id": 3, "answer": "1"},
            {**base, "id": 4, "answer": True}, {**base, "id": 5, "answer": 1}]
    manifest = clips / "avqa.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    result = scan_manifest(manifest)
    assert [(r.line, r.id, r.problem) for r in result.bad] == [
        (1, "1", "answer index 3 is out of range for 3 choices"),
        (2, "2", "answer index -1 is out of range for 3 choices"),
        (3, "3", "wrong type: 'answer' is str, expected an integer index"),
        (4, "4", "wrong type: 'answer' is bool, expected an integer index"),
    ]
    assert [r.answer for r in result.records] == ["b"]


def test_unreadable_manifests(tmp_path):
    with pytest.raises(ManifestFormatError, match="manifest not found"):
        read_manifest(tmp_path / "none.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(ManifestFormatError, match="holds no rows"):
        read_manifest(tmp_path / "blank.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes('{"id": "é"}'.encode("latin-1"))
    with pytest.raises(ManifestFormatError, match=r"no row is a JSON object.*\n.*latin1.jsonl:1: not valid UTF-8: byte 0xe9"):
        read_manifest(tmp_path / "latin1.jsonl")


# ------------------------------------------------------------------------------------ the CLI


def run_check(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([PYTHON, "-m", "mapo.data.check", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def test_cli_reports_every_bad_row_and_exits_1(bad_ours):
    done = run_check(str(bad_ours), "--skip-bad", cwd=bad_ours.parent)
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 15 + 2  # one per bad row, the count, the skip_bad line
    assert lines[0] == f"{bad_ours}:2: ?: invalid JSON: Expecting value at column 8"
    assert lines[-2:] == ["18 rows, 15 bad", "with skip_bad: 15 skipped, 3 kept"]


def test_cli_clean_manifest_exits_0_and_usage_errors_exit_2(clips):
    manifest = clips / "clean.jsonl"
    manifest.write_text(_ours("a") + "\n" + _ours("b", audio=None) + "\n")
    done = run_check(manifest.name, cwd=clips)  # a relative manifest path, as `make check` passes it
    assert (done.returncode, done.stdout) == (0, "2 rows, 0 bad\n")
    assert run_check(str(clips / "missing.jsonl"), cwd=clips).returncode == 2
    assert run_check(str(manifest), "--layout", "csv", cwd=clips).returncode == 2
    (clips / "broken.json").write_text("[\n{]\n")
    broken = run_check(str(clips / "broken.json"), cwd=clips)
    assert broken.returncode == 2 and "broken.json:2: invalid JSON" in broken.stderr


def test_an_answer_text_matches_its_choice_but_for_stray_spaces_in_every_text_layout(tmp_path):
    """Ours and the benchmark layouts share the text match: exact, else the one choice equal but for spaces."""
    from mapo.data.adapters import RowError, parse_mmau, parse_ours

    ours = {"id": "o", "audio": None, "question": "q", "choices": ["yes ", "no"], "answer": " yes"}
    assert parse_ours(ours, tmp_path).answer == "yes "
    two = {**ours, "choices": ["yes ", " yes"], "answer": "yes"}
    with pytest.raises(RowError, match=r"answer 'yes' is not among the choices \['yes ', ' yes'\]"):
        parse_ours(two, tmp_path)
    # A benchmark file may repeat a choice: two equal strings are one match, not an ambiguous pair.
    mmau = {"id": "m", "audio_id": "a.wav", "question": "q", "choices": ["dog ", "cat", "dog "],
            "answer": "dog", "task": "sound"}
    record = parse_mmau(mmau, tmp_path)
    assert record.answer == "dog " and record.meta == {"duplicate_choices": ["dog "]}


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_read_rows_names_the_file_as_asked_for_every_container(tmp_path, suffix):
    """A missing file and a file without rows are refused the same way for every container, with `what`."""
    missing = tmp_path / f"missing{suffix}"
    with pytest.raises(ManifestFormatError, match=rf"missing\{suffix}: predictions file not found \(or not a file\)$"):
        validate.read_rows(missing, what="predictions file")
    empty = tmp_path / f"empty{suffix}"
    if suffix == ".parquet":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"id": pa.array([], pa.string()), "model_output": pa.array([], pa.string())}), empty)
    else:
        empty.write_text("[]\n" if suffix == ".json" else "\n")
    with pytest.raises(ManifestFormatError, match=rf"empty\{suffix}: predictions file holds no rows$"):
        validate.read_rows(empty, what="predictions file")
    with pytest.raises(ManifestFormatError, match=rf"empty\{suffix}: manifest holds no rows$"):
        validate.read_rows(empty)
