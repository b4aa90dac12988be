"""Training checkpoints: written atomically, pruned to the last K, resumed bit-for-bit on CPU.

Layout of one checkpoint, `<run_dir>/checkpoints/step_000123/`:

    model.safetensors    model weights (the full state dict the caller passes; tensors copied to CPU)
    optimizer.pt         optimizer state dict (torch.save)
    scheduler.pt         LR scheduler state dict, or None (torch.save)
    rng.pt               RNG states: python `random`, numpy's global generator, torch CPU, torch CUDA
    trainer_state.json   {"step": 123, ...}: data position, epoch, sampler state, anything JSON
    COMPLETE             written LAST: {"step": 123, "files": [...]}; only folders holding it count

Atomicity: everything is written into `checkpoints/.tmp-step_000123-<pid>/`, each file fsynced, the
marker last, then the folder is renamed into place with `os.replace` (one atomic rename on POSIX). A
save that dies midway leaves a `.tmp-*` folder that `latest_checkpoint` never looks at and the next
save deletes; a save that raises deletes its own temporary folder. One writer per run directory is
assumed (rank 0 in a distributed run): a save removes every `.tmp-*` folder it finds but its own.

State, not objects: the caller passes state dicts and loads the returned ones, so distributed code can
gather full state dicts first (FSDP2: `torch.distributed.checkpoint.state_dict.get_model_state_dict`
/ `get_optimizer_state_dict` with full_state_dict=True) and scatter them back after loading.

RNG: `rng.pt` holds the saving process's states. A run on several ranks that draws random numbers on
each rank must either save per-rank states itself or seed every rank from (seed, step, rank).

Resume: `resolve_resume(run_dir, "auto")` is the latest complete checkpoint or None; after loading,
call `restore_rng(ckpt.rng)` LAST, after anything else that may draw random numbers (model building).
"""

from __future__ import annotations

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
from safetensors.torch import load_file, save_file

CHECKPOINTS_DIR = "checkpoints"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng.pt"
TRAINER_STATE_FILE = "trainer_state.json"
COMPLETE_MARKER = "COMPLETE"
FILES = (MODEL_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, RNG_FILE, TRAINER_STATE_FILE)

_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"  # a checkpoint of the same step being replaced


@dataclass
class Checkpoint:
    """A loaded checkpoint; every tensor is on CPU.

    model_state:     name -> tensor, as saved.
    optimizer_state: the optimizer's state dict (pass to `optimizer.load_state_dict`, which moves
                     the state to the parameters' device).
    scheduler_state: the scheduler's state dict, or None when none was saved.
    rng:             RNG states for `restore_rng`.
    trainer_state:   the JSON trainer state, including "step".
    path:            the checkpoint folder.
    """

    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    scheduler_state: dict[str, Any] | None
    rng: dict[str, Any]
    trainer_state: dict[str, Any]
    path: Path

    @property
    def step(self) -> int:
        return int(self.trainer_state["step"])


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
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scheduler_state: dict[str, Any] | None,
    trainer_state: dict[str, Any],
    keep_last: int | None = 3,
    rng: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint `step` atomically under `run_dir/checkpoints/` and prune to the last `keep_last`.

    model_state:     name -> tensor (full, unsharded); copied to CPU and saved as safetensors.
    optimizer_state: `optimizer.state_dict()` (or a gathered full one).
    scheduler_state: `scheduler.state_dict()`, or None.
    trainer_state:   JSON-serialisable dict (data position, epoch, …); "step" is added, and if present
                     must equal `step`.
    keep_last:       complete checkpoints kept after this save (>= 1), None keeps all.
    rng:             RNG states to store; None captures this process's now.
    Returns the final checkpoint folder. An existing checkpoint of the same step is replaced.
    """
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None (keep all), got {keep_last}")
    if "step" in trainer_state and trainer_state["step"] != step:
        raise ValueError(f"trainer_state['step'] = {trainer_state['step']!r} disagrees with step = {step}")
    # Check everything that can be checked before touching the disk, so a bad argument writes nothing.
    weights = _cpu_tensors(model_state)
    try:
        trainer_json = json.dumps({**trainer_state, "step": step}, indent=2, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"trainer_state must be JSON-serialisable: {err}") from err
    rng = capture_rng() if rng is None else rng

    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(root)
    name = checkpoint_dir_name(step)
    tmp = root / f"{_TMP_PREFIX}{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_file(weights, str(tmp / MODEL_FILE), metadata={"format": "pt", "step": str(step)})
        torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
        torch.save(scheduler_state, tmp / SCHEDULER_FILE)
        torch.save(rng, tmp / RNG_FILE)
        (tmp / TRAINER_STATE_FILE).write_text(trainer_json)
        for file in FILES:
            _fsync_file(tmp / file)
        # The marker goes last: a folder without it was never finished.
        _write_synced(tmp / COMPLETE_MARKER, json.dumps({"step": step, "files": list(FILES)}))
        _fsync_dir(tmp)
        final = _move_into_place(tmp, root / name)
    except BaseException:
        # Also on KeyboardInterrupt: the half-written folder is useless; the previous checkpoint stays.
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    if keep_last is not None:
        prune_checkpoints(run_dir, keep_last)
    return final


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


def _cpu_tensors(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies safetensors accepts: tensors sharing storage (tied weights) are
    cloned, since safetensors refuses shared storage; both names are kept for a strict load."""
    out: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for name, tensor in model_state.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"model_state[{name!r}] is a {type(tensor).__name__}, expected a tensor")
        cpu = tensor.detach().to("cpu").contiguous()
        storage = cpu.untyped_storage().data_ptr()
        if storage in seen_storage or cpu.untyped_storage().nbytes() != cpu.numel() * cpu.element_size():
            cpu = cpu.clone()  # shared or a view into a larger buffer
        seen_storage.add(cpu.untyped_storage().data_ptr())
        out[name] = cpu
    return out


def _move_into_place(tmp: Path, final: Path) -> Path:
    """Rename `tmp` to `final`; an existing `final` (same step saved again) is set aside, then deleted."""
    if not final.exists():
        os.replace(tmp, final)
        return final
    aside = final.with_name(f"{_OLD_PREFIX}{final.name}-{os.getpid()}")
    os.replace(final, aside)
    os.replace(tmp, final)
    shutil.rmtree(aside)
    return final


def _remove_stale_temporaries(root: Path) -> None:
    """Delete temporary and set-aside folders left by saves that died (any process but this one)."""
    own_suffix = f"-{os.getpid()}"
    for entry in root.iterdir():
        if entry.name.startswith((_TMP_PREFIX, _OLD_PREFIX)) and not entry.name.endswith(own_suffix):
            shutil.rmtree(entry)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
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


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a complete checkpoint folder (see the module docstring); every tensor lands on CPU."""
    path = Path(path)
    marker = path / COMPLETE_MARKER
    if not marker.is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE_MARKER} file)")
    missing = [f for f in json.loads(marker.read_text())["files"] if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint {path} is missing {missing}")
    # weights_only: a checkpoint from elsewhere must not run code on load; our files hold only
    # tensors and plain Python values.
    return Checkpoint(
        model_state=load_file(str(path / MODEL_FILE), device="cpu"),
        optimizer_state=torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True),
        scheduler_state=torch.load(path / SCHEDULER_FILE, map_location="cpu", weights_only=True),
        rng=torch.load(path / RNG_FILE, map_location="cpu", weights_only=True),
        trainer_state=json.loads((path / TRAINER_STATE_FILE).read_text()),
        path=path,
    )
