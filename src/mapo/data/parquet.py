"""Rows of a Hugging Face parquet file whose audio is embedded (e.g. MMSU's current Hub release).

The Hub stores an `Audio` column as a struct `{"bytes": <file bytes>, "path": <original file name>}`.
Records hold audio *paths* (the collator loads and caches features by path), so each embedded clip is
written once, as the bytes it holds (no re-encoding), to a folder next to the parquet file,
`<parquet stem>_audio/` unless `audio_dir` says otherwise, and the row gets `audio_path` = that file. A
clip already there with the same size is not rewritten, so a second read costs only the parquet scan.
Files are written to a temporary name and renamed, so an interrupted read never leaves a half clip.

Rows come back as (row number, dict) with 1-based row numbers, the way the JSON readers give
(line, row), so a bad row is reported as "file.parquet:<row>". The other columns keep their values
(the layout's adapter reads them). Needs the optional extra `parquet` (pyarrow).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mapo.atomic import replacing

#: Batches of rows read at a time: bounds memory to a few dozen embedded clips.
BATCH_ROWS = 64

_MAGIC = ((b"RIFF", ".wav"), (b"fLaC", ".flac"), (b"OggS", ".ogg"), (b"ID3", ".mp3"), (b"\xff\xfb", ".mp3"))
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def default_audio_dir(path: str | Path) -> Path:
    """Where the clips of `path` go by default: `<folder>/<stem>_audio/`."""
    path = Path(path)
    return path.with_name(f"{path.stem}_audio")


def _suffix(audio: dict[str, Any]) -> str:
    """The clip's file suffix: from its original name, else from its first bytes, else .wav."""
    name = audio.get("path")
    if isinstance(name, str) and Path(name).suffix:
        return Path(name).suffix.lower()
    head = bytes(audio["bytes"][:4])
    return next((suffix for magic, suffix in _MAGIC if head.startswith(magic)), ".wav")


def _write_clip(data: bytes, target: Path) -> None:
    if target.is_file() and target.stat().st_size == len(data):
        return
    with replacing(target) as tmp:
        tmp.write_bytes(data)


def parquet_rows(path: str | Path, audio_dir: str | Path | None = None, what: str = "manifest") -> list[tuple[int, Any]]:
    """(row number, row dict) for every row of a parquet file, embedded audio written out (module docstring).

    `what` names the file in messages. A missing file is `mapo.data.validate.read_rows`'s to refuse (it
    checks every container before reading); a file without rows is refused here too, for `mapo.data.prep`,
    which reads parquet files directly (an MMSU file without rows must not become an empty manifest)."""
    from mapo.data.validate import ManifestFormatError  # the readers' whole-file error (imported late: no cycle)

    path = Path(path)
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ManifestFormatError(
            f"{path}: reading parquet needs pyarrow; install the optional extra: pip install -e '.[parquet]'"
        ) from None
    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise ManifestFormatError(f"{path}: not a readable parquet file ({err})") from None
    clips = Path(audio_dir) if audio_dir is not None else default_audio_dir(path)
    rows: list[tuple[int, Any]] = []
    number = 0
    for batch in table.iter_batches(batch_size=BATCH_ROWS):
        for row in batch.to_pylist():
            number += 1
            audio = row.get("audio")
            if isinstance(audio, dict) and audio.get("bytes"):
                clips.mkdir(parents=True, exist_ok=True)
                stem = _UNSAFE.sub("_", str(row.get("id", number))) or str(number)
                target = clips / f"{stem}{_suffix(audio)}"
                _write_clip(bytes(audio["bytes"]), target)
                del row["audio"]
                row["audio_path"] = str(target.absolute())
            rows.append((number, row))
    if not rows:
        raise ManifestFormatError(f"{path}: {what} holds no rows")
    return rows
