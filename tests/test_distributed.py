"""Two CPU processes (gloo, FSDP2), launched once for every check because starting them is slow:

- gather once: a rollout's all-gathers do not grow with max_new_tokens, and greedy outputs equal one process;
- sharded checkpoints: each rank writes and reads only its shards, and `trainer.resume=auto` continues a
  run step for step as if it had never stopped, with full fine-tuning and with LoRA;
- LoRA under FSDP2: the adapter-off reference equals a frozen copy of the base model;
- the 2-rank checkpoints export (one process, resharded) to folders both loaders read (LoRA merged).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_group(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)


class CollectiveCounter:
    """Counts the all-gathers FSDP2 issues (it calls `torch.distributed.all_gather_single` or, in older
    torch, `all_gather_into_tensor`, looked up on the module at call time)."""

    NAMES = ("all_gather_single", "all_gather_into_tensor")

    def __init__(self):
        self.count = 0
        self.real = {name: getattr(dist, name) for name in self.NAMES if hasattr(dist, name)}

    def __enter__(self):
        def counting(real):
            def wrapper(*args, **kwargs):
                self.count += 1
                return real(*args, **kwargs)
            return wrapper

        for name, real in self.real.items():
            setattr(dist, name, counting(real))
        return self

    def __exit__(self, *exc):
        for name, real in self.real.items():
            setattr(dist, name, real)


def check_gather_once(rank: int) -> dict:
    """All-gathers of an FSDP2 rollout with and without `decode` (gather once), for 2 and 8 new tokens,
    and whether greedy tokens equal the unsharded model's."""
    from toy_model import make_batch, tiny_model

    from mapo.distributed import DistContext, ModelRunner, all_done, apply_fsdp
    from mapo.rollout import generate_rollout

    ctx = DistContext(rank=rank, world_size=WORLD, fsdp=True)
    plain = tiny_model(seed=0)
    runner = apply_fsdp(ModelRunner(tiny_model(seed=0)), ctx)
    kwargs = dict(group_size=2, eos_token_id=99, pad_token_id=0, do_sample=False,
                  sync_finished=lambda done: all_done(done, ctx, torch.device("cpu")))
    batch = make_batch()
    runner(generate_rollout, batch, max_new_tokens=2, **kwargs)  # FSDP's lazy init, not counted
    out = {"counts": {}, "greedy_equal": {}}
    for gathered in (True, False):
        for tokens in (2, 8):
            call = runner.decode if gathered else runner
            with CollectiveCounter() as counter:
                rollout = call(generate_rollout, batch, max_new_tokens=tokens, **kwargs)
            assert rollout.completion_ids.shape[1] == tokens  # every step decoded (no early EOS)
            expected = generate_rollout(plain, batch, max_new_tokens=tokens, **kwargs).completion_ids
            out["counts"][f"{'once' if gathered else 'per_forward'}/{tokens}"] = counter.count
            out["greedy_equal"][f"{gathered}/{tokens}"] = torch.equal(rollout.completion_ids, expected)
    # the shared-prompt cache under FSDP2 (its attention override on sharded layers): the same greedy tokens
    shared = runner.decode(generate_rollout, batch, max_new_tokens=8, shared_prompt_cache=True, **kwargs)
    out["shared_prompt_equal"] = torch.equal(shared.completion_ids, expected)
    return out


