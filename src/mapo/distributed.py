"""Everything about running on several processes, in one place (DESIGN §2, torchtitan's rule).

- `init_distributed()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and starts the
  process group (nccl on CUDA, gloo on CPU); without torchrun it returns a single-process context.
- `apply_fsdp(runner, ctx)` shards a *built* model with FSDP2 (`fully_shard`): the units its adapter
  names (each text decoder layer and each audio-encoder layer), the audio tower, then the root, with
  the run's mixed-precision policy (`mapo.precision`). The model code knows nothing of it.
  (Attention modules are not wrapped on their own: FIELD-NOTES.)
- `ModelRunner` is the root every model call goes through (and where autocast is entered on one
  process); `runner.decode(fn, ...)` runs a rollout or an evaluation with the weights gathered once
  (`gather_once`), not once per generated token.
- `reduce_metrics`, `all_done`, `gather_1d`, `global_sum` are the only collectives the loop uses.
- `shard_indices` gives each rank its slice of a global batch.
- `full_model_state` gathers the full weights on rank 0's CPU for an export (checkpoints are sharded:
  `mapo.checkpoint`).

Algorithm code never imports this module.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mapo.models.adapter import get_adapter
from mapo.precision import Precision, compute_context


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    fsdp: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` → the local CUDA device when there is one, else CPU; `cuda` without CUDA is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.device=cuda but CUDA is not available (use trainer.device=auto or cpu)")
        return torch.device("cuda", local_rank)
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"trainer.device must be auto, cpu or cuda, got {name!r}")


def init_distributed(device: str = "auto") -> DistContext:
    """Start the process group when launched by torchrun; a plain single-process context otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, fsdp=world_size > 1)


def say(ctx: DistContext, message: str) -> None:
    """Print once per job (rank 0), not once per process."""
    if ctx.is_main:
        print(message, flush=True)


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class ModelRunner(torch.nn.Module):
    """Runs a function of the model inside this module's forward: `runner(fn, *args) = fn(model, *args)`.

    Rollout and scoring call the model's parts directly (the text model, the LM head, the token
    table, the audio tower) so that audio is encoded once and logits are chunked. FSDP2 gathers the
    parameters that belong to the root unit (embeddings, norms, LM head, audio convolutions, projector)
    in the root's forward hook, so every such function must run inside a forward of the root: this
    wrapper is that root. It is also the one place compute precision is entered (`mapo.precision`):
    autocast to the compute dtype on one process (`autocast`).
    """

    def __init__(self, model: torch.nn.Module, precision: Precision | None = None):
        super().__init__()
        self.model = model
        self.precision = precision

    @property
    def autocast(self) -> bool:
        """Whether calls run under autocast: with a mixed precision, unless the runner is FSDP2-sharded
        (`apply_fsdp`), whose mixed-precision policy then gathers the weights in the compute dtype."""
        return self.precision is not None and self.precision.mixed and not fsdp_units([self])

    def forward(self, fn, *args, **kwargs):
        if not self.autocast:
            return fn(self.model, *args, **kwargs)
        with compute_context(self.precision, _module_device(self.model)):
            return fn(self.model, *args, **kwargs)

    def decode(self, fn, *args, **kwargs):
        """Like calling the runner, for a function that runs the model many times without gradients
        (a rollout, an evaluation): under FSDP2 the weights are gathered once (`gather_once`)."""
        return self(gather_once(fn), *args, **kwargs)


