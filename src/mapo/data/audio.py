"""Read a clip as the model wants it: float32 mono at 16 kHz; probe a clip's header cheaply.

soundfile reads (wav, flac, ogg, mp3); channels are averaged; resampling uses soxr (the libsoxr
VHQ resampler, well kept and used by librosa) instead of a hand-written filter.

`probe_audio` / `audio_info` read only the header (`soundfile.info`): fast, but blind to a body that
is corrupt after a valid header (a FLAC that lost sync, float samples that are NaN). `verify_audio`
decodes the whole body block by block (no resampling, bounded memory) and catches those too; the
manifest check uses it by default (`audio_check="decode"`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

TARGET_SR = 16_000
#: The shortest clip, in samples at TARGET_SR, that gives one audio position in every supported family.
#: All of them (Qwen2-Audio, Qwen2.5-Omni, Qwen3-Omni) use the Whisper feature extractor: hop 160, so
#: ceil(n / 160) valid mel frames. Qwen2-Audio and Qwen2.5-Omni (conv stride 2 then pool 2) need 3 frames,
#: Qwen3-Omni (three stride-2 convs, rounding up) needs 1: the strictest is kept. It is a constant, not an
#: adapter method, because the manifest check has no model (`make check` has none; `read_manifest` is
#: given only the window length); the collator applies each family's exact rule
#: (`ModelAdapter.num_audio_tokens`) at batching. tests/test_adapter.py checks the value against every
#: registered family's formula.
MIN_TARGET_SAMPLES = 321


class AudioError(ValueError):
    """A clip that cannot be used: missing, unreadable or empty.

    kind:    "missing" | "unreadable" | "empty" | "corrupt" | "too_short" (lets callers count problems by kind).
    problem: the problem in words, without the path, e.g. "empty audio (0 samples)".
    path:    the file.
    """

    def __init__(self, path: str | Path, kind: str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path, self.kind, self.problem = str(path), kind, problem


def _open_problem(path: Path, err: Exception) -> AudioError:
    try:
        size = path.stat().st_size
    except FileNotFoundError:  # deleted between the existence check and the read (a run's data moving)
        return AudioError(path, "missing", "audio file not found")
    # libsndfile says "Format not recognised" for a 0-byte file; name it as the empty file it is.
    if size == 0:
        return AudioError(path, "empty", "empty audio (0-byte file)")
    return AudioError(path, "unreadable", f"unreadable audio ({err})")


@dataclass(frozen=True)
class AudioInfo:
    """What the header (or a full decode) says about a clip: frames per channel, rate, channel count."""

    frames: int
    samplerate: int
    channels: int

    @property
    def seconds(self) -> float:
        return self.frames / self.samplerate


def audio_info(path: str | Path) -> AudioInfo:
    """Check from the header only that `path` is a readable, non-empty clip; return what it holds.

    Raises AudioError (kind missing / unreadable / empty) otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(path, "missing", "audio file not found")
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError) as err:
        raise _open_problem(path, err) from None
    if info.frames == 0:
        raise AudioError(path, "empty", "empty audio (0 samples)")
    return AudioInfo(int(info.frames), int(info.samplerate), int(info.channels))


def probe_audio(path: str | Path) -> int:
    """`audio_info(path).frames`: the frame count from the header (raises AudioError like it)."""
    return audio_info(path).frames


#: Frames decoded at a time by `verify_audio` (64 Ki frames: a few hundred KB per block).
VERIFY_BLOCK = 1 << 16


def verify_audio(path: str | Path) -> AudioInfo:
    """Decode the whole clip block by block: the header check of `audio_info` plus a readable body.

    Raises AudioError kind "corrupt" when decoding fails part-way (e.g. "flac decoder lost sync") or a
    sample is NaN/inf (float WAVs can hold them; one would turn every later loss into NaN), and kind
    "empty" when the body holds no frame although the header promised some. Returns the header's
    info with `frames` = the frames actually decoded (a truncated WAV decodes fewer than promised).
    """
    info = audio_info(path)
    frames = 0
    try:
        with sf.SoundFile(str(path)) as handle:
            while True:
                block = handle.read(VERIFY_BLOCK, dtype="float32", always_2d=True)
                if len(block) == 0:
                    break
                if not np.isfinite(block).all():
                    bad = frames + int(np.argmax(~np.isfinite(block).all(axis=1)))
                    raise AudioError(path, "corrupt", f"corrupt audio (non-finite sample at frame {bad})")
                frames += len(block)
    except (sf.LibsndfileError, RuntimeError) as err:
        raise AudioError(path, "corrupt", f"corrupt audio (decoding failed: {err})") from None
    if frames == 0:
        raise AudioError(path, "empty", "empty audio (0 samples decoded)")
    return AudioInfo(frames, info.samplerate, info.channels)


def load_audio(path: str | Path, target_sr: int = TARGET_SR) -> np.ndarray:
    """Return the clip at `path` as float32 mono samples at `target_sr`, shape [n_samples].

    Other rates are resampled and several channels averaged (the caller may count both with
    `audio_info`). Raises AudioError (missing / unreadable / empty / corrupt) for a clip it cannot use.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(path, "missing", "audio file not found")
    try:
        samples, sr = sf.read(str(path), dtype="float32", always_2d=True)  # [n, channels]
    except (sf.LibsndfileError, RuntimeError) as err:
        raise _open_problem(path, err) from None
    if samples.shape[0] == 0:
        raise AudioError(path, "empty", "empty audio (0 samples)")
    if not np.isfinite(samples).all():
        raise AudioError(path, "corrupt", "corrupt audio (non-finite samples)")
    mono = samples.mean(axis=1)  # [n]; a plain average, so L = -R cancels to silence
    if sr != target_sr:
        mono = soxr.resample(mono, sr, target_sr, quality="VHQ")
    return np.ascontiguousarray(mono, dtype=np.float32)
