"""Read and validate a manifest before anything trains on it (DESIGN §5).

`read_manifest` reads any supported layout (see adapters.py), checks every row and either returns the
records or stops with a `ManifestError` that lists every bad row as "file:line: id: problem". With
`skip_bad=True` the bad rows are dropped, counted in `ManifestResult.skipped` and logged (never
silent). `scan_manifest` does the same reading but never stops on bad rows; the `make check` CLI uses it.

Containers: a file whose first non-blank character is "[" (and whose name does not end in .jsonl) is
one JSON array, the MMAU way; anything else is JSONL, one object per line. For a JSON array a row's
"line" is the 1-based line on which its object starts. A syntax error inside a JSON array cannot be
skipped (nothing after it can be located), so it stops the read as a `ManifestFormatError`; in JSONL
a bad line is just one bad row. JSONL is read as bytes and decoded line by line, so a line that is not
valid UTF-8 is one bad row (named with its line and byte) and every other row is still checked; in a
JSON array such lines stop the read, listed.

Paths: a relative audio path is resolved against the manifest's folder; one that leaves it ("../x.wav")
is a bad row unless `allow_outside_paths` (a manifest from elsewhere must not make the run read files
outside its data folder unasked). Absolute paths are the user's explicit choice and are kept.

Audio is checked once per distinct path, in parallel threads (libsndfile releases the GIL), with a
progress bar when asked: `audio_check="decode"` (default) decodes every clip block by block and
catches corrupt bodies and NaN samples; `"header"` reads headers only (about 0.3 s per thousand clips
on this 2-core machine). Clips that will be converted (other sample rate: resampled; several channels:
averaged) are counted, and clips longer than `window_seconds` are listed in `ManifestResult.cut`: they
are kept and cut to the window at batching time, counted, never silently.
"""

from __future__ import annotations

import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from mapo.data.adapters import ADAPTERS, LAYOUTS, RowError, detect_layout, layout_help
from mapo.data.audio import MIN_TARGET_SAMPLES, TARGET_SR, AudioError, AudioInfo, audio_info, verify_audio
from mapo.data.schema import Record

log = logging.getLogger(__name__)

#: How many bad rows a skip warning spells out before summarising the rest.
MAX_LOGGED_ROWS = 50
#: How the audio of each row is checked: decode the whole body, or read the header only.
AUDIO_CHECKS = ("decode", "header")


@dataclass(frozen=True)
class BadRow:
    """One rejected row. line is 1-based; id is "?" when the row has none readable."""

    file: str
    line: int
    id: str
    problem: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.id}: {self.problem}"


@dataclass
class ManifestResult:
    """The good rows as records, the bad rows, and how many bad rows were skipped (0 unless skip_bad).

    cut:       good rows whose clip is longer than the audio window (kept; the model sees the start).
    converted: {"resampled": distinct clips at another sample rate, "downmixed": clips with > 1 channel}.
    """

    path: str
    layout: str
    records: list[Record] = field(default_factory=list)
    bad: list[BadRow] = field(default_factory=list)
    skipped: int = 0
    record_lines: list[int] = field(default_factory=list)  # the line of each record, in `records` order
    cut: list[BadRow] = field(default_factory=list)
    converted: dict[str, int] = field(default_factory=lambda: {"resampled": 0, "downmixed": 0})

    @property
    def n_rows(self) -> int:
        return len(self.records) + len(self.bad)

    def notes(self, window_seconds: float | None = None) -> list[str]:
        """One line per kind of conversion the good rows will go through (empty when none)."""
        out = []
        if self.cut:
            window = f"{window_seconds:g} s " if window_seconds else ""
            out.append(f"{len(self.cut)} row(s) have clips longer than the {window}audio window: they are cut to "
                       f"it (first: {self.cut[0]})")
        if self.converted["resampled"]:
            out.append(f"{self.converted['resampled']} clip(s) at another sample rate: resampled to {TARGET_SR} Hz")
        if self.converted["downmixed"]:
            out.append(f"{self.converted['downmixed']} clip(s) with several channels: averaged to mono")
        return out


class ManifestError(ValueError):
    """The manifest has bad rows (listed in `bad`) and the user did not ask to skip them."""

    def __init__(self, message: str, bad: list[BadRow] | None = None):
        super().__init__(message)
        self.bad = bad or []


class ManifestFormatError(ManifestError):
    """The manifest cannot be read as a whole: missing, not UTF-8, broken JSON array, unknown layout."""


# ------------------------------------------------------------------------------------ containers

_WHITESPACE = re.compile(r"[ \t\n\r]*")
_WHITESPACE_BYTES = re.compile(rb"[ \t\n\r]*")


