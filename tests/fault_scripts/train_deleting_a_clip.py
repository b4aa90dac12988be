"""`python train_deleting_a_clip.py ROW key=value ...`: the training program, except that right after the
manifest check rank 0 deletes the audio of global row ROW of step 1 (a clip going bad mid-run).

Launched under torchrun by the fault suite; every other argument goes to `mapo.train` unchanged.
"""

import os
import sys

import mapo.train
from mapo.data.sampler import EpochSampler

ROW = int(sys.argv.pop(1))
real_load = mapo.train.load_run_data


def load_then_delete(data, model_path, **kwargs):
    result = real_load(data, model_path, **kwargs)
    if kwargs.get("is_main", True):
        seed = int(next((a.split("=", 1)[1] for a in sys.argv if a.startswith("trainer.seed=")), 0))
        n = int(next(a.split("=", 1)[1] for a in sys.argv if a.startswith("rollout.prompts_per_step=")))
        record = EpochSampler(result.train, seed=seed).next_batch(n)[ROW]
        os.remove(record.audio)
        print(f"[fault] deleted {record.audio} (row {record.id!r})", flush=True)
    return result


mapo.train.load_run_data = load_then_delete
mapo.train.main()
