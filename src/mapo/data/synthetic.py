"""The built-in audio-reasoning benchmark (DESIGN §5): six synthetic tasks with exact answers.

`python -m mapo.data.synthetic key=value ...` (what `make data` runs) writes under `out_dir`:

    audio/<split>/<task>_<index>.wav     PCM_16 mono, every clip exactly `clip_seconds` long
    train.jsonl, test.jsonl, counter_prior.jsonl   one `Record.to_json()` per line
    benchmark.json                       the generator settings used (SyntheticConfig without out_dir)

and prints counts, disk size and the blind baselines. Audio paths in the manifests are relative to
the manifest folder (e.g. "audio/train/pitch_compare_00012.wav").

Tasks (options in a FIXED order per task: a tiny model does not learn shuffled options quickly):

    tone_count        1-4 tones                          one / two / three / four
    pitch_compare     second tone vs the first            higher / lower
    loudness_compare  second tone vs the first            louder / softer
    duration_compare  which of two tones is longer        first / second
    sweep_direction   one chirp                           rising / falling
    event_order       a tone and a noise burst            tone first / noise first

Facts come in coarse, well separated bands (pitch low/mid/high, level quiet/loud, length short/long),
so each fact in a trace is unambiguous. The reference trace states the facts in order, then concludes,
e.g. "first tone: low. second tone: high. the second is higher." (no answer tag; the prompt builder
adds it), so late trace tokens depend on what was heard early.

Language-prior trap: each task has one question wording per option, and wording i leans toward option
i ("Does the melody climb? ..." toward "higher"). In train and test a record gets the wording of its
answer with probability `prior_strength` (else one of the others), so the text alone scores about
`prior_strength`; in `counter_prior` wordings are spread evenly over every answer, so text alone scores
chance. Answers are balanced per task in every split.

Length leak: all clips have the same number of samples, hence the same number of audio tokens; the
content starts at a random offset. For tone_count the onset-to-offset span is drawn independently of
the count (more tones means shorter tones); the seconds of sound still correlate with the count (a
single tone has no gaps), which the optional "content duration" baseline in the summary measures.

Longer traces (`filler_sentences`, `filler_position`; off by default): every trace gets that many
neutral sentences ("i listen to the whole clip.", …, drawn per item without repeats from
FILLER_SENTENCES, none naming a fact, an option or a wording cue), either between the facts and the
conclusion ("middle": the answer sits further from the tokens that carry what was heard) or before
the facts ("start": what must be heard is said late in the completion, where modality collapse lives).
The audio, answers and wordings stay exactly those of the same config without filler.

Determinism: every item draws from its own generator seeded by (seed, split, task, index), so the same
config gives byte-identical files, and a task's items do not change when other tasks are added.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from mapo.atomic import replacing, write_jsonl_atomic, write_text_atomic
from mapo.cli_args import parse_overrides
from mapo.data.baselines import baseline_table, format_baseline_table
from mapo.data.schema import Record

ALL_TASKS = (
    "tone_count",
    "pitch_compare",
    "loudness_compare",
    "duration_compare",
    "sweep_direction",
    "event_order",
)
SPLITS = ("train", "test", "counter_prior")

#: Coarse fact bands. Neighbouring bands are far apart (pitch ratio >= 1.5, level ratio >= 3.5,
#: length ratio >= 2) so a band is never ambiguous to a listener or to a simple DSP check.
PITCH_BANDS_HZ = {"low": (220.0, 330.0), "mid": (520.0, 780.0), "high": (1200.0, 1800.0)}
# "quiet" sits about 8-12 dB above the noise floor: level differences that only scale a tone's
# log-mel bins are nearly erased by the encoder's layer norms, while a faint tone's noisier spectrum
# survives them (measured: the tiny model learned 0.04-0.07 vs loud at chance, this band to 0.9).
LEVEL_BANDS_PEAK = {"quiet": (0.010, 0.018), "loud": (0.25, 0.45)}
LENGTH_BANDS_S = {"short": (0.12, 0.25), "long": (0.70, 1.00)}

#: Peak amplitude of tones whose level is not the question, and RMS of noise bursts.
TONE_PEAK = (0.2, 0.4)
NOISE_BURST_RMS = (0.08, 0.14)
#: Silence kept at both ends of a clip, and the raised-cosine fade on every event (avoids clicks,
#: whose broadband energy would blur the tone/noise distinction).
EDGE_MARGIN_S = 0.1
FADE_S = 0.01
#: tone_count: onset-to-offset span (independent of the count) and the gap between tones.
COUNT_SPAN_S = (1.2, 2.0)
COUNT_GAP_S = (0.10, 0.20)
#: Longest content any task draws (tone_count's span), for the clip-length check.
MAX_CONTENT_S = COUNT_SPAN_S[1]

NUMBER_WORDS = ("one", "two", "three", "four")

#: Neutral reasoning for longer traces: no band, option, event or wording word of any task, so a
#: filler sentence tells nothing about the answer and nothing about the question.
FILLER_SENTENCES = (
    "i listen to the whole clip.",
    "let me go over that again.",
    "i keep both parts in mind.",
    "nothing else happens in the clip.",
    "i check what i heard.",
    "the recording is clean.",
    "i think step by step.",
    "now i can decide.",
)
FILLER_POSITIONS = ("middle", "start")


@dataclass(frozen=True)
class TaskSpec:
    """Options of a task and its question wordings; wordings[i] leans toward choices[i]."""

    choices: tuple[str, ...]
    wordings: tuple[str, ...]


TASKS: dict[str, TaskSpec] = {
    "tone_count": TaskSpec(
        choices=NUMBER_WORDS,
        wordings=(
            "Is there just one beep? How many tones do you hear?",
            "Is it a pair of beeps? How many tones do you hear?",
            "Is it a triple beep? How many tones do you hear?",
            "Is it a long run of beeps? How many tones do you hear?",
        ),
    ),
    "pitch_compare": TaskSpec(
        choices=("higher", "lower"),
        wordings=(
            "Does the melody climb? Is the second tone higher or lower than the first?",
            "Does the melody drop? Is the second tone higher or lower than the first?",
        ),
    ),
    "loudness_compare": TaskSpec(
        choices=("louder", "softer"),
        wordings=(
            "Does the sound swell? Is the second tone louder or softer than the first?",
            "Does the sound fade? Is the second tone louder or softer than the first?",
        ),
    ),
    "duration_compare": TaskSpec(
        choices=("first", "second"),
        wordings=(
            "Does the opening tone linger? Which tone is longer, the first or the second?",
            "Does the closing tone linger? Which tone is longer, the first or the second?",
        ),
    ),
    "sweep_direction": TaskSpec(
        choices=("rising", "falling"),
        wordings=(
            "Does the siren go up? Is the sweep rising or falling?",
            "Does the siren go down? Is the sweep rising or falling?",
        ),
    ),
    "event_order": TaskSpec(
        choices=("tone first", "noise first"),
        wordings=(
            "Does the beep lead? Which comes first, the tone or the noise?",
            "Does the hiss lead? Which comes first, the tone or the noise?",
        ),
    ),
}


@dataclass
class SyntheticConfig:
    """Settings of `make data`; override any field with `key=value` on the command line."""

    seed: int = 0  # master seed; the same seed gives byte-identical files
    out_dir: str = "artifacts/data/synthetic"  # folder for audio/ and the three manifests
    sample_rate: int = 16000  # Hz, what the Whisper feature extractor expects
    clip_seconds: float = 3.0  # every clip has exactly this length (the tiny model's window is 3 s)
    tasks: list[str] = field(default_factory=lambda: list(ALL_TASKS))  # task families to generate
    n_train: int = 300  # items per task in train.jsonl
    n_test: int = 50  # items per task in test.jsonl (same prior as train)
    n_counter_prior: int = 50  # items per task in counter_prior.jsonl (wording independent of answer)
    prior_strength: float = 0.75  # P(wording leans toward the right answer) in train and test
    noise_db: float = -50.0  # background noise RMS in dBFS: low, so silences are not digital zeros
    filler_sentences: int = 0  # neutral sentences added to every trace (0 = the short traces; at most 8)
    filler_position: str = "middle"  # middle: between the facts and the conclusion | start: before the facts


def _validate(cfg: SyntheticConfig) -> None:
    unknown = [t for t in cfg.tasks if t not in TASKS]
    if unknown or not cfg.tasks:
        raise ValueError(f"tasks: unknown or empty {unknown or cfg.tasks}; valid: {list(ALL_TASKS)}")
    if len(set(cfg.tasks)) != len(cfg.tasks):
        raise ValueError(f"tasks: duplicates in {cfg.tasks}")
    if cfg.seed < 0:
        raise ValueError(f"seed must be >= 0, got {cfg.seed}")
    if cfg.sample_rate < 8000:
        raise ValueError(f"sample_rate must be >= 8000 Hz (tones reach 1.8 kHz), got {cfg.sample_rate}")
    if cfg.clip_seconds < MAX_CONTENT_S + 2 * EDGE_MARGIN_S:
        raise ValueError(
            f"clip_seconds={cfg.clip_seconds}: must be >= {MAX_CONTENT_S + 2 * EDGE_MARGIN_S} "
            "(longest content plus the silent margins)"
        )
    for name in ("n_train", "n_test", "n_counter_prior"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if not 0.0 <= cfg.prior_strength <= 1.0:
        raise ValueError(f"prior_strength must be in [0, 1], got {cfg.prior_strength}")
    if not 0 <= cfg.filler_sentences <= len(FILLER_SENTENCES):
        raise ValueError(f"filler_sentences must be in [0, {len(FILLER_SENTENCES)}], got {cfg.filler_sentences}")
    if cfg.filler_position not in FILLER_POSITIONS:
        raise ValueError(f"filler_position must be one of {list(FILLER_POSITIONS)}, got {cfg.filler_position!r}")


def split_size(cfg: SyntheticConfig, split: str) -> int:
    """Items per task in `split`."""
    return {"train": cfg.n_train, "test": cfg.n_test, "counter_prior": cfg.n_counter_prior}[split]


# ---------------------------------------------------------------------------------------------
# Answer / wording plan: exact balance and an exact prior strength, then shuffled.
# ---------------------------------------------------------------------------------------------


def _plan(n: int, n_options: int, counter_prior: bool, prior_strength: float, rng) -> list[tuple[int, int]]:
    """(answer index, wording index) for n items of one task in one split, in shuffled order.

    Answers cycle over the options (balanced). Within the items of answer a (m of them):
    prior splits give round(m * prior_strength) the wording a and spread the rest evenly over the
    other wordings; counter_prior gives wording r % n_options to the r-th item, so every answer sees
    every wording equally often and the wording carries no information.
    """
    plan: list[tuple[int, int]] = []
    for answer in range(n_options):
        m = len(range(answer, n, n_options))
        if counter_prior:
            plan += [(answer, r % n_options) for r in range(m)]
            continue
        aligned = int(m * prior_strength + 0.5)
        others = [w for w in range(n_options) if w != answer]
        plan += [(answer, answer)] * aligned
        plan += [(answer, others[r % len(others)]) for r in range(m - aligned)]
    order = rng.permutation(len(plan))
    return [plan[i] for i in order]


# ---------------------------------------------------------------------------------------------
# Scenes: each task samples a list of events (relative to the content start) and its trace.
# Event dicts: {"kind": "tone", "start", "dur", "peak", "freq"} | {"kind": "sweep", ..., "f0", "f1"}
#              | {"kind": "noise", "start", "dur", "rms"}; times in seconds.
# ---------------------------------------------------------------------------------------------


def _uniform(rng, band: tuple[float, float]) -> float:
    return float(rng.uniform(band[0], band[1]))


def _pitch(rng, band: str) -> float:
    return _uniform(rng, PITCH_BANDS_HZ[band])


def _band_pair(rng, up: bool) -> tuple[str, str]:
    """Two different pitch bands, in rising order when `up`; each ordered pair equally likely."""
    names = list(PITCH_BANDS_HZ)  # low, mid, high
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    low, high = pairs[int(rng.integers(len(pairs)))]
    return (low, high) if up else (high, low)


def _tone(rng, pitch: str | None = None, peak=TONE_PEAK, dur=(0.3, 0.6)) -> dict:
    """Duration, peak and frequency of one tone; a random pitch band when `pitch` is None."""
    band = pitch if pitch is not None else str(rng.choice(list(PITCH_BANDS_HZ)))
    return {"dur": _uniform(rng, dur), "peak": _uniform(rng, peak), "freq": _pitch(rng, band)}


def _two_tones(rng, first: dict, second: dict) -> list[dict]:
    """Place two tone events one gap apart; `first`/`second` carry dur, peak and freq."""
    gap = _uniform(rng, (0.1, 0.3))
    return [
        {"kind": "tone", "start": 0.0, **first},
        {"kind": "tone", "start": first["dur"] + gap, **second},
    ]


def _scene_tone_count(answer: int, rng) -> tuple[list[dict], str]:
    count = answer + 1
    span = _uniform(rng, COUNT_SPAN_S)
    if count == 1:
        durs = [span]
        gaps: list[float] = []
    else:
        gaps = [_uniform(rng, COUNT_GAP_S) for _ in range(count - 1)]
        weights = rng.uniform(0.75, 1.25, size=count)
        durs = list((span - sum(gaps)) * weights / weights.sum())  # span fixed, tones share the rest
    bands = [str(rng.choice(list(PITCH_BANDS_HZ))) for _ in range(count)]
    events, t = [], 0.0
    for i in range(count):
        events.append({"kind": "tone", "start": t, "dur": float(durs[i]), "peak": _uniform(rng, TONE_PEAK),
                       "freq": _pitch(rng, bands[i])})
        t += float(durs[i]) + (gaps[i] if i < count - 1 else 0.0)
    facts = " ".join(f"tone {i + 1}: {b}." for i, b in enumerate(bands))
    noun = "tone" if count == 1 else "tones"
    return events, f"{facts} {NUMBER_WORDS[answer]} {noun}."


def _scene_pitch_compare(answer: int, rng) -> tuple[list[dict], str]:
    higher = answer == 0
    band1, band2 = _band_pair(rng, up=higher)
    events = _two_tones(rng, _tone(rng, pitch=band1), _tone(rng, pitch=band2))
    conclusion = "higher" if higher else "lower"
    return events, f"first tone: {band1}. second tone: {band2}. the second is {conclusion}."


def _scene_loudness_compare(answer: int, rng) -> tuple[list[dict], str]:
    louder = answer == 0
    level1, level2 = ("quiet", "loud") if louder else ("loud", "quiet")
    events = _two_tones(rng, _tone(rng, peak=LEVEL_BANDS_PEAK[level1]), _tone(rng, peak=LEVEL_BANDS_PEAK[level2]))
    conclusion = "louder" if louder else "softer"
    return events, f"first tone: {level1}. second tone: {level2}. the second is {conclusion}."


def _scene_duration_compare(answer: int, rng) -> tuple[list[dict], str]:
    first_longer = answer == 0
    len1, len2 = ("long", "short") if first_longer else ("short", "long")
    # The first tone is always low and the second always high, so telling the two apart needs no memory
    # of order and the task isolates duration (with random pitches the tiny model stayed at chance even
    # without the prior trap; with this it reached 1.0 in 300 supervised steps).
    events = _two_tones(
        rng, _tone(rng, pitch="low", dur=LENGTH_BANDS_S[len1]), _tone(rng, pitch="high", dur=LENGTH_BANDS_S[len2])
    )
    conclusion = "first" if first_longer else "second"
    return events, f"first tone: {len1}. second tone: {len2}. the {conclusion} is longer."


def _scene_sweep_direction(answer: int, rng) -> tuple[list[dict], str]:
    rising = answer == 0
    start_band, end_band = _band_pair(rng, up=rising)
    events = [{"kind": "sweep", "start": 0.0, "dur": _uniform(rng, (0.6, 1.2)), "peak": _uniform(rng, TONE_PEAK),
               "f0": _pitch(rng, start_band), "f1": _pitch(rng, end_band)}]
    conclusion = "rising" if rising else "falling"
    return events, f"start: {start_band}. end: {end_band}. the sweep is {conclusion}."


def _scene_event_order(answer: int, rng) -> tuple[list[dict], str]:
    tone_first = answer == 0
    tone = {"kind": "tone", **_tone(rng)}
    noise = {"kind": "noise", "dur": _uniform(rng, (0.3, 0.6)), "rms": _uniform(rng, NOISE_BURST_RMS)}
    first, second = (tone, noise) if tone_first else (noise, tone)
    gap = _uniform(rng, (0.1, 0.3))
    events = [{**first, "start": 0.0}, {**second, "start": first["dur"] + gap}]
    names = ("tone", "noise") if tone_first else ("noise", "tone")
    return events, f"first sound: {names[0]}. second sound: {names[1]}. the {names[0]} comes first."


_SCENES = {
    "tone_count": _scene_tone_count,
    "pitch_compare": _scene_pitch_compare,
    "loudness_compare": _scene_loudness_compare,
    "duration_compare": _scene_duration_compare,
    "sweep_direction": _scene_sweep_direction,
    "event_order": _scene_event_order,
}


def _round_event(event: dict) -> dict:
    """Round times to 0.1 ms and levels/frequencies to 4 decimals, so the JSON is short and the
    waveform rendered from the stored event is exactly the one written."""
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in event.items()}


def with_filler(trace: str, filler: list[str], position: str) -> str:
    """`trace` ("<facts> <conclusion>", the conclusion being its last sentence) with `filler` sentences
    inserted between the facts and the conclusion ("middle") or before the facts ("start")."""
    if not filler:
        return trace
    facts, sep, conclusion = trace.rpartition(". ")
    if not sep:
        raise ValueError(f"trace {trace!r} has no fact sentence before its conclusion")
    if position == "start":
        return " ".join([*filler, trace])
    return " ".join([facts + ".", *filler, conclusion])


def _item(cfg: SyntheticConfig, split: str, task: str, index: int, answer: int, wording: int) -> Record:
    spec = TASKS[task]
    # One generator per item (tag 1 = item; tag 0 is the split/task plan), independent of cfg.tasks.
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split), ALL_TASKS.index(task), 1, index])
    events, trace = _SCENES[task](answer, rng)
    span = max(e["start"] + e["dur"] for e in events)
    offset = _uniform(rng, (EDGE_MARGIN_S, cfg.clip_seconds - EDGE_MARGIN_S - span))
    events = [_round_event({**e, "start": e["start"] + offset}) for e in events]
    noise_seed = int(rng.integers(2**31))
    if cfg.filler_sentences:  # drawn last, so the scene and its audio equal those without filler
        picks = rng.choice(len(FILLER_SENTENCES), size=cfg.filler_sentences, replace=False)
        trace = with_filler(trace, [FILLER_SENTENCES[int(i)] for i in picks], cfg.filler_position)
    name = f"{task}_{index:05d}"
    return Record(
        id=f"{split}_{name}",
        audio=f"audio/{split}/{name}.wav",
        question=spec.wordings[wording],
        choices=list(spec.choices),
        answer=spec.choices[answer],
        task=task,
        split=split,
        trace=trace,
        meta={
            "wording_index": wording,
            "prior_aligned": wording == answer,
            "sample_rate": cfg.sample_rate,
            "n_samples": int(round(cfg.clip_seconds * cfg.sample_rate)),
            "noise_rms": round(10.0 ** (cfg.noise_db / 20.0), 8),
            "noise_seed": noise_seed,
            "events": events,
        },
    )


def generate(cfg: SyntheticConfig) -> dict[str, list[Record]]:
    """All records, {split: [Record]}, tasks in `cfg.tasks` order; no audio is rendered or written.

    Each record's `audio` is its path relative to `out_dir`; `meta` holds the scene (events, noise
    seed) that `render(record)` turns into the waveform.
    """
    _validate(cfg)
    out: dict[str, list[Record]] = {}
    for split in SPLITS:
        records: list[Record] = []
        for task in cfg.tasks:
            n_options = len(TASKS[task].choices)
            plan_rng = np.random.default_rng([cfg.seed, SPLITS.index(split), ALL_TASKS.index(task), 0])
            plan = _plan(split_size(cfg, split), n_options, split == "counter_prior", cfg.prior_strength, plan_rng)
            records += [_item(cfg, split, task, i, a, w) for i, (a, w) in enumerate(plan)]
        out[split] = records
    return out


# ---------------------------------------------------------------------------------------------
# Rendering: scene -> waveform.
# ---------------------------------------------------------------------------------------------


def _fade(n: int, sample_rate: int) -> np.ndarray:
    """Raised-cosine in/out envelope of length n (fade = FADE_S, at most a quarter of the event)."""
    k = max(1, min(int(FADE_S * sample_rate), n // 4))
    env = np.ones(n)
    ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(k) / k)
    env[:k] = ramp
    env[n - k :] = ramp[::-1]
    return env


def _event_samples(event: dict, n: int, sample_rate: int, rng) -> np.ndarray:
    """Samples of one event, shape [n] float64, before the fade."""
    t = np.arange(n) / sample_rate
    kind = event["kind"]
    if kind == "tone":
        return event["peak"] * np.sin(2 * np.pi * event["freq"] * t)
    if kind == "sweep":
        # Exponential chirp: f(t) = f0 * k^(t/D), k = f1/f0; the phase is its integral.
        f0, duration = event["f0"], event["dur"]
        k = event["f1"] / f0
        phase = 2 * np.pi * f0 * duration / np.log(k) * (k ** (t / duration) - 1.0)
        return event["peak"] * np.sin(phase)
    if kind == "noise":
        return event["rms"] * rng.standard_normal(n)
    raise ValueError(f"unknown event kind {kind!r} in {event}")


def render(record: Record) -> np.ndarray:
    """The clip of a generated record: float32 samples [meta.n_samples] in [-1, 1].

    Deterministic: background noise and noise bursts come from `meta.noise_seed`.
    """
    meta = record.meta
    try:
        sample_rate, n_total = meta["sample_rate"], meta["n_samples"]
        rng = np.random.default_rng(meta["noise_seed"])
        wave = meta["noise_rms"] * rng.standard_normal(n_total)
        events = meta["events"]
    except KeyError as err:
        raise ValueError(f"record {record.id}: meta lacks {err} (not a synthetic record?)") from None
    for event in events:
        start = int(round(event["start"] * sample_rate))
        n = int(round(event["dur"] * sample_rate))
        if start < 0 or start + n > n_total:
            raise ValueError(f"record {record.id}: event {event} falls outside the clip")
        wave[start : start + n] += _event_samples(event, n, sample_rate, rng) * _fade(n, sample_rate)
    return np.clip(wave, -1.0, 1.0).astype(np.float32)


def content_seconds(record: Record) -> float:
    """Seconds of sound (sum of event durations) in a generated record's clip."""
    return float(sum(e["dur"] for e in record.meta["events"]))


