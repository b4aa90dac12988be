"""`python -m mapo.data.prep BENCH SRC --out OUT` (what `make prep BENCH=… SRC=… OUT=…` runs).

Turns a benchmark as released into a manifest `make check` accepts, with audio files on disk.

avqa: SRC is an AVQA annotation file (`train_qa.json`, `val_qa.json`: a JSON array, or JSONL) or a
    folder holding such files; each row has `id, video_name, video_id, question_text, multi_choice,
    answer` (0-based index), `question_relation, question_type`. Videos are `<video_name>.mp4` anywhere
    under --videos (default: SRC's folder). For every annotation file OUT gets `<file stem>.jsonl` in the
    AVQA layout (`mapo.data.adapters`) with `audio_path` = `audio/<video_name>.wav`: the video's audio as
    16 kHz mono 16-bit WAV (PyAV, the optional extra `video`), extracted once per video (an existing
    readable WAV is kept, so a rerun resumes). As R1-AQA does, "video" is rewritten to "audio" in the
    question (case kept: "Video" → "Audio"; the original is kept in `source_question`). Rows whose
    annotation is bad or whose video is missing or unreadable are left out and listed by line
    ("file:line: id: problem") on stdout and in OUT/prep_report.txt.
mmsu: SRC is a Hugging Face parquet file of MMSU (audio embedded) or a folder of them; OUT gets
    `audio/<id>.<ext>` (the embedded bytes as they are) and `mmsu.jsonl` in the MMSU layout.

Exit status 0 when a manifest was written (left-out rows are reported, not fatal; --strict makes them
exit 1), 2 on a usage error or when nothing could be read.
"""

from __future__ import annotations

import argparse
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from mapo.atomic import write_jsonl_atomic
from mapo.data.audio import AudioError, probe_audio

AVQA_REQUIRED = ("id", "video_name", "question_text", "multi_choice", "answer")
_VIDEO_WORD = re.compile(r"video", re.IGNORECASE)


def audio_question(question: str) -> str:
    """Rewrite "video" as "audio" keeping its case: "the video" → "the audio", "Videos" → "Audios"."""

    def swap(match: re.Match) -> str:
        word = match.group(0)
        if word.isupper():
            return "AUDIO"
        return "Audio" if word[0].isupper() else "audio"

    return _VIDEO_WORD.sub(swap, question)


def _annotation_files(src: Path) -> list[Path]:
    if src.is_file():
        return [src]
    if src.is_dir():
        return sorted(p for p in src.iterdir() if p.suffix.lower() in (".json", ".jsonl") and p.is_file())
    raise FileNotFoundError(f"{src}: no such annotation file or folder")


def _video_index(folder: Path) -> dict[str, Path]:
    """video stem -> path of every .mp4 under `folder` (first found wins)."""
    index: dict[str, Path] = {}
    for path in sorted(folder.rglob("*.mp4")):
        index.setdefault(path.stem, path)
    return index


def _annotation_problem(row: Any) -> str | None:
    if not isinstance(row, dict):
        return f"wrong type: row is {type(row).__name__}, expected an object"
    missing = [k for k in AVQA_REQUIRED if row.get(k) is None]
    if missing:
        return f"missing field(s): {', '.join(missing)}"
    if not isinstance(row["video_name"], str) or not row["video_name"]:
        return "'video_name' must be a non-empty string"
    if not isinstance(row["multi_choice"], list) or not row["multi_choice"]:
        return "'multi_choice' must be a non-empty list"
    answer = row["answer"]
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(row["multi_choice"]):
        return f"'answer' must be a 0-based index into the {len(row['multi_choice'])} choices, got {answer!r}"
    return None


def _extract(job: tuple[str, str]) -> str | None:
    """Worker: extract one video's audio (skipped when a readable WAV is there); the problem or None."""
    from mapo.data.video_audio import VideoAudioError, write_video_audio

    video, target = job
    try:
        probe_audio(target)
        return None
    except AudioError:
        pass  # not there yet (or broken): extract it
    try:
        write_video_audio(video, target)
    except VideoAudioError as err:
        return str(err)
    return None