def check_mixed_precision(rank: int) -> dict:
    """FSDP2 with fp32 masters and bf16 compute (`MixedPrecisionPolicy`, what several GPUs run): the shards
    and their gradients stay fp32, the layers compute in bf16, the runner's own autocast (on before sharding)
    is off, and the log-probs stay close to the fp32 model's."""
    from toy_model import make_batch, tiny_model

    from mapo.distributed import DistContext, ModelRunner, all_done, apply_fsdp
    from mapo.models.adapter import get_adapter
    from mapo.precision import Precision
    from mapo.rollout import generate_rollout
    from mapo.scoring import score_tokens

    ctx = DistContext(rank=rank, world_size=WORLD, fsdp=True)
    model = tiny_model(seed=0).requires_grad_(True)
    plain = copy.deepcopy(model)
    runner = ModelRunner(model, Precision(master=torch.float32, compute=torch.bfloat16, frozen=torch.bfloat16))
    autocast_unsharded = runner.autocast
    runner = apply_fsdp(runner, ctx)
    rollout = runner.decode(generate_rollout, make_batch(), group_size=2, max_new_tokens=6, eos_token_id=99, pad_token_id=0,
                            do_sample=False, sync_finished=lambda done: all_done(done, ctx, torch.device("cpu")))
    layer = get_adapter(model).decoder_layers(model)[0]
    outputs: list[torch.dtype] = []
    hook = layer.register_forward_hook(lambda m, a, o: outputs.append((o[0] if isinstance(o, tuple) else o).dtype))
    logprobs = runner(score_tokens, rollout, temperature=1.0, with_grad=True).logprobs
    hook.remove()
    logprobs.sum().backward()
    weight = layer.self_attn.q_proj.weight
    fp32 = score_tokens(plain, rollout, temperature=1.0).logprobs
    return {"autocast_unsharded": autocast_unsharded, "autocast": runner.autocast, "layer_output": str(outputs[0]),
            "shard": str(weight.to_local().dtype),
            "grad": str(weight.grad.to_local().dtype), "vs_fp32": float((logprobs.detach() - fp32).abs().max())}


def check_lora_reference(rank: int) -> dict:
    """Under FSDP2 the reference (adapters off) scores like a frozen copy of the base model and the
    policy like the same LoRA model without FSDP."""
    from toy_model import make_batch, tiny_model

    from mapo.distributed import DistContext, ModelRunner, all_done, apply_fsdp
    from mapo.models.lora import adapters_off, add_lora, lora_layers
    from mapo.phase import set_trainable
    from mapo.rollout import generate_rollout
    from mapo.scoring import score_tokens

    ctx = DistContext(rank=rank, world_size=WORLD, fsdp=True)
    model = tiny_model(seed=4, projector_gain=50.0)
    frozen = copy.deepcopy(model)
    add_lora(model, SimpleNamespace(rank=4, alpha=8.0, dropout=0.0, targets="all-linear"))
    generator = torch.Generator().manual_seed(0)  # trained-looking adapters, the same on both ranks
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B["default"].weight.copy_(0.05 * torch.randn(layer.lora_B["default"].weight.shape, generator=generator))
    set_trainable(model, SimpleNamespace(), everything=False)
    unsharded = copy.deepcopy(model)
    runner = apply_fsdp(ModelRunner(model), ctx)
    rollout = runner.decode(generate_rollout, make_batch(), group_size=2, max_new_tokens=6, eos_token_id=1, pad_token_id=0,
                            seeds=[1, 2, 3], sync_finished=lambda done: all_done(done, ctx, torch.device("cpu")))
    reference = adapters_off(runner)(score_tokens, rollout, temperature=1.0).logprobs
    policy = runner(score_tokens, rollout, temperature=1.0).logprobs
    return {
        "reference_vs_frozen": float((reference - score_tokens(frozen, rollout, temperature=1.0).logprobs).abs().max()),
        "policy_vs_unsharded": float((policy - score_tokens(unsharded, rollout, temperature=1.0).logprobs).abs().max()),
        "policy_vs_reference": float((policy - reference).abs().max()),
    }


def train(rank: int, port: int, env: dict, run_dir: Path, *overrides: str) -> None:
    from run_configs import compose_run_config

    from mapo.train import run

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    run(compose_run_config(env, run_dir, "tiny_sft", "trainer.micro_batch_size=4", "trainer.steps=5", "trainer.stop_after=4",
                           "trainer.checkpoint_every=2", "trainer.warmup_steps=1", *overrides))  # starts and ends its own process group


