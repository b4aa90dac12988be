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
process, so two processes writing the same target never write into one temporary. A folder's write also
deletes the temporaries of its earlier writers whose processes no longer exist on this machine (process
ids are per machine: two machines must not write one target; under torchrun rank 0 writes exports).

No fsync: a power cut may lose the newest write (the old file or nothing stays, never a torn one);
training checkpoints, which must survive that, sync their files themselves (`mapo.checkpoint`).
"""

from __future__ import annotations

import enum
import json
import os
import re
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


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _clear_stale(path: Path) -> None:
    """Delete what killed writers of `path` left beside it (their process no longer exists): temporaries
    (`.<name>.tmp<pid>`) and old folders set aside for a replacement (`.<name>.old<pid>`)."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(tmp|old)(\d+)")
    for sibling in path.parent.iterdir():
        match = pattern.fullmatch(sibling.name)
        if match is not None and not _pid_alive(int(match.group(2))):
            _remove(sibling)


@contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; when the block ends normally, rename it to `path`.

    The block writes a file or makes a folder at the yielded path. If it raises, the temporary is
    removed and `path` is untouched. The target's folder is created if missing. A folder replaces an
    existing folder of the same name in two renames (`os.replace` cannot rename onto a non-empty folder):
    the old one is set aside as `.<name>.old<pid>`, the new one renamed into place, then the old one
    deleted; if the second rename fails the old folder is put back. A writer killed between the two renames
    leaves the old folder as `.<name>.old<pid>` (and the new one as its temporary); what killed writers of a
    folder left is deleted by the next write of that folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    _remove(tmp)  # left by a killed earlier process that had the same pid
    try:
        yield tmp
        if tmp.is_dir():
            # Folders (exports, caches: large, written rarely) are where a killed writer's leftovers cost
            # space; clearing them lists the parent folder, which file writes skip (a data folder may hold
            # many thousands of files written one by one).
            _clear_stale(path)
        if tmp.is_dir() and path.is_dir():
            aside = path.with_name(f".{path.name}.old{os.getpid()}")
            _remove(aside)
            os.replace(path, aside)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(aside, path)
                raise
            _remove(aside)
        else:
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