def prep_avqa(src: Path, out: Path, videos: Path | None = None, workers: int = 1) -> tuple[list[Path], list[str]]:
    """Write one AVQA-layout manifest per annotation file; returns (manifests, problem lines)."""
    from mapo.data.validate import ManifestFormatError, read_rows  # the manifest reader's container parser

    files = _annotation_files(src)
    if not files:
        raise FileNotFoundError(f"{src}: no .json or .jsonl annotation files")
    index = _video_index(videos if videos is not None else (src if src.is_dir() else src.parent))
    problems: list[str] = []
    parsed: list[tuple[Path, list[tuple[int, Any]]]] = []
    for file in files:
        try:
            parsed.append((file, read_rows(file)))
        except ManifestFormatError as err:
            problems.append(str(err))
    # Every distinct video once, in parallel when asked.
    wanted = sorted({row["video_name"] for _, rows in parsed for _, row in rows if _annotation_problem(row) is None})
    jobs = [(str(index[name]), str(out / "audio" / f"{name}.wav")) for name in wanted if name in index]
    from tqdm import tqdm

    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(tqdm(pool.map(_extract, jobs), total=len(jobs), desc="videos", file=sys.stderr))
    else:
        results = [_extract(job) for job in tqdm(jobs, desc="videos", file=sys.stderr)]
    video_problem = dict(zip((Path(v).stem for v, _ in jobs), results))
    manifests = []
    for file, rows in parsed:
        kept = []
        for line, row in rows:
            problem = _annotation_problem(row)
            rid = row.get("id", "?") if isinstance(row, dict) else "?"
            if problem is None:
                name = row["video_name"]
                if name not in index:
                    problem = f"video {name}.mp4 not found"
                elif video_problem.get(name):
                    problem = f"video {index[name]}: {video_problem[name]}"
            if problem is not None:
                problems.append(f"{file}:{line}: {rid}: {problem}")
                continue
            kept.append({
                **{k: v for k, v in row.items() if k != "question_text"},
                "question_text": audio_question(row["question_text"]),
                "source_question": row["question_text"],
                "audio_path": f"audio/{row['video_name']}.wav",
            })
        manifest = out / f"{file.stem}.jsonl"
        write_jsonl_atomic(manifest, kept)
        manifests.append(manifest)
    return manifests, problems


def prep_mmsu(src: Path, out: Path) -> tuple[list[Path], list[str]]:
    """Convert MMSU parquet file(s) into OUT/mmsu.jsonl + OUT/audio/; returns ([manifest], problems)."""
    from mapo.data.parquet import parquet_rows

    files = [src] if src.is_file() else sorted(src.rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{src}: no .parquet files")
    rows, seen, problems = [], set(), []
    for file in files:
        for number, row in parquet_rows(file, audio_dir=out / "audio"):
            if row.get("id") in seen:
                problems.append(f"{file}:{number}: {row.get('id')}: duplicate id (kept the first)")
                continue
            seen.add(row.get("id"))
            if "audio_path" in row:
                row["audio_path"] = Path(row["audio_path"]).relative_to(out.absolute()).as_posix()
            rows.append(row)
    manifest = out / "mmsu.jsonl"
    write_jsonl_atomic(manifest, rows)
    return [manifest], problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mapo.data.prep", description=__doc__.split("\n\n")[0])
    parser.add_argument("bench", choices=("avqa", "mmsu"), help="which release SRC holds")
    parser.add_argument("src", type=Path, help="annotation file(s) (avqa) or parquet file(s) (mmsu)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (manifest + audio/)")
    parser.add_argument("--videos", type=Path, default=None, help="avqa: folder searched for <video_name>.mp4")
    parser.add_argument("--workers", type=int, default=1, help="avqa: processes extracting audio")
    parser.add_argument("--strict", action="store_true", help="exit 1 when any row was left out")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        if args.bench == "avqa":
            manifests, problems = prep_avqa(args.src, args.out, args.videos, args.workers)
        else:
            manifests, problems = prep_mmsu(args.src, args.out)
    except (FileNotFoundError, RuntimeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = args.out / "prep_report.txt"
    report.write_text("".join(p + "\n" for p in problems))
    for line in problems:
        print(line)
    for manifest in manifests:
        n = sum(1 for line in manifest.read_text().splitlines() if line.strip())
        print(f"[mapo] wrote {manifest} ({n} rows)")
    print(f"[mapo] {len(problems)} row(s) left out{f' (listed in {report})' if problems else ''}; "
          f"check with: make check DATA={manifests[0] if manifests else args.out}")
    return 1 if (problems and args.strict) else 0


if __name__ == "__main__":
    sys.exit(main())
