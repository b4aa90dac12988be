"""Training checkpoints: sharded with `torch.distributed.checkpoint` (DCP), written atomically, pruned
to the last K, resumed bit-for-bit (DESIGN §10).

Layout of one checkpoint, `<run_dir>/checkpoints/step_000123/`:

    state/               DCP folder (`.metadata` + `__<rank>_<n>.distcp`): the model weights that train and
                         the optimizer state. Each rank writes only its own shards and reads back only
                         the shards it needs (DCP plans the reads; a different world size reshards).
    scheduler.pt         LR scheduler state dict, or None (torch.save, rank 0)
    rng_<rank>.pt        each rank's RNG states (python, numpy, torch CPU, CUDA)
    trainer_state.json   {"step": 123, ...}: data position, sampler state, run settings, anything JSON
    COMPLETE             written LAST, by rank 0: {"step", "world_size", "files"}; only folders holding it count

What "the model weights that train" means: `TrainingState` keeps only parameters with requires_grad (e.g.
the LoRA adapters, or everything but a frozen audio tower); the frozen rest is rebuilt at resume exactly
as at the start (same model folder, same cached warm start).

Atomicity: every rank writes into `checkpoints/.tmp-step_000123/` (rank 0 makes it, after deleting
leftovers of saves that died); once every rank reports its files written (an all-reduce, not a barrier,
so a rank whose disk filled up does not leave the others waiting), rank 0 fsyncs, writes the marker last
and renames the folder into place with `os.replace` (one atomic rename on POSIX). A failed save raises
`CheckpointWriteError` (an OSError carrying the cause's errno, e.g. ENOSPC) on every rank. A save that dies midway leaves a
`.tmp-*` folder that `latest_checkpoint` never looks at and the next save deletes; a save that raises
on rank 0 deletes its temporary folder. One job per run directory is assumed.

Loading: non-tensor state goes through `torch.load(weights_only=True)` (a checkpoint from elsewhere must
not run code on load), including the non-tensor entries inside the DCP folder (`_WeightsOnlyLoadPlanner`), and the DCP folder's
`.metadata` pickle is read once per load by `mapo.dcp_reader.SafeFileSystemReader`, which resolves only an exact
allow-list of the globals DCP metadata holds and refuses dotted names (DCP's plain reader would unpickle
anything; allowing whole `torch.distributed.checkpoint` modules would still reach `os.system`); DCP reads tensors into the live model and optimizer in place. After loading, call
`restore_rng(ckpt.rng)` LAST, after anything else that may draw random numbers.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from mapo.dcp_reader import SafeFileSystemReader

CHECKPOINTS_DIR = "checkpoints"
STATE_DIR = "state"
SCHEDULER_FILE = "scheduler.pt"
TRAINER_STATE_FILE = "trainer_state.json"
COMPLETE_MARKER = "COMPLETE"
DCP_METADATA = f"{STATE_DIR}/.metadata"

_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"  # a checkpoint of the same step being replaced


def rng_file(rank: int) -> str:
    return f"rng_{rank}.pt"


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def _single_process_quietly():
    """DCP warns on every single-process save/load that it assumes one process; here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def _all_ok(ok: bool, world_size: int) -> bool:
    """True when `ok` on every rank: an all-reduce used where a barrier would leave the other ranks
    waiting forever for a rank whose write failed (every rank then raises together)."""
    if world_size == 1:
        return ok
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    failed = torch.tensor([0.0 if ok else 1.0], device=device)
    dist.all_reduce(failed)
    return float(failed.item()) == 0.0


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, file too large, …); the previous one is untouched.
    errno is the underlying OSError's when one is found (e.g. ENOSPC, EFBIG), else None."""


def _os_error_in(err: BaseException | None, seen: set[int] | None = None) -> OSError | None:
    """The first OSError in `err`, its causes, or (DCP's CheckpointException) the ranks' failures."""
    seen = set() if seen is None else seen
    if err is None or id(err) in seen:
        return None
    seen.add(id(err))
    if isinstance(err, OSError) and err.errno is not None:
        return err
    nested = []
    if isinstance(getattr(err, "failures", None), dict):  # rank -> exception, or (exception, traceback)
        for value in err.failures.values():
            nested += [v for v in (value if isinstance(value, (tuple, list)) else [value]) if isinstance(v, BaseException)]
    for inner in [err.__cause__, err.__context__, *nested]:
        found = _os_error_in(inner, seen)
        if found is not None:
            return found
    return None


