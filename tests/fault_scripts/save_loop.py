"""`python save_loop.py RUN_DIR [fsize_limit_bytes]`: saves a Phase checkpoint at steps 1, 2, 3, … with
every weight equal to the step number, printing "saving k" / "saved k <seconds>" around each save.

With a size limit, step 1 is saved normally, then RLIMIT_FSIZE is lowered (SIGXFSZ ignored, so writes
fail with EFBIG like a full disk) and step 2's save must raise: it prints "FAILED <type>: <message>" and
exits 3. Used by the fault suite to kill -9 a save midway and to fill the disk during one.
"""

import resource
import signal
import sys
import time
from pathlib import Path

import torch

from mapo import distributed as dist_utils
from mapo.config import AlgoConfig, DataConfig, LoggerConfig, MapoConfig, ModelConfig, RewardConfig, RolloutConfig, TrainerConfig
from mapo.phase import Phase


def build_phase():
    torch.manual_seed(0)
    cfg = MapoConfig(ModelConfig(), DataConfig(), RolloutConfig(), AlgoConfig(), RewardConfig(), TrainerConfig(), LoggerConfig())
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 512))  # 1.6 M weights
    phase = Phase("rl", dist_utils.ModelRunner(model), model, 1e-3, 1000, 0, "constant", cfg, list(range(10)))
    return phase, model


def set_step(phase, model, step):
    """One real optimizer step (so the optimizer has state), then every weight := step."""
    model(torch.ones(2, 1024)).sum().backward()
    phase.clip_and_step(1.0)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(step))
    phase.sampler.next_batch(3)
    phase.step = step


if __name__ == "__main__":
    run_dir = Path(sys.argv[1])
    limit = int(sys.argv[2]) if len(sys.argv) > 2 else None
    ctx = dist_utils.init_distributed("cpu")
    phase, model = build_phase()
    for step in range(1, 200):  # the caller kills it long before
        set_step(phase, model, step)
        if limit is not None and step == 2:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        print(f"saving {step}", flush=True)
        t0 = time.perf_counter()
        try:
            phase.save(run_dir, ctx, keep_last=2)
        except Exception as err:  # noqa: BLE001 — report what a full disk looks like to the caller
            print(f"FAILED {type(err).__name__}: {err}", flush=True)
            sys.exit(3)
        print(f"saved {step} {time.perf_counter() - t0:.4f}", flush=True)
        if limit is not None and step >= 2:
            sys.exit(0)  # the full disk went unnoticed: the caller's test fails on this status


def two_rank_worker(rank: int, world: int, port: str, run_dir: str) -> None:
    """One of two gloo ranks saving steps 1, 2 and 3; at step 2 rank 1, at step 3 rank 0, cannot write its
    small files (its RNG state; on rank 0 also the scheduler, trainer state and marker), as on a full disk.
    Writes rank<r>.json: step -> outcome ("saved" or the error)."""
    import errno
    import json
    import os

    import torch.distributed as dist

    import mapo.checkpoint as checkpoint

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ctx = dist_utils.DistContext(rank=rank, world_size=world)
    phase, model = build_phase()
    outcomes = {}
    real_save, real_write = checkpoint._save_synced, checkpoint._write_synced

    def full_disk(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    for step, failing_rank in ((1, None), (2, 1), (3, 0)):
        set_step(phase, model, step)
        if rank == failing_rank:
            checkpoint._save_synced, checkpoint._write_synced = full_disk, full_disk
        try:
            phase.save(Path(run_dir), ctx, keep_last=3)
            outcomes[step] = "saved"
        except OSError as err:
            outcomes[step] = f"{type(err).__name__} errno={err.errno}: {err}"
        finally:
            checkpoint._save_synced, checkpoint._write_synced = real_save, real_write
    Path(run_dir, f"rank{rank}.json").write_text(json.dumps(outcomes))
    dist.destroy_process_group()
