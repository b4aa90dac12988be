"""Hugging Face folders from a policy: the final model, one every `trainer.export_every` steps, and
`make export CKPT=<checkpoint folder> OUT=<dir>` from a sharded training checkpoint (DESIGN §10).

A folder holds consolidated safetensors weights (written by `save_pretrained`, so the key names are
the family's own), config.json, generation_config.json and the processor files: both
`mapo.models.loader.load_model_and_processor` and plain `transformers` `from_pretrained` read it.

Dtype: weights are exported in the master dtype (float32), not the compute dtype. Training at lr 1e-6
moves weights by far less than bf16's spacing, so a bf16 export would round most of the training
away; float32 keeps it, and whoever loads the folder may still ask for bf16. config.json's `dtype`
says float32 accordingly. LoRA adapters are merged into the weights they adapt (`mapo.models.lora`),
in float32, so the folder is a plain model.

Gathering: in a run, the full state is gathered once per export with
`get_model_state_dict(full_state_dict=True, cpu_offload=True)`, which leaves it on rank 0's CPU only
(the other ranks get nothing), and rank 0 writes. An export is a one-time copy of the weights, so this
is kept instead of a sharded write; a checkpoint, which happens often, is sharded (`mapo.checkpoint`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mapo import distributed as dist_utils
from mapo.atomic import replacing
from mapo.checkpoint import checkpoint_dir_name
from mapo.models import lora as lora_utils

EXPORTS_DIR = "exports"


def export_dir(run_dir: Path, step: int) -> Path:
    """`<run_dir>/exports/step_<6 digits>/`."""
    return Path(run_dir) / EXPORTS_DIR / checkpoint_dir_name(step)


def export_state(model: nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The weights to export: names without the runner's `model.` prefix, LoRA merged, floats in `dtype`.
    On ranks other than 0 under FSDP `state` is empty (see `full_model_state`): call it on rank 0."""
    state = lora_utils.merged_state_dict(model, {k.removeprefix("model."): v for k, v in state.items()})
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def write_hf_folder(model: nn.Module, processor, state: dict[str, torch.Tensor], out: str | os.PathLike, dtype: torch.dtype) -> Path:
    """Write `state` (full, CPU, already in `dtype`) as a Hugging Face folder at `out`, atomically: into
    a temporary sibling first, then renamed (an existing folder of that name is replaced: the run's
    own `final_model` / `exports/step_*`; `make export` refuses a non-empty folder before this)."""
    out = Path(out)
    with replacing(out) as tmp:
        model.save_pretrained(tmp, state_dict=state)
        processor.save_pretrained(tmp)
        # save_pretrained records the dtype of the model's first parameter, which may be a frozen bf16
        # weight; the file holds `dtype`, and from_pretrained's default follows config.json.
        config_file = tmp / "config.json"
        config = json.loads(config_file.read_text())
        config["dtype"] = str(dtype).removeprefix("torch.")
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def export_policy(runner: nn.Module, model: nn.Module, processor, out: str | os.PathLike, ctx, dtype: torch.dtype) -> Path:
    """Export the live policy behind `runner` (every rank calls it; rank 0 gathers on its CPU and writes)."""
    state = dist_utils.full_model_state(runner, ctx)
    if ctx.is_main:
        write_hf_folder(model, processor, export_state(model, state, dtype), out, dtype)
    del state
    if ctx.enabled:
        torch.distributed.barrier()
    return Path(out)


# ----------------------------------------------------------------------------------- make export
@dataclass
class ExportConfig:
    checkpoint: str = ""  # a training checkpoint folder, <run_dir>/checkpoints/step_XXXXXX
    out: str = ""  # the Hugging Face folder to write


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Rebuild the policy a checkpoint was trained on (its run config: model folder, cached warm start,
    LoRA, frozen dtype), load the checkpoint's weights into it and write a Hugging Face folder. One
    process on CPU; a checkpoint written by any number of ranks loads (DCP reshards)."""
    from omegaconf import OmegaConf

    from mapo.checkpoint import load_model_weights, read_trainer_state
    from mapo.config import MapoConfig
    from mapo.models.loader import load_model_and_processor, resolve_dtype
    from mapo.phase import prepare_policy
    from mapo.precision import Precision
    from mapo.warm_start import cached_warm_start

    if Path(out).exists() and any(Path(out).iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; export into a new folder (nothing was written)")
    trainer_state = read_trainer_state(checkpoint)
    if "config" not in trainer_state:
        raise ValueError(f"{checkpoint}: trainer_state.json has no run config; it was not written by mapo.phase")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(MapoConfig), trainer_state["config"]))
    names = trainer_state.get("precision") or {"master": "float32", "compute": "float32", "frozen": "float32"}
    precision = Precision(*(resolve_dtype(names[k]) for k in ("master", "compute", "frozen")))
    model, processor = load_model_and_processor(cfg.model.path, dtype=precision.master, attn_implementation="sdpa", device="cpu")
    phase = trainer_state["phase"]
    if phase != "warm_start" and cfg.trainer.warm_start.enabled and cfg.algo.name != "sft":
        weights = cached_warm_start(cfg)
        if weights is None:
            raise FileNotFoundError(
                f"{checkpoint} continues a warm start whose cached weights are gone "
                f"(trainer.warm_start.cache_dir={cfg.trainer.warm_start.cache_dir}); rerun the training's warm start first"
            )
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(weights)))
    prepare_policy(model, cfg, precision, everything=phase in ("warm_start", "sft"))
    runner = dist_utils.ModelRunner(model, precision)
    load_model_weights(checkpoint, runner)
    state = runner.state_dict()
    return write_hf_folder(model, processor, export_state(model, state, precision.master), out, precision.master)


def main(argv: list[str] | None = None) -> None:
    from mapo.cli_args import parse_overrides

    args = parse_overrides(ExportConfig, argv)
    if not args.checkpoint or not args.out:
        raise SystemExit("usage: python -m mapo.export checkpoint=<run_dir>/checkpoints/step_XXXXXX out=<folder>  (make export CKPT=… OUT=…)")
    path = export_checkpoint(args.checkpoint, args.out)
    print(f"[mapo] exported {args.checkpoint} to {path.resolve()}")


if __name__ == "__main__":
    main()
