"""Read a clip as the model wants it: float32 mono at 16 kHz.

soundfile reads (wav, flac, ogg, mp3); channels are averaged; resampling uses soxr (the libsoxr
VHQ resampler, well kept and used by librosa) instead of a hand-written filter.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

TARGET_SR = 16_000


class AudioError(ValueError):
    """A clip that cannot be used: missing, unreadable or empty. The message names the file."""


def load_audio(path: str | Path, target_sr: int = TARGET_SR) -> np.ndarray:
    """Return the clip at `path` as float32 mono samples at `target_sr`, shape [n_samples]."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: audio file not found")
    try:
        samples, sr = sf.read(str(path), dtype="float32", always_2d=True)  # [n, channels]
    except (sf.LibsndfileError, RuntimeError) as err:
        raise AudioError(f"{path}: unreadable audio ({err})") from None
    if samples.shape[0] == 0:
        raise AudioError(f"{path}: empty audio (0 samples)")
    mono = samples.mean(axis=1)
    if sr != target_sr:
        mono = soxr.resample(mono, sr, target_sr, quality="VHQ").astype(np.float32)
    return np.ascontiguousarray(mono, dtype=np.float32)
