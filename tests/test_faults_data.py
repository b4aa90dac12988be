"""The fault suite, part 1: data faults, each named by file and line (issue 12 item 1).

The classic bad rows (malformed JSON, missing or mistyped fields, answer not among the choices, empty or
duplicated choices, duplicate ids, missing / unreadable / empty audio) are in test_data_layer.py; this file
adds the faults that were not handled before: a non-UTF-8 line, corrupt audio bodies, NaN samples,
clips too short or too long, converted clips, paths leaving the manifest's folder, the parallel check
with its progress bar, the check shared over ranks, the check before any model loads, and audio that
goes bad during a run on one of two ranks.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from fault_tools import compose_config, manifest_row, spawn_two_ranks, tiny_overrides, write_clip

from mapo.data import validate
from mapo.data.audio import AudioError, load_audio
from mapo.data.check import main as check_main
from mapo.data.validate import ManifestError, ManifestFormatError, read_manifest, scan_manifest


@pytest.fixture()
def folder(tmp_path):
    write_clip(tmp_path / "clips" / "ok.wav", 1.0)
    return tmp_path


def _manifest(folder: Path, lines: list[bytes | str], name: str = "m.jsonl") -> Path:
    path = folder / name
    path.write_bytes(b"".join((line.encode() if isinstance(line, str) else line) + b"\n" for line in lines))
    return path


# ------------------------------------------------------------------------------------------ text


def test_a_non_utf8_line_is_one_bad_row_named_by_line_and_byte(folder, capsys):
    latin1 = manifest_row("r2", "clips/ok.wav").encode()[:-1] + b', "note": "caf\xe9"}'
    path = _manifest(folder, [manifest_row("r1", "clips/ok.wav"), latin1, manifest_row("r3", "clips/missing.wav"),
                              manifest_row("r4", "clips/ok.wav")])
    result = scan_manifest(path)
    assert [(r.line, r.id) for r in result.bad] == [(2, "?"), (3, "r3")]  # the other bad row is still found
    column = latin1.index(b"\xe9") + 1
    assert result.bad[0].problem == f"not valid UTF-8: byte 0xe9 at byte column {column} (invalid continuation byte)"
    assert [r.id for r in result.records] == ["r1", "r4"]
    assert check_main([str(path)]) == 1  # make check: every bad row listed, exit 1
    out = capsys.readouterr().out
    assert f"{path}:2: ?: not valid UTF-8" in out and f"{path}:3: r3: audio file not found" in out


def test_non_utf8_lines_in_a_json_array_are_all_named(folder):
    good = {"id": "a", "audio_id": "clips/ok.wav", "question": "q", "choices": ["x", "y"], "answer": "x", "task": "sound"}
    text = b"[\n" + json.dumps(good).encode() + b",\n" + b'{"id": "\xff"},\n' + b'{"id": "\xfe\xfe"}\n]\n'
    (folder / "m.json").write_bytes(text)
    with pytest.raises(ManifestFormatError) as info:
        read_manifest(folder / "m.json", skip_bad=True)
    message = str(info.value)
    assert "2 line(s) are not valid UTF-8" in message
    assert f"{folder / 'm.json'}:3: not valid UTF-8: byte 0xff" in message and f"{folder / 'm.json'}:4: not valid UTF-8: byte 0xfe" in message


def test_a_byte_order_mark_is_not_a_fault(folder):
    path = folder / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + manifest_row("r1", "clips/ok.wav").encode() + b"\n")
    assert [r.id for r in read_manifest(path).records] == ["r1"]


# ------------------------------------------------------------------------------------------ audio bodies


def test_a_corrupt_flac_body_is_caught_by_decoding_not_by_the_header(folder):
    x = (0.2 * np.random.default_rng(0).standard_normal(16_000)).astype(np.float32)
    sf.write(str(folder / "clips" / "good.flac"), x, 16_000, format="FLAC")
    data = bytearray((folder / "clips" / "good.flac").read_bytes())
    data[len(data) // 3: len(data) // 3 + 200] = b"\xff" * 200
    (folder / "clips" / "corrupt.flac").write_bytes(bytes(data))
    path = _manifest(folder, [manifest_row("c", "clips/corrupt.flac"), manifest_row("g", "clips/good.flac")])
    assert scan_manifest(path, audio_check="header").bad == []  # the header is intact
    (bad,) = scan_manifest(path).bad
    assert (bad.line, bad.id) == (1, "c") and bad.problem.startswith("corrupt audio (decoding failed:")
    with pytest.raises(AudioError, match="unreadable|corrupt"):
        load_audio(folder / "clips" / "corrupt.flac")


def test_nan_samples_are_corrupt_audio(folder):
    samples = np.zeros(16_000, np.float32)
    samples[1234] = np.nan
    sf.write(str(folder / "clips" / "nan.wav"), samples, 16_000, subtype="FLOAT")
    (bad,) = scan_manifest(_manifest(folder, [manifest_row("n", "clips/nan.wav")])).bad
    assert bad.problem == f"corrupt audio (non-finite sample at frame 1234): {folder / 'clips' / 'nan.wav'}"
    with pytest.raises(AudioError) as info:
        load_audio(folder / "clips" / "nan.wav")
    assert info.value.kind == "corrupt"


def test_a_wav_truncated_to_its_header_is_empty_and_a_too_short_clip_is_refused(folder):
    full = (folder / "clips" / "ok.wav").read_bytes()
    (folder / "clips" / "header_only.wav").write_bytes(full[: full.index(b"data") + 8])  # header, no samples
    write_clip(folder / "clips" / "tiny.wav", 0.01)  # 160 samples: no audio token
    write_clip(folder / "clips" / "short_ok.wav", 0.03)  # 480 samples: one audio token
    path = _manifest(folder, [manifest_row("h", "clips/header_only.wav"), manifest_row("t", "clips/tiny.wav"),
                              manifest_row("s", "clips/short_ok.wav")])
    result = scan_manifest(path)
    problems = {r.id: r.problem for r in result.bad}
    assert problems["h"].startswith("empty audio")
    assert problems["t"].startswith("audio too short (160 frames at 16000 Hz")
    assert [r.id for r in result.records] == ["s"]


# ------------------------------------------------------------------------------------------ conversions


def test_clips_longer_than_the_window_are_kept_and_counted(folder, capsys):
    write_clip(folder / "clips" / "long.wav", 31.0)
    path = _manifest(folder, [manifest_row("long", "clips/long.wav"), manifest_row("ok", "clips/ok.wav")])
    result = scan_manifest(path, window_seconds=30.0)  # Qwen2-Audio's window: 30 s = 750 audio tokens
    assert [r.id for r in result.records] == ["long", "ok"] and result.bad == []
    assert [(c.line, c.id, c.problem) for c in result.cut] == [
        (1, "long", "31.00 s is longer than the 30 s audio window; cut to it")]
    assert check_main([str(path), "--window", "30"]) == 0
    assert "note: 1 row(s) have clips longer than the 30 s audio window" in capsys.readouterr().out


def test_the_collator_counts_every_cut_clip_and_warns_once(tiny_env, tmp_path):
    from mapo.data.collate import Collator
    from mapo.data.schema import Record
    from mapo.models.loader import load_model_and_processor

    _, processor = load_model_and_processor(tiny_env["model"])
    collator = Collator(processor)
    clips = [write_clip(tmp_path / f"long{i}.wav", 4.0) for i in range(3)]  # window 3 s
    records = [Record(f"l{i}", str(c), "Higher or lower?", ["higher", "lower"], "higher") for i, c in enumerate(clips)]
    with pytest.warns(UserWarning) as warned:
        collator.prompts(records)
        collator.prompts(records)
    assert len([w for w in warned if "longer than the 3 s audio window" in str(w.message)]) == 1
    assert collator.cut_clips == {str(c) for c in clips}


def test_other_rates_and_channel_counts_are_converted_and_counted(folder):
    write_clip(folder / "clips" / "s44.wav", 1.0, sr=44_100, channels=2)
    write_clip(folder / "clips" / "m8.wav", 1.0, sr=8_000)
    path = _manifest(folder, [manifest_row(i, f"clips/{n}") for i, n in (("a", "s44.wav"), ("b", "m8.wav"), ("c", "ok.wav"))])
    result = scan_manifest(path)
    assert result.converted == {"resampled": 2, "downmixed": 1} and len(result.records) == 3
    assert load_audio(folder / "clips" / "s44.wav").shape == (16_000,) and load_audio(folder / "clips" / "m8.wav").shape == (16_000,)


# ------------------------------------------------------------------------------------------ paths


def test_a_relative_path_leaving_the_manifest_folder_is_reported_not_followed(folder, monkeypatch):
    escaped = write_clip(folder / "escaped.wav", 1.0)
    absolute = write_clip(folder / "absolute.wav", 1.0)
    data = folder / "data"
    (data / "sub").mkdir(parents=True)
    write_clip(data / "in.wav", 1.0)
    rows = [manifest_row("out", "../escaped.wav"), manifest_row("in", "sub/../in.wav"), manifest_row("abs", str(absolute))]
    path = _manifest(data, rows)
    opened = []
    real = validate.verify_audio
    monkeypatch.setattr(validate, "verify_audio", lambda p: opened.append(p) or real(p))
    (bad,) = scan_manifest(path).bad
    assert (bad.line, bad.id) == (1, "out")
    assert bad.problem.startswith(f"audio path '../escaped.wav' leaves the manifest's folder {data} (not followed")
    assert sorted(opened) == sorted([str(absolute), str(data / "in.wav")])  # the escaping file is never opened
    allowed = scan_manifest(path, allow_outside_paths=True)
    assert allowed.bad == [] and [r.id for r in allowed.records] == ["out", "in", "abs"]
    assert allowed.records[0].audio == str(escaped)


# ------------------------------------------------------------------------------------------ the check itself


def test_the_audio_check_runs_in_parallel_threads_with_a_progress_bar(folder, monkeypatch, capsys):
    for i in range(6):
        write_clip(folder / "clips" / f"c{i}.wav", 0.5)
    path = _manifest(folder, [manifest_row(f"r{i}", f"clips/c{i}.wav") for i in range(6)])
    threads, real = set(), validate.verify_audio
    # Three checks must be in flight at once to pass the barrier (one after another, it times out):
    # proof of overlap without timing anything.
    barrier = threading.Barrier(3, timeout=30)

    def overlapping_verify(p):
        threads.add(threading.get_ident())
        barrier.wait()
        return real(p)

    monkeypatch.setattr(validate, "verify_audio", overlapping_verify)
    result = scan_manifest(path, workers=3, progress=True)
    assert len(result.records) == 6 and result.bad == [] and len(threads) == 3
    err = capsys.readouterr().err
    assert "checking audio of m.jsonl: 100%" in err and "6/6" in err


def test_rank_zero_decides_for_every_rank(folder):
    path = _manifest(folder, [manifest_row("a", "clips/ok.wav"), manifest_row("b", "clips/missing.wav"),
                              manifest_row("c", "clips/ok.wav")])
    rank0_lines = []

    def share_from_rank0(lines):  # what an all-gather of rank 0's list gives every rank
        rank0_lines.extend(lines) if not rank0_lines else None
        return list(rank0_lines)

    zero = read_manifest(path, skip_bad=True, share=share_from_rank0)  # rank 0 checks the audio
    other = read_manifest(path, skip_bad=True, check_audio=False, share=share_from_rank0, report=False)
    assert [r.id for r in zero.records] == [r.id for r in other.records] == ["a", "c"]
    assert zero.skipped == other.skipped == 1
    with pytest.raises(ManifestError, match="1 bad row"):  # and without skip_bad every rank stops
        read_manifest(path, check_audio=False, share=share_from_rank0, report=False)


def test_training_checks_every_manifest_before_loading_a_model(tiny_env, tmp_path, monkeypatch):
    import shutil

    import mapo.train

    data = tmp_path / "data"
    shutil.copytree(tiny_env["data"], data)
    with open(data / "test.jsonl", "a") as f:  # an eval manifest, checked after the training one
        f.write(manifest_row("late_bad", "audio/nope.wav") + "\n")

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the manifests were checked")

    monkeypatch.setattr(mapo.train, "load_model_and_processor", no_model)
    cfg = compose_config(tiny_overrides(tiny_env, tmp_path / "run", data_dir=data))
    with pytest.raises(ManifestError, match=r"test.jsonl:\d+: late_bad: audio file not found"):
        mapo.train.run(cfg)


# ------------------------------------------------------------------------------------------ mid-run, two ranks


def test_audio_gone_bad_mid_run_is_skipped_the_same_way_on_both_ranks(tmp_path):
    """2 processes (gloo, torch.multiprocessing): after the manifest check, one clip is deleted (in rank 0's
    half of the batch) and another truncated to 0 bytes (in rank 1's half). Each rank sees only its own
    failure; both must return the same batch with both rows replaced, and neither may wait forever (the
    test fails after 120 s)."""
    clips = [str(write_clip(tmp_path / f"c{i}.wav", 0.5)) for i in range(8)]
    os.remove(clips[5])
    Path(clips[6]).write_bytes(b"")
    spawn_two_ranks(_guard_worker, str(tmp_path), clips)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert got[0] == got[1]
    ids = got[0]["ids"]
    assert sorted(ids) == ["c0", "c1", "c4", "c7"] and got[0]["skipped"] == 2  # c5, c6 replaced by the next items
    assert got[0]["loaded"] and got[1]["loaded"]


def _guard_worker(rank: int, world: int, port: str, folder: str, clips: list[str]) -> None:
    import torch.distributed as dist

    from mapo.data.audio import load_audio
    from mapo.data.guard import LoadableBatches
    from mapo.data.sampler import EpochSampler
    from mapo.data.schema import Record

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    records = [Record(f"c{i}", c, "q?", ["a", "b"], "a") for i, c in enumerate(clips)]

    class InOrder(EpochSampler):  # items in manifest order, so the test knows which rank holds which row
        def _permutation(self, epoch):
            return np.arange(len(self.items))

    sampler = InOrder(records, seed=0)
    loaded = []

    def any_rank(x):
        dist.all_reduce(x)
        return x

    guard = LoadableBatches(lambda p: loaded.append(p) or load_audio(p), any_rank)
    sampler.next_batch(4)  # step 1 used c0–c3; step 2 draws c4–c7, and rank 1 holds c6 and c7 …
    batch = guard.next_batch(sampler, 4, slice(rank * 2, rank * 2 + 2), step=2)
    # … but c5 (rank 0's) and c6 (rank 1's) fail: both are replaced by the next items (c0, c1)
    out = {"ids": [r.id for r in batch], "skipped": guard.skipped, "loaded": bool(loaded)}
    Path(folder, f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def test_clips_are_counted_as_cut_only_where_the_encoder_has_a_fixed_window(tiny_env, tmp_path):
    """Qwen2-Audio's encoder takes exactly one window (the tiny one: 3 s), so longer clips are cut; the Omni
    thinkers' towers take any length, so nothing is cut and no clip is counted as such."""
    from mapo.assets import audio_window_seconds
    from mapo.models.tiny import TinyModelConfig, write_tiny

    assert audio_window_seconds(tiny_env["model"]) == 3.0
    omni = write_tiny(TinyModelConfig(family="qwen2_5_omni", out_dir=str(tmp_path / "omni"),
                                      corpus=str(tiny_env["data"] / "train.jsonl")))
    assert audio_window_seconds(omni) is None
