"""`python -m mapo.data.check PATH [--layout L] [--skip-bad]` (what `make check DATA=…` runs).

Validates one manifest in any supported layout and prints one line per bad row
("file:line: id: problem"), then a count line "N rows, K bad".

Exit status: 0 when every row is good; 1 when any row is bad (with or without --skip-bad: the check
always reports everything, and --skip-bad only adds how many rows a run with skip_bad would keep);
2 on a usage error or a manifest that cannot be read as a whole.
"""

from __future__ import annotations

import argparse
import sys

from mapo.data.adapters import LAYOUTS
from mapo.data.validate import ManifestFormatError, format_bad_rows, scan_manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mapo.data.check",
        description="Validate a manifest (our JSONL, MMAU JSON, AVQA JSONL) and list every bad row.",
    )
    parser.add_argument("path", help="manifest: our JSONL, MMAU JSON or AVQA JSONL")
    parser.add_argument("--layout", default="auto", choices=("auto", *LAYOUTS))
    parser.add_argument("--skip-bad", action="store_true", help="also say how many rows skip_bad would keep")
    args = parser.parse_args(argv)  # exits 2 on a usage error

    try:
        result = scan_manifest(args.path, layout=args.layout)
    except ManifestFormatError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if result.bad:
        print(format_bad_rows(result.bad))
    print(f"{result.n_rows} rows, {len(result.bad)} bad")
    if args.skip_bad and result.bad:
        print(f"with skip_bad: {len(result.bad)} skipped, {len(result.records)} kept")
    return 1 if result.bad else 0


if __name__ == "__main__":
    sys.exit(main())