def check_resume(rank: int, ports: list[int], env: dict, root: Path, *overrides: str) -> dict:
    """Uninterrupted run to step 4 (checkpoints at 2 and 4), then a second run folder holding only the
    step-2 checkpoint resumed with trainer.resume=auto: steps 3-4 must match. Records which checkpoint
    files each rank read from."""
    from torch.distributed.checkpoint import FileSystemReader

    full, resumed = root / "full", root / "resumed"
    train(rank, ports[0], env, full, *overrides)
    if rank == 0:  # the other rank waits in the next run's rendezvous
        (resumed / "checkpoints").mkdir(parents=True)
        shutil.copytree(full / "checkpoints" / "step_000002", resumed / "checkpoints" / "step_000002")
    reads: list[tuple[str, str, int]] = []
    real_read = FileSystemReader.read_data

    def spy(self, plan, planner):
        for item in plan.items:
            info = self.storage_data[item.storage_index]
            reads.append((item.storage_index.fqn, info.relative_path, info.length))
        return real_read(self, plan, planner)

    FileSystemReader.read_data = spy
    try:
        train(rank, ports[1], env, resumed, "trainer.resume=auto", *overrides)
    finally:
        FileSystemReader.read_data = real_read
    return {"reads": reads}


def worker(rank: int, env: dict, root: str, ports: list[int]) -> None:
    torch.set_num_threads(1)
    root = Path(root)
    init_group(rank, ports[0])
    out = {"gather": check_gather_once(rank), "lora_reference": check_lora_reference(rank),
           "mixed_precision": check_mixed_precision(rank)}
    dist.destroy_process_group()
    out["full"] = check_resume(rank, ports[1:3], env, root / "full_ft")
    out["lora"] = check_resume(rank, ports[3:5], env, root / "lora", "model.lora.rank=4", "model.lora.alpha=8")
    (root / f"rank{rank}.json").write_text(json.dumps(out))