# ---------------------------------------------------------------------------------------------
# Writing and the summary.
# ---------------------------------------------------------------------------------------------


@dataclass
class Summary:
    """What `write_benchmark` wrote: counts, size on disk, time taken and the blind baselines."""

    out_dir: str
    counts: dict[str, dict[str, int]]  # split -> task -> items
    bytes_on_disk: int  # WAV files plus manifests
    seconds: float  # wall time of generation and writing
    baselines: dict[str, dict[str, float]]  # baseline name -> split -> accuracy

    def format(self) -> str:
        splits = list(self.counts)
        tasks = list(next(iter(self.counts.values())))
        width = max(len(t) for t in tasks + ["task", "total"])
        lines = [f"synthetic benchmark -> {self.out_dir}",
                 "task".ljust(width) + "".join(f"  {s:>13}" for s in splits)]
        for task in tasks:
            lines.append(task.ljust(width) + "".join(f"  {self.counts[s][task]:>13}" for s in splits))
        lines.append("total".ljust(width) + "".join(f"  {sum(self.counts[s].values()):>13}" for s in splits))
        lines.append(f"disk: {self.bytes_on_disk / 1e6:.1f} MB   time: {self.seconds:.1f} s")
        lines.append("blind baselines (accuracy; fit on train):")
        lines.append(format_baseline_table(self.baselines))
        return "\n".join(lines)


