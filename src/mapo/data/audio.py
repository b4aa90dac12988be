"""Read a clip as the model wants it: float32 mono at 16 kHz; probe a clip's header cheaply.

soundfile reads (wav, flac, ogg, mp3); channels are averaged; resampling uses soxr (the libsoxr
VHQ resampler, well kept and used by librosa) instead of a hand-written filter.

`probe_audio` reads only the header (`soundfile.info`), so the manifest check stays fast for
thousands of rows; it cannot see a body truncated after a valid header; `load_audio` still can.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

TARGET_SR = 16_000


class AudioError(ValueError):
    """A clip that cannot be used: missing, unreadable or empty.

    kind:    "missing" | "unreadable" | "empty" (lets callers count problems by kind).
    problem: the problem in words, without the path, e.g. "empty audio (0 samples)".
    path:    the file.
    """

    def __init__(self, path: str | Path, kind: str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path, self.kind, self.problem = str(path), kind, problem


def _open_problem(path: Path, err: Exception) -> AudioError:
    # libsndfile says "Format not recognised" for a 0-byte file; name it as the empty file it is.
    if path.stat().st_size == 0:
        return AudioError(path, "empty", "empty audio (0-byte file)")
    return AudioError(path, "unreadable", f"unreadable audio ({err})")


def probe_audio(path: str | Path) -> int:
    """Check from the header only that `path` is a readable, non-empty clip; return its frame count.

    Raises AudioError (kind missing / unreadable / empty) otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(path, "missing", "audio file not found")
    try:
        frames = sf.info(str(path)).frames
    except (sf.LibsndfileError, RuntimeError) as err:
        raise _open_problem(path, err) from None
    if frames == 0:
        raise AudioError(path, "empty", "empty audio (0 samples)")
    return frames


def load_audio(path: str | Path, target_sr: int = TARGET_SR) -> np.ndarray:
    """Return the clip at `path` as float32 mono samples at `target_sr`, shape [n_samples]."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(path, "missing", "audio file not found")
    try:
        samples, sr = sf.read(str(path), dtype="float32", always_2d=True)  # [n, channels]
    except (sf.LibsndfileError, RuntimeError) as err:
        raise _open_problem(path, err) from None
    if samples.shape[0] == 0:
        raise AudioError(path, "empty", "empty audio (0 samples)")
    mono = samples.mean(axis=1)  # [n]; a plain average, so L = -R cancels to silence
    if sr != target_sr:
        mono = soxr.resample(mono, sr, target_sr, quality="VHQ")
    return np.ascontiguousarray(mono, dtype=np.float32)