def _write_error(err: BaseException, step: int, root: Path) -> CheckpointWriteError:
    """A clear error for a save that failed: what, why, what is still there, what to do."""
    cause = _os_error_in(err)
    previous = latest_checkpoint(root.parent)
    try:
        free = f"{shutil.disk_usage(root).free / 2**20:.0f} MB free there now"
    except OSError:
        free = "free space unknown"
    if cause is not None:
        why = f"{os.strerror(cause.errno)}: {cause}"
    else:  # DCP wraps the ranks' errors in a CheckpointException whose text is a traceback: name the first
        inner = [v for value in getattr(err, "failures", {}).values()
                 for v in (value if isinstance(value, (tuple, list)) else [value]) if isinstance(v, BaseException)]
        first = inner[0] if inner else err
        why = f"{type(first).__name__}: {(str(first).strip().splitlines() or [''])[-1][:200]}"
    message = (f"checkpoint of step {step} could not be written in {root} ({why}; {free}). The previous "
               f"checkpoint {previous or '(none)'} is intact: make room and resume with trainer.resume=auto")
    return CheckpointWriteError(cause.errno if cause else None, message)


class _WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, except that the non-tensor entries (e.g. the optimizer's param_groups)
    are unpickled with `weights_only=True`: plain data only, never code (DCP itself uses
    weights_only=False). The checked object is handed on re-serialised, through the public method."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, map_location="cpu", weights_only=True)
        safe = io.BytesIO()
        torch.save(obj, safe)
        safe.seek(0)
        super().load_bytes(read_item, safe)


@dataclass
class Checkpoint:
    """What `load_checkpoint` returns besides the tensors it loaded in place (all on CPU).

    scheduler_state: the scheduler's state dict, or None when none was saved.
    rng:             this rank's RNG states for `restore_rng`.
    trainer_state:   the JSON trainer state, including "step".
    path:            the checkpoint folder.
    """

    scheduler_state: dict[str, Any] | None
    rng: dict[str, Any]
    trainer_state: dict[str, Any]
    path: Path

    @property
    def step(self) -> int:
        return int(self.trainer_state["step"])


class TrainingState(Stateful):
    """The model (and optimizer) state DCP saves and loads, sharded as the module is (FSDP2 DTensors or
    plain tensors); keys are fully qualified parameter names, so a checkpoint written by N ranks loads
    on M ranks or on one process.

    Only the parameters that require grad are kept, with their optimizer state; the weights alone are read
    back for exports by `load_model_weights`.

    module:    the module whose weights are saved (the `ModelRunner` in the loop).
    optimizer: its optimizer.
    """

    #: strict=False only because frozen weights are left out on purpose; DCP itself fails on any key it is
    #: asked to load that the checkpoint does not hold.
    OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer):
        self.module, self.optimizer = module, optimizer

    def state_dict(self) -> dict[str, Any]:
        model_state, optimizer_state = get_state_dict(self.module, self.optimizer, options=self.OPTIONS)
        return {"model": model_state, "optimizer": optimizer_state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_state_dict(
            self.module, self.optimizer, model_state_dict=state_dict["model"],
            optim_state_dict=state_dict["optimizer"], options=self.OPTIONS,
        )


# --------------------------------------------------------------------------------------------------
# RNG
# --------------------------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """This process's RNG states, in a form `torch.load(weights_only=True)` accepts (no numpy arrays)."""
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng(rng: dict[str, Any]) -> None:
    """Set python, numpy, torch CPU and (when saved and present) CUDA RNG states from `capture_rng`'s dict."""
    missing = [k for k in ("python", "numpy", "torch", "cuda") if k not in rng]
    if missing:
        raise ValueError(f"RNG state is missing {missing}; expected the dict written by capture_rng()")
    version, internal, gauss_next = rng["python"]
    random.setstate((version, tuple(internal), gauss_next))  # torch.load may give a list back
    np_state = rng["numpy"]
    np.random.set_state(
        {
            "bit_generator": np_state["bit_generator"],
            "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    torch.set_rng_state(rng["torch"])
    cuda_states = rng["cuda"]
    if cuda_states is None:
        return
    if not torch.cuda.is_available():
        warnings.warn("checkpoint holds CUDA RNG states but CUDA is not available; they are not restored", stacklevel=2)
    elif len(cuda_states) != torch.cuda.device_count():
        warnings.warn(
            f"checkpoint holds CUDA RNG states for {len(cuda_states)} devices, this process sees "
            f"{torch.cuda.device_count()}; the CUDA RNG is not restored",
            stacklevel=2,
        )
    else:
        torch.cuda.set_rng_state_all(cuda_states)


# --------------------------------------------------------------------------------------------------
# Finding checkpoints
# --------------------------------------------------------------------------------------------------


def checkpoint_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under `run_dir/checkpoints`, oldest step first (temporary folders excluded)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir() and (entry / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), entry))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step, or None when there is none."""
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def resolve_resume(run_dir: str | os.PathLike, resume: str | None) -> Path | None:
    """What `trainer.resume` names: "auto" -> latest complete checkpoint or None (fresh start);
    None / "" / "none" / "never" -> None; anything else is a checkpoint folder that must be complete."""
    if resume is None or resume.strip().lower() in ("", "none", "never"):
        return None
    if resume.strip().lower() == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if not (path / COMPLETE_MARKER).is_file():
        raise FileNotFoundError(f"trainer.resume={resume!r}: not a complete checkpoint (no {COMPLETE_MARKER} file in {path})")
    return path


# --------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    state: TrainingState,
    scheduler_state: dict[str, Any] | None,
    trainer_state: dict[str, Any],
    keep_last: int | None = 3,
    rng: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint `step` atomically under `run_dir/checkpoints/` and prune to the last `keep_last`.

    Every rank of the job calls it (DCP's save is a collective); with no process group it is one process.
    state:           the model / optimizer to save (each rank writes its own shards).
    scheduler_state: `scheduler.state_dict()`, or None (written by rank 0).
    trainer_state:   JSON-serialisable dict (data position, sampler, …); "step" is added, and if present
                     must equal `step` (written by rank 0).
    keep_last:       complete checkpoints kept after this save (>= 1), None keeps all.
    rng:             this rank's RNG states; None captures them now.
    Returns the final checkpoint folder. An existing checkpoint of the same step is replaced.
    """
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None (keep all), got {keep_last}")
    if "step" in trainer_state and trainer_state["step"] != step:
        raise ValueError(f"trainer_state['step'] = {trainer_state['step']!r} disagrees with step = {step}")
    # Check everything that can be checked before touching the disk, so a bad argument writes nothing.
    try:
        trainer_json = json.dumps({**trainer_state, "step": step}, indent=2, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"trainer_state must be JSON-serialisable: {err}") from err
    rng = capture_rng() if rng is None else rng
    rank, world = _rank_world()

    root = Path(run_dir) / CHECKPOINTS_DIR
    name = checkpoint_dir_name(step)
    tmp = root / f"{_TMP_PREFIX}{name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(root)
        tmp.mkdir()
    _barrier(world)
    try:
        with _single_process_quietly():  # a collective: a write failing on any rank raises on every rank
            dcp.save({"training": state}, storage_writer=dcp.FileSystemWriter(str(tmp / STATE_DIR), sync_files=True), no_dist=world == 1)
        failure = None
        try:
            _save_synced(rng, tmp / rng_file(rank))
            if rank == 0:
                _save_synced(scheduler_state, tmp / SCHEDULER_FILE)
                _write_synced(tmp / TRAINER_STATE_FILE, trainer_json)
        except Exception as err:  # noqa: BLE001 — re-raised below, on every rank
            failure = err
        if not _all_ok(failure is None, world):  # every rank's files are on disk, or all raise
            raise failure or RuntimeError("another rank could not write its checkpoint files")
        if rank == 0:
            try:
                files = [DCP_METADATA, SCHEDULER_FILE, TRAINER_STATE_FILE, *(rng_file(r) for r in range(world))]
                missing = [f for f in files if not (tmp / f).is_file()]
                if missing:
                    raise RuntimeError(f"checkpoint {tmp}: {missing} missing after every rank saved")
                _fsync_dir(tmp / STATE_DIR)
                # The marker goes last: a folder without it was never finished.
                _write_synced(tmp / COMPLETE_MARKER, json.dumps({"step": step, "world_size": world, "files": files}))
                _fsync_dir(tmp)
                _move_into_place(tmp, root / name)
                _fsync_dir(root)
            except Exception as err:  # noqa: BLE001 — re-raised below, on every rank
                failure = err
        if not _all_ok(failure is None, world):  # nobody reads or saves again before the folder is in place
            raise failure or RuntimeError("rank 0 could not finish the checkpoint")
    except BaseException as err:
        # Also on KeyboardInterrupt: the half-written folder is useless; the previous checkpoint stays.
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        raise _write_error(err, step, root) from err  # DCP's CheckpointException is a BaseException
    if rank == 0 and keep_last is not None:
        prune_checkpoints(run_dir, keep_last)
    _barrier(world)
    return root / name


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the `keep_last` newest complete checkpoints; returns the deleted folders."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    doomed = list_checkpoints(run_dir)[:-keep_last]
    for path in doomed:
        # Marker first: if deletion stops halfway the folder no longer counts as a checkpoint.
        (path / COMPLETE_MARKER).unlink()
        shutil.rmtree(path)
    return doomed


def _move_into_place(tmp: Path, final: Path) -> Path:
    """Rename `tmp` to `final`; an existing `final` (same step saved again) is set aside, then deleted."""
    if not final.exists():
        os.replace(tmp, final)
        return final
    aside = final.with_name(f"{_OLD_PREFIX}{final.name}")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(final, aside)
    os.replace(tmp, final)
    shutil.rmtree(aside)
    return final


def _remove_stale_temporaries(root: Path) -> None:
    """Delete temporary and set-aside folders left by saves that died."""
    for entry in root.iterdir():
        if entry.name.startswith((_TMP_PREFIX, _OLD_PREFIX)):
            shutil.rmtree(entry)


def _save_synced(obj: Any, path: Path) -> None:
    with open(path, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    # A directory fsync makes the new entries (and a rename) durable; not every OS supports it.
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def read_marker(path: str | os.PathLike) -> dict[str, Any]:
    """The COMPLETE marker of a checkpoint folder; a clear error when the folder is not a finished one."""
    path = Path(path)
    marker = path / COMPLETE_MARKER
    if not marker.is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE_MARKER} file)")
    info = json.loads(marker.read_text())
    if "world_size" not in info:
        raise ValueError(f"{path} is a checkpoint of an older mapo (a single model.safetensors, no sharded state/); it cannot be resumed")
    missing = [f for f in info["files"] if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint {path} is missing {missing}")
    return info


def load_checkpoint(path: str | os.PathLike, state: TrainingState | None) -> Checkpoint:
    """Read a complete checkpoint folder: tensors into `state` in place (each rank its own shards; a
    checkpoint of another world size is resharded), the rest returned. Every rank calls it."""
    path = Path(path)
    trainer_state = read_trainer_state(path)
    if state is not None:
        with _single_process_quietly():
            reader, _ = _state_reader(path)
            dcp.load({"training": state}, storage_reader=reader,
                     planner=_WeightsOnlyLoadPlanner(), no_dist=_rank_world()[1] == 1)
    rank, _ = _rank_world()
    own = path / rng_file(rank)
    if not own.is_file():  # resumed on more ranks than saved: this rank's draws will differ
        warnings.warn(f"{path} has no RNG state for rank {rank}; using rank 0's", stacklevel=2)
        own = path / rng_file(0)
    return Checkpoint(
        scheduler_state=torch.load(path / SCHEDULER_FILE, map_location="cpu", weights_only=True),
        rng=torch.load(own, map_location="cpu", weights_only=True),
        trainer_state=trainer_state,
        path=path,
    )


def _state_reader(path: str | os.PathLike) -> tuple[SafeFileSystemReader, Metadata]:
    """The reader of a checkpoint's DCP folder and its metadata, read and checked now: `dcp.load` catches a
    failed metadata read and retries a per-rank file, which would bury the reason under a missing-file
    error. The reader keeps the metadata, so `dcp.load` with it does not read the file again."""
    reader = SafeFileSystemReader(str(Path(path) / STATE_DIR))
    return reader, reader.read_metadata()


def read_tensors(path: str | os.PathLike, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's sharded state whose key starts with `prefix`, whole, on CPU
    (one process, no model needed: for tests and inspection). Keys as stored, e.g.
    `training.model.model.lm_head.weight` (the `ModelRunner`'s `model.` included)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    read_marker(path)
    reader, metadata = _state_reader(path)
    out = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }
    with _single_process_quietly():
        dcp.load(out, storage_reader=reader, planner=_WeightsOnlyLoadPlanner(), no_dist=True)
    return out


def read_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON trainer state of a complete checkpoint (no tensors read)."""
    read_marker(path)
    return json.loads((Path(path) / TRAINER_STATE_FILE).read_text())


def load_model_weights(path: str | os.PathLike, module: nn.Module) -> list[str]:
    """Load the model weights a checkpoint holds into `module` (one process, in place), whichever of its
    parameters trained when it was saved; returns their names. For exports: no optimizer needed."""
    prefix = "training.model."
    read_marker(path)
    reader, metadata = _state_reader(path)
    stored = [key.removeprefix(prefix) for key in _tensor_keys(metadata) if key.startswith(prefix)]
    live = module.state_dict()
    unknown = [name for name in stored if name not in live]
    if unknown:
        raise ValueError(f"{path} holds weights this model does not have (another model or LoRA setting?): {unknown[:5]}")
    with _single_process_quietly():
        dcp.load({"training": {"model": {name: live[name] for name in stored}}},
                 storage_reader=reader, planner=_WeightsOnlyLoadPlanner(), no_dist=True)
    return stored


def _tensor_keys(metadata: Metadata) -> list[str]:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    return [key for key, meta in metadata.state_dict_metadata.items() if isinstance(meta, TensorStorageMetadata)]
