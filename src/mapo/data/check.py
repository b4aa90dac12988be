"""`python -m mapo.data.check PATH [--layout L] [--skip-bad]` (what `make check DATA=…` runs).

Validates one manifest in any supported layout and prints one line per bad row
("file:line: id: problem"), then a count line "N rows, K bad", then one line per conversion the good
rows will go through (clips cut to the audio window with --window, resampled, down-mixed). The audio
is decoded in parallel (--audio-check header reads headers only), with a progress bar on a terminal.

Exit status: 0 when every row is good; 1 when any row is bad (with or without --skip-bad: the check
always reports everything, and --skip-bad only adds how many rows a run with skip_bad would keep);
2 on a usage error or a manifest that cannot be read as a whole.
"""

from __future__ import annotations

import argparse
import sys

from mapo.data.adapters import LAYOUTS
from mapo.data.validate import AUDIO_CHECKS, ManifestFormatError, format_bad_rows, scan_manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mapo.data.check",
        description="Validate a manifest (our JSONL, MMAU JSON, MMAR meta JSON, MMSU JSONL or parquet, AVQA JSONL) and list every bad row.",
    )
    parser.add_argument("path", help="manifest: our JSONL, MMAU JSON, MMAR-meta.json, MMSU jsonl or parquet, AVQA JSONL")
    parser.add_argument("--layout", default="auto", choices=("auto", *LAYOUTS))
    parser.add_argument("--skip-bad", action="store_true", help="also say how many rows skip_bad would keep")
    parser.add_argument("--audio-check", default="decode", choices=AUDIO_CHECKS,
                        help="decode every clip (default) or read headers only (faster, blind to corrupt bodies)")
    parser.add_argument("--window", type=float, default=None, metavar="SECONDS",
                        help="the model's audio window (Qwen2-Audio: 30): count the clips that will be cut")
    parser.add_argument("--allow-outside-paths", action="store_true",
                        help="follow relative audio paths that leave the manifest's folder")
    parser.add_argument("--workers", type=int, default=0, help="threads for the audio check (0: one per core)")
    args = parser.parse_args(argv)  # exits 2 on a usage error

    try:
        result = scan_manifest(
            args.path, layout=args.layout, audio_check=args.audio_check, window_seconds=args.window,
            allow_outside_paths=args.allow_outside_paths, workers=args.workers, progress=sys.stderr.isatty(),
        )
    except ManifestFormatError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if result.bad:
        print(format_bad_rows(result.bad))
    print(f"{result.n_rows} rows, {len(result.bad)} bad")
    for note in result.notes(args.window):
        print(f"note: {note}")
    if args.skip_bad and result.bad:
        print(f"with skip_bad: {len(result.bad)} skipped, {len(result.records)} kept")
    return 1 if result.bad else 0


if __name__ == "__main__":
    sys.exit(main())