def fsdp_units(modules) -> list[torch.nn.Module]:
    """The FSDP2-wrapped modules among `modules` (none on a torch without FSDP2)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    return [m for m in modules if isinstance(m, FSDPModule)]


def gather_once(fn):
    """`fn(model, ...)` with every FSDP2 unit inside `model` all-gathered once before it runs and
    resharded after, instead of once per forward: token-by-token decoding then costs one all-gather
    per unit per rollout, not per token (DESIGN §10). Without FSDP it is `fn` itself.

    Must run inside the root's forward (`ModelRunner.decode`), where the root's own weights are
    already gathered. The units keep `reshard_after_forward=False` while `fn` runs, so their forward
    hooks find the weights gathered and leave them so; the units are put back (reshard after forward,
    sharded) even when `fn` raises. Memory: the whole model is unsharded for the duration (in the
    compute dtype under a mixed-precision policy), as a decode needs every layer for every token.
    """
    @functools.wraps(fn)
    def gathered(model, *args, **kwargs):
        units = fsdp_units(model.modules())
        if not units:
            return fn(model, *args, **kwargs)
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
        try:
            handles = [unit.unshard(async_op=True) for unit in units]  # issue every all-gather, then wait
            for handle in handles:
                handle.wait()
            return fn(model, *args, **kwargs)
        finally:
            for unit in units:
                unit.set_reshard_after_forward(True, recurse=False)
                unit.reshard()

    return gathered


def _module_device(module: torch.nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def apply_fsdp(runner: ModelRunner, ctx: DistContext) -> ModelRunner:
    """Shard the adapter's units (decoder layers, audio-encoder layers), the audio tower and the root
    (the runner) with FSDP2; no-op on one process.

    Mixed precision: when the runner's compute dtype is lower than its master dtype, FSDP2's policy
    gathers weights in the compute dtype and reduces gradients in float32 (`reduce_dtype`), and the
    runner, once sharded, enters no autocast of its own (`ModelRunner.autocast`). The audio tower is its own unit so that a frozen tower
    stored in the frozen dtype does not share a unit with trainable float32 weights (FSDP2 wants one
    dtype per unit for the weights that train).
    """
    if not ctx.enabled:
        return runner
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {}
    precision = runner.precision
    if precision is not None and precision.mixed:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=precision.compute, reduce_dtype=torch.float32)
    adapter = get_adapter(runner.model)
    for unit in adapter.fsdp_units(runner.model):
        fully_shard(unit, **kwargs)
    tower = adapter.audio_tower(runner.model)
    if any(True for _ in tower.parameters(recurse=True)):
        fully_shard(tower, **kwargs)
    fully_shard(runner, **kwargs)
    return runner


def shard_indices(n: int, ctx: DistContext) -> slice:
    """This rank's contiguous slice of a global batch of `n` items (n must divide evenly)."""
    if n % ctx.world_size:
        raise ValueError(f"global batch of {n} prompts does not divide over {ctx.world_size} ranks")
    per = n // ctx.world_size
    return slice(ctx.rank * per, (ctx.rank + 1) * per)


def global_sum(x: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum of a tensor over ranks (a copy; the input is left as it is)."""
    x = x.detach().clone()
    if ctx.enabled:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def gather_1d(x: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Concatenate equal-length 1-D tensors of all ranks in rank order: [n] → [world·n]."""
    if not ctx.enabled:
        return x
    parts = [torch.empty_like(x) for _ in range(ctx.world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def gather_objects(items: list, ctx: DistContext) -> list[list]:
    """Every rank's Python list, in rank order, on every rank (small payloads: evaluation answers)."""
    if not ctx.enabled:
        return [items]
    out: list = [None] * ctx.world_size
    dist.all_gather_object(out, items)
    return out


def rank0_share(ctx: DistContext) -> Callable[[list], list] | None:
    """The `share` of `mapo.data.validate.read_manifest`: rank 0's list on every rank (an all-gather);
    None in a single process, where there is nothing to share (the read then skips the step)."""
    if not ctx.enabled:
        return None
    return lambda items: gather_objects(items, ctx)[0]


def all_done(local_done: bool, ctx: DistContext, device: torch.device) -> bool:
    """True when every rank is done: lets ranks under FSDP keep decoding together (no deadlock)."""
    if not ctx.enabled:
        return local_done
    flag = torch.tensor([0.0 if local_done else 1.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.SUM)
    return bool(flag.item() == 0)


def reduce_metrics(metrics: dict[str, torch.Tensor | float], ctx: DistContext) -> dict[str, float]:
    """Average scalar metrics over ranks in one collective and move them to the host once.

    Keys ending in `_max` are reduced with max, `_min` with min, `_sum` with sum; the rest are means.
    """
    keys = sorted(metrics)
    if not keys:
        return {}
    vals = torch.stack([torch.as_tensor(metrics[k], dtype=torch.float64).detach().cpu().reshape(()) for k in keys])
    if ctx.enabled:
        kinds = [("max" if k.endswith("_max") else "min" if k.endswith("_min") else "sum" if k.endswith("_sum") else "mean") for k in keys]
        dev = ctx.device
        out = vals.clone()
        for kind, op in (("mean", dist.ReduceOp.SUM), ("sum", dist.ReduceOp.SUM), ("max", dist.ReduceOp.MAX), ("min", dist.ReduceOp.MIN)):
            idx = [i for i, k in enumerate(kinds) if k == kind]
            if not idx:
                continue
            part = vals[idx].to(dev)
            dist.all_reduce(part, op=op)
            part = part.cpu()
            if kind == "mean":
                part = part / ctx.world_size
            out[idx] = part
        vals = out
    return {k: float(v) for k, v in zip(keys, vals.tolist())}


def full_model_state(model: torch.nn.Module, ctx: DistContext) -> dict[str, torch.Tensor]:
    """A full, unsharded state dict on CPU (every rank must call it). Under FSDP the tensors are gathered
    one at a time and only rank 0 keeps them (`cpu_offload`): the other ranks get an empty dict."""
    if not ctx.enabled:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
