"""Running on a cluster: the torch.distributed environment of a job started by Hydra's submitit launcher.

`make sweep ... LAUNCHER=submitit_slurm` (optional extra `cluster`: hydra-submitit-launcher) submits
each run of a sweep as a SLURM job. A job with several tasks (`hydra.launcher.tasks_per_node=8`,
`hydra.launcher.nodes=2`) starts one process per task without torchrun, so the variables torchrun would
set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) are missing; `export_job_environment`
sets them from the job (submitit's own helper) before `mapo.distributed.init_distributed` reads them.
Outside a submitit job, or when torchrun already set them, it does nothing.
"""

from __future__ import annotations

import os


def export_job_environment() -> bool:
    """Export torchrun's variables inside a multi-task submitit job; True when it did."""
    if "RANK" in os.environ or not os.environ.get("SUBMITIT_EXECUTOR"):
        return False
    try:
        import submitit
    except ImportError:  # the `cluster` extra is not installed: nothing submitted this process
        return False
    if submitit.JobEnvironment().num_tasks <= 1:
        return False
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return True
