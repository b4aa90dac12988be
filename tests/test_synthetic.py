"""The synthetic benchmark: answers and traces checked from the written audio with plain DSP, the
language-prior trap, the clip-length leak, determinism, and the blind baselines on hand-made data.

The DSP here is written independently of the generator: it reads the WAV files back and only knows
the band edges of the task description (pitch low < 420 Hz < mid < 970 Hz < high; quiet peak < 0.1 <
0.2 < loud peak; short < 0.4 s < 0.5 s < long).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from mapo.data.baselines import (
    audio_token_count,
    chance_accuracy,
    clip_length_baseline,
    content_duration_baseline,
    format_baseline_table,
    majority_text_baseline,
)
from mapo.data.schema import Record
from mapo.data.synthetic import (
    ALL_TASKS,
    FILLER_SENTENCES,
    SPLITS,
    TASKS,
    SyntheticConfig,
    generate,
    main,
    render,
    with_filler,
    write_benchmark,
)

SR = 16000
SMALL = dict(n_train=40, n_test=20, n_counter_prior=20, prior_strength=0.9)  # 0.9: the hand-worked baseline numbers below


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """(root, summary, {split: [Record]} read back from the jsonl files) for the small config."""
    root = tmp_path_factory.mktemp("synthetic")
    summary = write_benchmark(SyntheticConfig(out_dir=str(root), **SMALL))
    splits = {s: read_manifest(root / f"{s}.jsonl") for s in SPLITS}
    return root, summary, splits


def read_manifest(path: Path) -> list[Record]:
    with open(path, encoding="utf-8") as f:
        return [Record(**json.loads(line)) for line in f]


# ------------------------------------------------------------------------------- signal analysis


def frame_rms(x: np.ndarray, hop: int = 160) -> np.ndarray:
    """RMS of consecutive 10 ms frames: [len(x) // hop]."""
    n = len(x) // hop
    return np.sqrt((x[: n * hop].reshape(n, hop) ** 2).mean(axis=1))


def segments(x: np.ndarray, threshold: float = 0.005, hop: int = 160) -> list[tuple[int, int]]:
    """Sample ranges [start, end) of runs of frames whose RMS exceeds `threshold` (-46 dBFS);
    runs shorter than 3 frames are dropped. Background noise is -50 dBFS, the quietest tone -43 dBFS rms."""
    active = frame_rms(x, hop) > threshold
    edges = np.flatnonzero(np.diff(np.concatenate([[0], active.astype(int), [0]])))
    runs = [(a * hop, b * hop) for a, b in zip(edges[::2], edges[1::2]) if b - a >= 3]
    return runs


def core(x: np.ndarray, seg: tuple[int, int], trim: int = 480) -> np.ndarray:
    """The segment without 30 ms at each end (fades and frame rounding)."""
    return x[seg[0] + trim : seg[1] - trim]


def peak_hz(x: np.ndarray) -> float:
    """Frequency of the largest bin of the Hann-windowed, zero-padded spectrum."""
    nfft = 1 << 16
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x)), nfft))
    return float(np.argmax(spectrum) * SR / nfft)


def pitch_band(hz: float) -> str:
    assert 200 < hz < 2000, hz
    return "low" if hz < 420 else "mid" if hz < 970 else "high"


def level_band(x: np.ndarray) -> str:
    peak = float(np.sqrt(np.mean(x**2)) * np.sqrt(2))  # a sine's peak is rms * sqrt(2)
    assert peak < 0.1 or peak > 0.2, peak
    return "quiet" if peak < 0.1 else "loud"


def length_band(seg: tuple[int, int]) -> str:
    seconds = (seg[1] - seg[0]) / SR
    assert seconds < 0.4 or seconds > 0.5, seconds
    return "short" if seconds < 0.4 else "long"


def spectral_flatness(x: np.ndarray) -> float:
    """Geometric over arithmetic mean of the power spectrum: ~0 for a tone, ~0.56 for white noise."""
    power = np.abs(np.fft.rfft(x * np.hanning(len(x)))) ** 2 + 1e-20
    return float(np.exp(np.mean(np.log(power))) / np.mean(power))