_BOM = b"\xef\xbb\xbf"  # the UTF-8 byte-order mark some editors write; tolerated at the start


def _read_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    return data[len(_BOM):] if data.startswith(_BOM) else data


def _utf8_problem(line: bytes) -> str | None:
    """None when `line` is valid UTF-8, else the problem in words (the first bad byte and its column)."""
    try:
        line.decode("utf-8")
        return None
    except UnicodeDecodeError as err:
        return f"not valid UTF-8: byte 0x{line[err.start]:02x} at byte column {err.start + 1} ({err.reason})"


def _jsonl_rows(data: bytes) -> Iterator[tuple[int, Any]]:
    """(line, parsed object or RowError) for each non-blank line."""
    # split on b"\n", not splitlines(): JSON strings may hold U+2028 etc., which splitlines breaks on.
    for line_no, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        problem = _utf8_problem(raw)
        if problem is not None:
            yield line_no, RowError(problem)
            continue
        try:
            yield line_no, json.loads(raw.decode("utf-8"))
        except json.JSONDecodeError as err:
            yield line_no, RowError(f"invalid JSON: {err.msg} at column {err.colno}")


def _json_array_rows(text: str, path: Path) -> Iterator[tuple[int, Any]]:
    """(line where the element starts, element) for each element of a top-level JSON array."""
    decoder = json.JSONDecoder()

    def fail(message: str, index: int) -> ManifestFormatError:
        line = text.count("\n", 0, index) + 1
        return ManifestFormatError(
            f"{path}:{line}: invalid JSON: {message}; a JSON array cannot be read past a syntax error"
        )

    index = _WHITESPACE.match(text, 0).end() + 1  # just past "["
    index = _WHITESPACE.match(text, index).end()
    if text.startswith("]", index):
        return
    line, counted_to = 1, 0
    while True:
        # Count newlines incrementally so the whole pass stays linear in the file size.
        line += text.count("\n", counted_to, index)
        counted_to = index
        try:
            element, end = decoder.raw_decode(text, index)
        except json.JSONDecodeError as err:
            raise fail(f"{err.msg} at column {err.colno}", err.pos) from None
        yield line, element
        index = _WHITESPACE.match(text, end).end()
        if text.startswith(",", index):
            index = _WHITESPACE.match(text, index + 1).end()
        elif text.startswith("]", index):
            break
        else:
            raise fail("expected ',' or ']' after an element", index)
    trailing = _WHITESPACE.match(text, index + 1).end()
    if trailing != len(text):
        raise fail("extra data after the closing ']'", trailing)


