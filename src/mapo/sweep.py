"""`make sweep EXP=tiny_mapo SWEEP='algo.mask.tau_base=0.5,1,2 algo.attn.schedule=power,exp'`.

Runs the Hydra multirun of `mapo.train` (each run in its own numbered folder under one sweep folder)
and then writes the summary table of every run's final metrics (`summary.csv`, `summary.md`).
A failed run does not stop the others from being listed: the summary marks it "failed".
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from mapo.sweep_summary import summarize_sweep

def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    experiment = next((a.split("=", 1)[1] for a in argv if a.startswith("experiment=")), "tiny_mapo")
    sweep_dir = next((a.split("=", 1)[1] for a in argv if a.startswith("hydra.sweep.dir=")), None)
    if sweep_dir is None:
        sweep_dir = f"multirun/{experiment}/{time.strftime('%Y-%m-%d_%H-%M-%S')}"
        argv.append(f"hydra.sweep.dir={sweep_dir}")
    from mapo.config import check_override_keys

    check_override_keys(argv)
    cmd = [sys.executable, "-m", "mapo.train", "--multirun", *argv]
    print("[mapo] sweep:", " ".join(cmd))
    code = subprocess.call(cmd)
    # Columns: the splits the runs evaluated (mapo.sweep_summary.eval_columns), not a fixed list.
    rows = summarize_sweep(Path(sweep_dir), eval_only=True)
    print(f"[mapo] sweep summary of {len(rows)} run(s): {Path(sweep_dir) / 'summary.md'}")
    print((Path(sweep_dir) / "summary.md").read_text())
    return code


if __name__ == "__main__":
    sys.exit(main())
