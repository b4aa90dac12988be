"""Files written whole or not at all.

The new content goes to a temporary sibling of the target, which is then renamed over it with
`os.replace`: one atomic rename on POSIX, which is why the temporary sits in the target's own folder
(a rename across file systems would be a copy). A reader sees the old file or the new one, never half
of one; a writer that raises leaves the old file as it was and removes its temporary.

- `replacing(path)`: a context manager yielding the temporary path, for writers that want a path of
  their own (soundfile, safetensors, `save_pretrained`, raw bytes). What they make there may be a file
  or a folder.
- `write_text_atomic(path, text)`, `write_json_atomic(path, payload)` and `write_jsonl_atomic(path, rows)`
  for the common cases.

The temporary is `.<name>.tmp<pid>`: hidden from folder listings and globs of the real files, and per
process, so two processes writing the same target never write into one temporary.

No fsync: a power cut may lose the newest write (the old file or nothing stays, never a torn one);
training checkpoints, which must survive that, sync their files themselves (`mapo.checkpoint`).
"""

from __future__ import annotations

import enum
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _remove(path: Path) -> None:
    """Delete `path`, file or folder, if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; when the block ends normally, rename it to `path`.

    The block writes a file or makes a folder at the yielded path. If it raises, the temporary is
    removed and `path` is untouched. The target's folder is created if missing. A folder replaces an
    existing folder of the same name, which is deleted just before the rename (`os.replace` cannot
    rename onto a non-empty folder), so for folders there is a short window with neither: a crash there
    leaves no folder, never a mixed one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    _remove(tmp)  # left by a killed earlier process that had the same pid
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` through a temporary file and a rename."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def json_default(obj: Any) -> Any:
    """`json.dumps` fallback for values configs and metrics hold: paths and enums as text, numpy/torch
    scalars as numbers; anything else raises TypeError naming its type."""
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    if isinstance(obj, enum.Enum):
        return obj.value
    raise TypeError(f"value of type {type(obj).__name__} is not JSON serialisable: {obj!r}")


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    """Write `payload` to `path` as indented JSON with a final newline, atomically (`json_default` for
    paths, enums and scalars). The text is made before the file is touched, so a payload that cannot be
    written leaves nothing behind."""
    write_text_atomic(path, json.dumps(payload, indent=2, default=json_default) + "\n")


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[Any]) -> None:
    """Write one JSON line per row to `path`, atomically; non-ASCII text is kept as is (readable manifests)."""
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