def stft_peaks(x: np.ndarray, win: int = 512, hop: int = 128) -> np.ndarray:
    """Peak frequency of each STFT frame: [n_frames]."""
    starts = range(0, len(x) - win + 1, hop)
    frames = np.stack([x[s : s + win] * np.hanning(win) for s in starts])
    nfft = 4096
    return np.argmax(np.abs(np.fft.rfft(frames, nfft, axis=1)), axis=1) * SR / nfft


WORD_NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4}


def check_from_signal(x: np.ndarray, record: Record) -> list[str]:
    """Problems found comparing the clip with the record's answer and trace (empty when consistent)."""
    segs = segments(x)
    trace, answer = record.trace, record.answer
    problems = []

    def expect(cond: bool, what: str) -> None:
        if not cond:
            problems.append(f"{record.id}: {what} (trace {trace!r}, answer {answer!r})")

    if record.task == "tone_count":
        bands = re.findall(r"tone \d: (low|mid|high)\.", trace)
        stated = re.search(r"(one|two|three|four) tones?\.$", trace).group(1)
        expect(len(segs) == WORD_NUMBERS[answer], f"{len(segs)} tones in the signal")
        expect(stated == answer and len(bands) == WORD_NUMBERS[answer], "trace count")
        heard = [pitch_band(peak_hz(core(x, s))) for s in segs]
        expect(heard == bands, f"pitch bands heard {heard}")
        return problems

    m = re.fullmatch(
        r"(?:first (?:tone|sound)|start): (\w+)\. (?:second (?:tone|sound)|end): (\w+)\. the (\w+) (?:is|comes) (\w+)\.",
        trace,
    )
    expect(m is not None, "trace shape")
    if m is None:
        return problems
    fact1, fact2, subject, verdict = m.groups()

    if record.task == "sweep_direction":
        expect(len(segs) == 1, f"{len(segs)} segments")
        peaks = stft_peaks(core(x, segs[0]))
        slope = np.polyfit(np.arange(len(peaks)), np.log2(peaks), 1)[0]
        heard = "rising" if slope > 0 else "falling"
        start, end = pitch_band(np.median(peaks[:3])), pitch_band(np.median(peaks[-3:]))
        expect(heard == answer == verdict, f"sweep heard {heard}")
        expect((start, end) == (fact1, fact2), f"sweep bands heard {start}->{end}")
        return problems

    expect(len(segs) == 2, f"{len(segs)} segments")
    if len(segs) != 2:
        return problems
    first, second = (core(x, s) for s in segs)
    if record.task == "pitch_compare":
        f1, f2 = peak_hz(first), peak_hz(second)
        heard = "higher" if f2 > f1 else "lower"
        expect(heard == answer == verdict, f"pitches {f1:.0f} -> {f2:.0f} Hz")
        expect((pitch_band(f1), pitch_band(f2)) == (fact1, fact2), "pitch bands")
    elif record.task == "loudness_compare":
        r1, r2 = np.sqrt(np.mean(first**2)), np.sqrt(np.mean(second**2))
        heard = "louder" if r2 > r1 else "softer"
        expect(heard == answer == verdict, f"rms {r1:.3f} -> {r2:.3f}")
        expect((level_band(first), level_band(second)) == (fact1, fact2), "level bands")
    elif record.task == "duration_compare":
        d1, d2 = (s[1] - s[0] for s in segs)
        heard = "first" if d1 > d2 else "second"
        expect(heard == answer == subject and verdict == "longer", f"lengths {d1} vs {d2} samples")
        expect((length_band(segs[0]), length_band(segs[1])) == (fact1, fact2), "length bands")
    elif record.task == "event_order":
        kinds = ["noise" if spectral_flatness(c) > 0.2 else "tone" for c in (first, second)]
        expect(f"{kinds[0]} first" == answer, f"events heard {kinds}")
        expect(kinds == [fact1, fact2] and subject == kinds[0] and verdict == "first", "event facts")
    else:
        problems.append(f"{record.id}: unknown task {record.task}")
    return problems


# ------------------------------------------------------------------------------------- the tests


def test_every_answer_and_trace_fact_matches_the_signal(bench):
    root, _, splits = bench
    problems = []
    for records in splits.values():
        for r in records:
            x, sr = sf.read(str(root / r.audio), dtype="float64")
            assert sr == SR
            problems += check_from_signal(x, r)
    assert not problems, "\n".join(problems[:20])