@pytest.fixture(scope="module")
def two_ranks(tiny_env, tmp_path_factory):
    root = tmp_path_factory.mktemp("two_ranks")
    env = {k: str(v) for k, v in tiny_env.items()}
    mp.spawn(worker, args=(env, str(root), [free_port() for _ in range(5)]), nprocs=WORLD, join=True)
    return root, [json.loads((root / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_rollout_gathers_once_and_decodes_like_one_process(two_ranks):
    _, results = two_ranks
    for out in results:
        counts = out["gather"]["counts"]
        assert counts["once/2"] == counts["once/8"] > 0  # does not grow with the number of tokens
        assert counts["per_forward/8"] > counts["per_forward/2"]  # the counter sees per-token gathers
        assert all(out["gather"]["greedy_equal"].values()), out["gather"]["greedy_equal"]
        assert out["gather"]["shared_prompt_equal"]


def test_mixed_precision_policy_keeps_fp32_masters_and_computes_in_bf16(two_ranks):
    _, results = two_ranks
    for out in results:
        mixed = out["mixed_precision"]
        assert (mixed["autocast_unsharded"], mixed["autocast"], mixed["layer_output"], mixed["shard"], mixed["grad"]) == (
            True, False, "torch.bfloat16", "torch.float32", "torch.float32")
        assert 0 < mixed["vs_fp32"] < 0.05  # bf16 compute: close to fp32, not equal


def metrics(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss/nll" in r}


@pytest.mark.parametrize("kind", ["full_ft", "lora"])
def test_sharded_checkpoint_resumes_step_for_step(two_ranks, kind):
    root, _ = two_ranks
    full, resumed = metrics(root / kind / "full"), metrics(root / kind / "resumed")
    assert sorted(full) == [1, 2, 3, 4] and sorted(resumed) == [3, 4]
    for step in (3, 4):
        for key in ("loss/nll", "grad_norm", "lr", "sft/token_accuracy"):
            assert resumed[step][key] == full[step][key], (step, key)
    assert full[1]["loss/nll"] - full[4]["loss/nll"] > 0.01  # training moved


def test_lora_reference_under_fsdp_is_the_base_model(two_ranks):
    _, results = two_ranks
    for out in results:
        check = out["lora_reference"]
        assert check["reference_vs_frozen"] < 1e-6 and check["policy_vs_unsharded"] < 1e-5
        assert check["policy_vs_reference"] > 1e-3  # the adapters matter, so the first check could fail


def test_each_rank_writes_and_reads_only_its_shards(two_ranks):
    from torch.distributed.checkpoint import FileSystemReader

    root, results = two_ranks
    ckpt = root / "full_ft" / "full" / "checkpoints" / "step_000002"
    assert sorted(p.name for p in ckpt.iterdir()) == ["COMPLETE", "rng_0.pt", "rng_1.pt", "scheduler.pt", "state", "trainer_state.json"]
    metadata = FileSystemReader(str(ckpt / "state")).read_metadata()
    files: dict[str, set] = {}
    for index, info in metadata.storage_data.items():
        files.setdefault(index.fqn, set()).add((tuple(index.offset or ()), info.relative_path))
    sharded = {fqn: chunks for fqn, chunks in files.items() if len(chunks) == WORLD}
    name = "training.model.model.model.language_model.layers.0.self_attn.q_proj.weight"
    assert name in sharded and f"training.optimizer.state.{name.removeprefix('training.model.')}.exp_avg" in sharded
    for fqn, chunks in sharded.items():  # FSDP2 shards dim 0: the first rows on rank 0, the rest on rank 1
        by_offset = sorted(chunks)
        assert by_offset[0][1].startswith("__0_") and by_offset[1][1].startswith("__1_"), fqn
    for rank, out in enumerate(results):
        reads = out["full"]["reads"]
        own = [(fqn, path) for fqn, path, _ in reads if fqn in sharded]
        assert own and all(path.startswith(f"__{rank}_") for _, path in own)
        assert sum(n for fqn, _, n in reads if fqn in sharded) < 0.6 * sum(
            metadata.storage_data[i].length for i in metadata.storage_data if i.fqn in sharded)


def exported_and_stored(ckpt: Path, out: Path):
    from transformers import Qwen2AudioForConditionalGeneration

    from mapo.checkpoint import read_tensors
    from mapo.export import export_checkpoint
    from mapo.models.loader import load_model_and_processor

    export_checkpoint(ckpt, out)
    stored = {k.removeprefix("training.model.model."): v for k, v in read_tensors(ckpt, "training.model.").items()}
    ours, _ = load_model_and_processor(out)
    plain = Qwen2AudioForConditionalGeneration.from_pretrained(out)
    assert ours.state_dict().keys() == plain.state_dict().keys()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(plain.state_dict()[name], tensor), name
    return ours.state_dict(), stored


def test_two_rank_checkpoint_exports_to_a_folder_both_loaders_read(two_ranks, tmp_path):
    root, _ = two_ranks
    exported, stored = exported_and_stored(root / "full_ft" / "full" / "checkpoints" / "step_000004", tmp_path / "hf")
    assert len(stored) > 10
    for name, tensor in stored.items():
        assert torch.equal(exported[name], tensor), name


def test_lora_checkpoint_holds_only_adapters_and_exports_merged(two_ranks, tiny_env, tmp_path):
    from mapo.models.loader import load_model_and_processor

    root, _ = two_ranks
    exported, stored = exported_and_stored(root / "lora" / "full" / "checkpoints" / "step_000004", tmp_path / "hf")
    assert stored and all(".lora_A.default." in k or ".lora_B.default." in k for k in stored)
    base = load_model_and_processor(tiny_env["model"])[0].state_dict()
    merged = 0
    for name, tensor in exported.items():
        prefix = name.removesuffix(".weight")
        if f"{prefix}.lora_A.default.weight" in stored:  # W + (alpha / rank)·B@A, alpha 8, rank 4
            delta = stored[f"{prefix}.lora_B.default.weight"] @ stored[f"{prefix}.lora_A.default.weight"]
            assert torch.allclose(tensor, base[name] + 2.0 * delta, atol=1e-6), name
            merged += bool(delta.abs().max() > 0)
        else:
            assert torch.equal(tensor, base[name]), name
    assert merged == len(stored) // 2 == 14  # 7 linear layers × 2 text layers, all trained


def test_rank0_share_gives_rank_zeros_list_and_none_in_one_process(monkeypatch):
    """The manifest readers' `share` (mapo.train, mapo.eval.cli): None alone; with several ranks, the
    first of the all-gathered lists."""
    import mapo.distributed as dist_utils

    assert dist_utils.rank0_share(dist_utils.DistContext()) is None
    ctx = dist_utils.DistContext(rank=1, world_size=2)
    monkeypatch.setattr(dist_utils, "gather_objects", lambda items, c: [[3, 7], items] if c is ctx else None)
    share = dist_utils.rank0_share(ctx)
    assert share([5]) == [3, 7]
