"""The audio track of a video file as 16 kHz mono float32 samples, through PyAV (FFmpeg's libraries).

PyAV (`av`, the optional extra `video`) decodes the first audio stream of any container FFmpeg reads
(mp4, mkv, webm, …) and its resampler (libswresample) converts the rate; the channels are then averaged
(as `mapo.data.audio.load_audio` does), so no ffmpeg executable is needed. `VideoAudioError` says why a video gives no audio: unreadable, no audio
track, or no samples.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mapo.atomic import replacing
from mapo.data.audio import TARGET_SR


class VideoAudioError(ValueError):
    """No audio could be taken from a video; the message is the problem alone (no path)."""


def _av():
    try:
        import av
    except ImportError:
        raise RuntimeError(
            "extracting audio from videos needs PyAV; install the optional extra: pip install -e '.[video]'"
        ) from None
    return av


def video_audio(path: str | Path, sample_rate: int = TARGET_SR) -> np.ndarray:
    """Samples [n] float32 of the first audio stream of `path`, mono at `sample_rate`."""
    av = _av()
    path = Path(path)
    if not path.is_file():
        raise VideoAudioError("video file not found")
    chunks: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            stream = next((s for s in container.streams if s.type == "audio"), None)
            if stream is None:
                raise VideoAudioError("the video has no audio track")
            # Keep the channels through the rate conversion and average them here, as `load_audio` does
            # (FFmpeg's own down-mix weighs channels by 1/√2 and can push correlated stereo past 1.0).
            resampler = av.AudioResampler(format="fltp", layout=stream.layout.name, rate=sample_rate)
            for frame in container.decode(stream):
                chunks.extend(out.to_ndarray().mean(axis=0) for out in resampler.resample(frame))
            chunks.extend(out.to_ndarray().mean(axis=0) for out in resampler.resample(None))  # flush
    except av.FFmpegError as err:
        # strerror is FFmpeg's message without the file name (the caller names the file).
        raise VideoAudioError(f"unreadable video ({getattr(err, 'strerror', None) or err})") from None
    samples = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    if samples.size == 0:
        raise VideoAudioError("the audio track holds no samples")
    return samples.astype(np.float32, copy=False)


def write_video_audio(video: str | Path, target: str | Path, sample_rate: int = TARGET_SR) -> int:
    """Extract `video`'s audio into a 16-bit PCM WAV at `target` (atomically); returns the sample count."""
    import soundfile as sf

    samples = video_audio(video, sample_rate)
    with replacing(target) as tmp:
        sf.write(str(tmp), np.clip(samples, -1.0, 1.0), sample_rate, subtype="PCM_16", format="WAV")
    return int(samples.size)