def _decode_array(data: bytes, path: Path) -> str:
    """A JSON array's text; every line that is not UTF-8 is named (the array cannot be read past one)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    bad = [(n, problem) for n, line in enumerate(data.split(b"\n"), start=1) if (problem := _utf8_problem(line))]
    listed = "\n".join(f"{path}:{n}: {problem}" for n, problem in bad[:MAX_LOGGED_ROWS])
    raise ManifestFormatError(
        f"{path}: {len(bad)} line(s) are not valid UTF-8 text; a JSON array cannot be read past them:\n{listed}"
    )


def read_rows(path: Path, what: str = "manifest") -> list[tuple[int, Any]]:
    """(line, row) for every row of a JSON array, JSONL or parquet file (the containers of the module
    docstring), in file order. A JSONL line that cannot be parsed comes back as a `RowError` in its row's
    place; what stops the whole file raises `ManifestFormatError` naming the file (and line). `what`
    names the file in those messages ("manifest", "predictions file"); a missing file and a file without
    rows are refused here, the same for every container."""
    if not path.is_file():
        raise ManifestFormatError(f"{path}: {what} not found (or not a file)")
    if path.suffix.lower() == ".parquet":  # Hugging Face layout, audio embedded (mapo.data.parquet)
        from mapo.data.parquet import parquet_rows

        rows = parquet_rows(path, what=what)
    else:
        data = _read_bytes(path)
        first = _WHITESPACE_BYTES.match(data).end()
        if data[first:first + 1] == b"[" and path.suffix.lower() not in (".jsonl", ".ndjson"):
            rows = list(_json_array_rows(_decode_array(data, path), path))
        else:
            rows = list(_jsonl_rows(data))
    if not rows:
        raise ManifestFormatError(f"{path}: {what} holds no rows")
    return rows


def _pick_layout(layout: str, rows: list[tuple[int, Any]], path: Path) -> str:
    if layout != "auto":
        return layout
    # The first row that is an object decides; broken lines before it are reported as rows later.
    for line, row in rows:
        if isinstance(row, dict):
            detected = detect_layout(row)
            if detected is None:
                raise ManifestFormatError(
                    f"{path}:{line}: cannot tell the layout from the keys {sorted(row)}; "
                    f"valid layouts: {layout_help()}. Pass the layout explicitly if the file is one of these."
                )
            return detected
    problems = [f"{path}:{line}: {row}" for line, row in rows if isinstance(row, RowError)][:5]
    listed = "".join(f"\n{p}" for p in problems)
    raise ManifestFormatError(f"{path}: no row is a JSON object; valid layouts: {layout_help()}{listed}")


# ------------------------------------------------------------------------------------ reading


def scan_manifest(
    path: str | Path,
    layout: str = "auto",
    check_audio: bool = True,
    *,
    audio_check: str = "decode",
    window_seconds: float | None = None,
    allow_outside_paths: bool = False,
    workers: int = 0,
    progress: bool = False,
) -> ManifestResult:
    """Read every row of `path`; return the good ones as records and the bad ones as `BadRow`s.

    check_audio:         False skips every audio check (the rows' fields are still checked).
    audio_check:         "decode" (whole body) or "header" (see the module docstring).
    window_seconds:      the model's audio window; longer clips are listed in `.cut` (None: not checked).
    allow_outside_paths: follow relative audio paths that leave the manifest's folder.
    workers:             threads for the audio check (0: one per CPU core, at most 16).
    progress:            show a progress bar on stderr while the audio is checked.
    Never raises for a bad row; raises ManifestFormatError when the file as a whole cannot be read,
    and ValueError for an unknown `layout` or `audio_check`.
    """
    if layout != "auto" and layout not in ADAPTERS:
        raise ValueError(f"unknown manifest layout {layout!r}; valid: auto, {', '.join(LAYOUTS)}")
    if audio_check not in AUDIO_CHECKS:
        raise ValueError(f"unknown audio_check {audio_check!r}; valid: {', '.join(AUDIO_CHECKS)}")
    path = Path(path)
    rows = read_rows(path)
    adapter = ADAPTERS[_pick_layout(layout, rows, path)]
    base_dir = path.parent.absolute()
    folder = os.path.normpath(str(base_dir))
    file = str(path)

    result = ManifestResult(path=file, layout=adapter.name)
    first_line_of_id: dict[str, int] = {}
    parsed: list[tuple[int, Record]] = []
    for line, row in rows:
        if isinstance(row, RowError):
            result.bad.append(BadRow(file, line, "?", str(row)))
            continue
        if not isinstance(row, dict):
            result.bad.append(BadRow(file, line, "?", f"wrong type: row is {type(row).__name__}, expected an object"))
            continue
        try:
            record = adapter.parse(row, base_dir)
        except RowError as err:
            result.bad.append(BadRow(file, line, adapter.peek_id(row), str(err)))
            continue
        if record.id in first_line_of_id:
            problem = f"duplicate id (first at line {first_line_of_id[record.id]})"
            result.bad.append(BadRow(file, line, record.id, problem))
            continue
        first_line_of_id[record.id] = line
        if not allow_outside_paths and record.audio is not None:
            raw = row.get(adapter.audio_key)
            if _leaves_folder(raw, record.audio, folder):
                problem = (f"audio path {raw!r} leaves the manifest's folder {folder} (not followed; allow it "
                           "with data.allow_outside_paths=true or --allow-outside-paths)")
                result.bad.append(BadRow(file, line, record.id, problem))
                continue
        parsed.append((line, record))

    clips: dict[str, AudioInfo | AudioError] = {}
    if check_audio:
        clips = check_clips(sorted({r.audio for _, r in parsed if r.audio is not None}), audio_check, workers,
                            progress, desc=f"checking audio of {path.name}")
    for line, record in parsed:
        clip = clips.get(record.audio) if record.audio is not None else None
        if isinstance(clip, AudioError):
            result.bad.append(BadRow(file, line, record.id, f"{clip.problem}: {record.audio}"))
            continue
        if isinstance(clip, AudioInfo) and window_seconds and clip.seconds > window_seconds:
            note = f"{clip.seconds:.2f} s is longer than the {window_seconds:g} s audio window; cut to it"
            result.cut.append(BadRow(file, line, record.id, note))
        result.records.append(record)
        result.record_lines.append(line)
    infos = [clip for clip in clips.values() if isinstance(clip, AudioInfo)]
    result.converted = {"resampled": sum(i.samplerate != TARGET_SR for i in infos),
                        "downmixed": sum(i.channels > 1 for i in infos)}
    result.bad.sort(key=lambda row: row.line)
    return result


def _leaves_folder(raw: Any, resolved: str, folder: str) -> bool:
    """True when the row gave a relative path (`raw`) whose resolved form lies outside `folder`."""
    if not isinstance(raw, str) or os.path.isabs(os.path.expanduser(raw.strip())):
        return False
    return os.path.commonpath([resolved, folder]) != folder


def check_clip(path: str, audio_check: str = "decode") -> AudioInfo:
    """One clip's info, or AudioError when it cannot be used (too short counts: it gives no audio token in
    some supported family; the manifest check has no model, so it uses the strictest, `MIN_TARGET_SAMPLES`)."""
    info = verify_audio(path) if audio_check == "decode" else audio_info(path)
    if info.frames * TARGET_SR / info.samplerate < MIN_TARGET_SAMPLES:
        raise AudioError(path, "too_short", f"audio too short ({info.frames} frames at {info.samplerate} Hz, "
                                            f"under {MIN_TARGET_SAMPLES / TARGET_SR:.4f} s gives no audio token)")
    return info


def check_clips(paths: list[str], audio_check: str = "decode", workers: int = 0, progress: bool = False,
                desc: str = "checking audio") -> dict[str, AudioInfo | AudioError]:
    """`check_clip` for every path, in `workers` threads (0: one per core, at most 16), with a progress bar."""
    from tqdm.auto import tqdm

    def one(clip: str) -> AudioInfo | AudioError:
        try:
            return check_clip(clip, audio_check)
        except AudioError as err:
            return err

    if not paths:
        return {}
    workers = workers if workers > 0 else min(16, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=len(paths), desc=desc, unit="clip", disable=not progress, mininterval=0.5) as bar:
        out = {}
        for clip, outcome in zip(paths, pool.map(one, paths)):
            out[clip] = outcome
            bar.update(1)
    return out


def format_bad_rows(bad: list[BadRow], limit: int | None = None) -> str:
    """One "file:line: id: problem" line per bad row (the first `limit`, then a count of the rest)."""
    shown = bad if limit is None else bad[:limit]
    lines = [str(row) for row in shown]
    if len(shown) < len(bad):
        lines.append(f"... and {len(bad) - len(shown)} more")
    return "\n".join(lines)


def read_manifest(
    path: str | Path,
    layout: str = "auto",
    skip_bad: bool = False,
    check_audio: bool = True,
    *,
    share: Callable[[list[int]], list[int]] | None = None,
    report: bool = True,
    **scan_options: Any,
) -> ManifestResult:
    """Read and validate a manifest (layout "auto", "ours", "mmau" or "avqa").

    Bad rows stop the read with a ManifestError listing every one of them, unless `skip_bad`, in which
    case they are dropped, counted in `.skipped` and logged as a warning. `scan_options` go to
    `scan_manifest` (audio_check, window_seconds, allow_outside_paths, workers, progress).

    Several processes: one process (rank 0) checks the audio (`check_audio=True`) and the others only
    parse (`check_audio=False`); `share(lines)` must return rank 0's list on every rank (an all-gather).
    Every rank then drops the same rows, and every rank raises when rank 0 found bad rows and skip_bad
    is off, so none is left waiting. `report=False` keeps a non-zero rank quiet.
    """
    result = scan_manifest(path, layout=layout, check_audio=check_audio, **scan_options)
    if share is not None:
        _adopt_bad_lines(result, share([row.line for row in result.bad]))
    if not result.bad:
        return result
    count = f"{len(result.bad)} bad row(s) of {result.n_rows} in {result.path} ({result.layout} layout)"
    if not skip_bad:
        raise ManifestError(
            f"{count}:\n{format_bad_rows(result.bad)}\n"
            "Fix these rows, or choose to skip bad rows (skip_bad) to train on the rest.",
            result.bad,
        )
    result.skipped = len(result.bad)
    if report:
        log.warning(
            "skipping %s:\n%s\n(`make check DATA=%s` lists them all)",
            count, format_bad_rows(result.bad, limit=MAX_LOGGED_ROWS), result.path,
        )
    return result


def _adopt_bad_lines(result: ManifestResult, bad_lines: list[int]) -> None:
    """Make `result` reject exactly the rows on `bad_lines` (rank 0's verdict, which checked the audio)."""
    found = {row.line for row in result.bad}
    extra = set(bad_lines) - found
    if not extra:
        return
    kept = [(r, n) for r, n in zip(result.records, result.record_lines) if n not in extra]
    dropped = [(r, n) for r, n in zip(result.records, result.record_lines) if n in extra]
    result.records, result.record_lines = [r for r, _ in kept], [n for _, n in kept]
    result.bad += [BadRow(result.path, n, r.id, "bad audio (reported by rank 0)") for r, n in dropped]
    result.bad.sort(key=lambda row: row.line)