def test_signal_checks_catch_a_wrong_answer(bench):
    """Control: the DSP check must reject a record whose answer or trace was swapped."""
    root, _, splits = bench
    for task in ALL_TASKS:
        r = next(r for r in splits["test"] if r.task == task)
        x, _ = sf.read(str(root / r.audio), dtype="float64")
        wrong = next(c for c in r.choices if c != r.answer)
        assert check_from_signal(x, Record(**{**r.to_json(), "answer": wrong})), task
        other = next(o for o in splits["test"] if o.task == task and o.trace != r.trace)
        assert check_from_signal(x, Record(**{**r.to_json(), "trace": other.trace, "answer": other.answer})), task


def test_rows_parse_into_records_with_fixed_options_and_short_traces(bench):
    root, summary, splits = bench
    ids = set()
    for split, records in splits.items():
        assert len(records) == len(ALL_TASKS) * {"train": 40, "test": 20, "counter_prior": 20}[split]
        for r in records:
            assert r.split == split and r.answer in r.choices
            assert r.choices == list(TASKS[r.task].choices)  # fixed option order per task
            assert r.audio == f"audio/{split}/{r.id[len(split) + 1:]}.wav"  # relative to the manifest folder
            assert (root / r.audio).is_file()
            assert "<answer>" not in r.trace and "</answer>" not in r.trace
            assert len(r.trace.split()) <= 25, r.trace
            ids.add(r.id)
    assert len(ids) == sum(len(v) for v in splits.values())  # ids unique across splits
    assert summary.counts == {s: {t: len(v) // 6 for t in ALL_TASKS} for s, v in splits.items()}


def test_every_clip_is_exactly_three_seconds_of_pcm16(bench):
    root, _, splits = bench
    for records in splits.values():
        for r in records:
            info = sf.info(str(root / r.audio))
            assert (info.frames, info.samplerate, info.channels, info.subtype) == (48000, SR, 1, "PCM_16")


def test_written_audio_is_the_rendered_scene(bench):
    root, _, splits = bench
    r = splits["train"][7]
    x, _ = sf.read(str(root / r.audio), dtype="float32")
    # PCM_16 rounds to the nearest step of 1/32768.
    np.testing.assert_allclose(x, render(r), atol=1.0 / 32768 + 1e-7)


def test_answers_balanced_per_task_in_every_split(bench):
    _, _, splits = bench
    for split, records in splits.items():
        for task in ALL_TASKS:
            answers = [r.answer for r in records if r.task == task]
            counts = [answers.count(c) for c in TASKS[task].choices]
            assert max(counts) - min(counts) <= 1, (split, task, counts)


def test_prior_trap_text_majority_baseline(bench):
    _, summary, splits = bench
    train = splits["train"]
    # Train, 40 per task: 4 options -> 10 per answer, int(10 * 0.9 + 0.5) = 9 carry their own wording;
    # 2 options -> 20 per answer, 18 aligned. Every (task, wording) majority is its own answer: 0.9.
    assert majority_text_baseline(train, train) == pytest.approx(0.9)
    assert majority_text_baseline(train, splits["test"]) >= 0.8
    # counter_prior, 20 per task: 2 options -> each answer sees each wording 5 times -> 0.5;
    # 4 options -> 5 per answer, wordings r % 4 = 0,1,2,3,0: answer "one" gets its own wording twice,
    # the others once -> (2+1+1+1)/20 = 0.25. Overall (5 tasks * 10 + 5) / 120 = 55/120.
    cp = splits["counter_prior"]
    assert majority_text_baseline(train, cp) == pytest.approx(55 / 120)
    assert abs(majority_text_baseline(train, cp) - chance_accuracy(cp)) <= 0.15
    assert chance_accuracy(cp) == pytest.approx((5 * 0.5 + 0.25) / 6)
    assert summary.baselines["text majority"]["counter_prior"] == pytest.approx(55 / 120)
    for task in ALL_TASKS:  # the wording is independent of the answer on counter_prior
        rows = [r for r in cp if r.task == task]
        for wording in TASKS[task].wordings:
            answers = [r.answer for r in rows if r.question == wording]
            counts = [answers.count(c) for c in TASKS[task].choices]
            assert max(counts) - min(counts) <= 1, (task, wording, counts)


def test_clip_length_gives_nothing_away(bench):
    root, summary, splits = bench
    lengths = {r.id: sf.info(str(root / r.audio)).frames for v in splits.values() for r in v}
    assert {audio_token_count(n) for n in lengths.values()} == {75}
    for split, records in splits.items():
        acc = clip_length_baseline(splits["train"], records, lengths)
        # One length for all: the majority of a balanced task is a tie -> first option -> exactly chance.
        assert acc == pytest.approx(chance_accuracy(records)), split
        assert summary.baselines["clip length"][split] == pytest.approx(acc)


def test_clip_length_baseline_detects_a_leak():
    """Control: when the length encodes the answer the baseline must score 1.0."""
    records = [
        Record(id=f"r{i}", audio=None, question="q", choices=["a", "b"], answer="ab"[i % 2], task="t")
        for i in range(8)
    ]
    leaky = {f"r{i}": 16000 * (1 + i % 2) for i in range(8)}  # 25 tokens for "a", 50 for "b"
    assert clip_length_baseline(records, records, leaky) == 1.0
    durations = {f"r{i}": 0.5 + 0.5 * (i % 2) for i in range(8)}
    assert content_duration_baseline(records, records, durations) == 1.0
    with pytest.raises(KeyError, match="r7"):
        clip_length_baseline(records, records, {k: v for k, v in leaky.items() if k != "r7"})


def test_majority_text_baseline_hand_worked():
    def rec(q: str, a: str, task: str = "t") -> Record:
        return Record(id=f"{q}{a}", audio=None, question=q, choices=["x", "y", "z"], answer=a, task=task)

    # q1 -> majority x (2 of 3); q2 -> tie x/y broken by option order -> x; task majority x (3 of 5).
    train = [rec("q1", "x"), rec("q1", "x"), rec("q1", "y"), rec("q2", "y"), rec("q2", "x")]
    # Eval: q1/x right, q1/z wrong, q2/y wrong (predicts x), unseen q3 -> task majority x: right.
    evaluation = [rec("q1", "x"), rec("q1", "z"), rec("q2", "y"), rec("q3", "x")]
    assert majority_text_baseline(train, evaluation) == pytest.approx(2 / 4)
    assert chance_accuracy(evaluation) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="eval_records is empty"):
        majority_text_baseline(train, [])


def test_audio_token_count():
    # 1 s: 100 frames -> ((99 // 2) + 1 - 2) // 2 + 1 = 48 // 2 + 1 = 25; 3 s: 300 -> 74 + 1 = 75;
    # 30 s: 3000 -> 1498 // 2 + 1 = 750 (FIELD-NOTES).
    assert [audio_token_count(n) for n in (16000, 48000, 480000)] == [25, 75, 750]


def test_format_baseline_table():
    text = format_baseline_table({"chance": {"train": 0.5, "test": 0.25}, "clip length": {"train": 1.0, "test": 0.0}})
    assert text.splitlines()[1].split() == ["chance", "0.500", "0.250"]
    assert text.splitlines()[2].split() == ["clip", "length", "1.000", "0.000"]


TINY = dict(n_train=4, n_test=2, n_counter_prior=2)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        write_benchmark(SyntheticConfig(out_dir=str(tmp_path / name), seed=seed, **TINY))
    a, b, c = (_files(tmp_path / n) for n in "abc")
    assert len(a) == 4 + 6 * 8  # three manifests, benchmark.json, 6 tasks * (4 + 2 + 2) clips
    assert json.loads(a["benchmark.json"]) == {k: v for k, v in SyntheticConfig(seed=3, **TINY).__dict__.items() if k != "out_dir"}
    assert a == b
    assert a.keys() == c.keys()
    assert a["train.jsonl"] != c["train.jsonl"]
    wavs = [k for k in a if k.endswith(".wav")]
    assert all(a[k] != c[k] for k in wavs)


def test_a_task_subset_yields_the_same_items():
    full = generate(SyntheticConfig(**TINY))
    only = generate(SyntheticConfig(tasks=["sweep_direction"], **TINY))
    for split in SPLITS:
        assert [r.to_json() for r in full[split] if r.task == "sweep_direction"] == [r.to_json() for r in only[split]]


def test_rewriting_smaller_removes_stale_clips(tmp_path):
    write_benchmark(SyntheticConfig(out_dir=str(tmp_path), **TINY))
    write_benchmark(SyntheticConfig(out_dir=str(tmp_path), n_train=2, n_test=1, n_counter_prior=1))
    assert len(list((tmp_path / "audio" / "train").iterdir())) == 6 * 2
    assert not list(tmp_path.rglob("*.tmp*"))


def test_with_filler_places_the_sentences_hand_worked():
    trace = "first tone: low. second tone: high. the second is higher."
    filler = ["i check what i heard.", "now i can decide."]
    assert with_filler(trace, filler, "middle") == (
        "first tone: low. second tone: high. i check what i heard. now i can decide. the second is higher."
    )
    assert with_filler(trace, filler, "start") == (
        "i check what i heard. now i can decide. first tone: low. second tone: high. the second is higher."
    )
    assert with_filler("tone 1: mid. one tone.", filler[:1], "middle") == "tone 1: mid. i check what i heard. one tone."
    assert with_filler(trace, [], "middle") == trace
    with pytest.raises(ValueError, match="no fact sentence"):
        with_filler("one tone.", filler, "middle")


@pytest.mark.parametrize("position", ["middle", "start"])
def test_filler_lengthens_traces_and_changes_nothing_else(position):
    plain = generate(SyntheticConfig(**TINY))
    longer = generate(SyntheticConfig(filler_sentences=3, filler_position=position, **TINY))
    def words(text: str) -> set[str]:
        return {w.strip(".:?,") for w in text.lower().split()}

    # cue words: what tells one wording of a task from the others, the options, and the fact words
    cues = {"tone", "tones", "low", "mid", "high", "quiet", "loud", "short", "long", "noise", "sound", "start", "end"}
    for spec in TASKS.values():
        cues |= {w for c in spec.choices for w in words(c)}
        for wording in spec.wordings:
            cues |= words(wording) - set.intersection(*(words(o) for o in spec.wordings if o != wording))
    for split in SPLITS:
        for a, b in zip(plain[split], longer[split]):
            # same scene, audio, question and answer: only the trace grows
            assert {**a.to_json(), "trace": None} == {**b.to_json(), "trace": None}
            added = [s for s in FILLER_SENTENCES if s in b.trace]
            assert len(added) == 3, b.trace
            stripped = b.trace
            for sentence in added:
                stripped = stripped.replace(sentence + " ", "")
            assert stripped == a.trace
            facts_end = a.trace.rpartition(". ")[0] + "."
            if position == "middle":  # the facts open the trace, the filler sits before the conclusion
                assert b.trace.startswith(facts_end + " ") and b.trace.endswith(a.trace[len(facts_end):])
                assert all(b.trace.index(s) > len(facts_end) for s in added)
            else:  # the filler opens the trace, the original trace follows whole
                assert b.trace.endswith(" " + a.trace)
                assert all(b.trace.index(s) < len(b.trace) - len(a.trace) for s in added)
    # a filler sentence names no fact, option or wording cue
    assert "climb" in cues and "hiss" in cues and "the" not in cues
    assert not set.union(*(words(s) for s in FILLER_SENTENCES)) & cues
    # the choice of sentences varies between items
    assert len({tuple(s for s in FILLER_SENTENCES if s in r.trace) for r in longer["train"]}) > 3


@pytest.mark.parametrize(
    "override, field",
    [({"tasks": ["beeps"]}, "tasks"), ({"clip_seconds": 2.0}, "clip_seconds"), ({"prior_strength": 1.5}, "prior_strength"),
     ({"n_test": 0}, "n_test"), ({"filler_sentences": 9}, "filler_sentences"), ({"filler_position": "end"}, "filler_position")],
)
def test_bad_config_names_the_field(override, field):
    with pytest.raises(ValueError, match=field):
        generate(SyntheticConfig(**override))


def test_cli_writes_and_prints_the_summary(tmp_path, capsys):
    main([f"out_dir={tmp_path}", "n_train=4", "n_test=2", "n_counter_prior=2", "tasks=[pitch_compare,tone_count]"])
    out = capsys.readouterr().out
    assert "text majority" in out and "clip length" in out and "disk:" in out
    assert read_manifest(tmp_path / "train.jsonl")[0].task in ("pitch_compare", "tone_count")
    with pytest.raises(SystemExit, match="clip_seconds"):
        main([f"out_dir={tmp_path}", "clip_seconds=1.0"])