_WAV_NAME = re.compile(r"^[a-z_]+_\d{5}\.wav$")


def _write_wav(path: Path, wave: np.ndarray, sample_rate: int) -> None:
    with replacing(path) as tmp:
        sf.write(str(tmp), wave, sample_rate, subtype="PCM_16", format="WAV")


def write_benchmark(cfg: SyntheticConfig) -> Summary:
    """Generate, render and write the benchmark under `cfg.out_dir`; return its summary.

    WAVs of an earlier run that the new manifests do not name (e.g. after lowering n_train) are
    removed, so the folder holds exactly one benchmark.
    """
    t0 = time.perf_counter()
    splits = generate(cfg)
    root = Path(cfg.out_dir)
    lengths: dict[str, int] = {}
    total_bytes = 0
    for split, records in splits.items():
        audio_dir = root / "audio" / split
        audio_dir.mkdir(parents=True, exist_ok=True)
        for r in records:
            wave = render(r)
            path = root / r.audio
            _write_wav(path, wave, cfg.sample_rate)
            lengths[r.id] = len(wave)
            total_bytes += path.stat().st_size
        keep = {Path(r.audio).name for r in records}
        for stale in audio_dir.iterdir():
            if _WAV_NAME.match(stale.name) and stale.name not in keep:
                stale.unlink()
        manifest = root / f"{split}.jsonl"
        write_jsonl_atomic(manifest, (r.to_json() for r in records))
        total_bytes += manifest.stat().st_size
    settings = root / "benchmark.json"  # so a later user can tell which options made this folder
    options = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "out_dir"}  # same bytes wherever written
    write_text_atomic(settings, json.dumps(options, indent=1) + "\n")
    durations = {r.id: content_seconds(r) for records in splits.values() for r in records}
    table = baseline_table(splits, lengths, durations)
    counts = {s: dict(Counter(r.task for r in recs)) for s, recs in splits.items()}
    return Summary(str(root), counts, total_bytes, time.perf_counter() - t0, table)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_overrides(SyntheticConfig, argv)
    try:
        summary = write_benchmark(cfg)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    print(summary.format())


if __name__ == "__main__":
    main(sys.argv[1:])
