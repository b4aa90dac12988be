"""Checkpoints (one process; the sharded 2-process case is in test_distributed.py): exact round trip,
resume == uninterrupted run, atomic saves, pruning, stale temporaries, frozen weights left out."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from mapo.checkpoint import (
    COMPLETE_MARKER,
    TrainingState,
    capture_rng,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    read_tensors,
    restore_rng,
    save_checkpoint,
)

torch.set_num_threads(1)

DATA_SIZE = 40  # rows in the toy data set; the data position wraps around it


def make_run(seed: int = 0):
    """A tiny model, AdamW and a warm-up/decay LambdaLR, all from `seed`."""
    torch.manual_seed(seed)
    model = nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 3) * 0.9**s)
    return model, optimizer, scheduler


def toy_data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(DATA_SIZE, 4, generator=generator)
    return x, x @ torch.tensor([[1.0, -2.0], [0.5, 0.0], [0.0, 1.0], [-1.0, 0.3]])


def train_step(model, optimizer, scheduler, state: dict, data) -> float:
    """One step whose result depends on every RNG a real run uses: python picks the batch size,
    numpy the noise scale, torch the noise and the dropout mask; the data position comes from state."""
    x_all, y_all = data
    batch = random.randint(3, 6)
    rows = [(state["data_position"] + i) % DATA_SIZE for i in range(batch)]
    state["data_position"] = (state["data_position"] + batch) % DATA_SIZE
    x = x_all[rows] + float(np.random.uniform(0.0, 0.1)) * torch.randn(batch, 4)
    x = nn.functional.dropout(x, p=0.25, training=True)
    loss = ((model(x) - y_all[rows]) ** 2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.item()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def save(run_dir, step, model, optimizer, scheduler, state, keep_last=3):
    return save_checkpoint(
        run_dir, step, TrainingState(model, optimizer), scheduler.state_dict(), {**state, "step": step}, keep_last=keep_last
    )


FILES = sorted([COMPLETE_MARKER, "state", "scheduler.pt", "rng_0.pt", "trainer_state.json"])


def test_round_trip_restores_model_optimizer_scheduler_exactly(tmp_path):
    data = toy_data()
    model, optimizer, scheduler = make_run()
    seed_everything(7)
    state = {"data_position": 0, "epoch": 2, "sampler": {"order": [3, 1, 2]}}
    for _ in range(3):
        train_step(model, optimizer, scheduler, state, data)
    path = save(tmp_path, 3, model, optimizer, scheduler, state)
    assert path == tmp_path / "checkpoints" / "step_000003"
    assert sorted(p.name for p in path.iterdir()) == FILES

    fresh_model, fresh_optimizer, fresh_scheduler = make_run(seed=99)
    assert not torch.equal(fresh_model.weight, model.weight)  # the load below must do the work
    ckpt = load_checkpoint(path, TrainingState(fresh_model, fresh_optimizer))
    assert ckpt.step == 3
    assert ckpt.trainer_state == {**state, "step": 3}
    fresh_scheduler.load_state_dict(ckpt.scheduler_state)
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh_model.state_dict()[name], tensor), name
    for param, fresh_param in zip(model.parameters(), fresh_model.parameters()):
        saved, loaded = optimizer.state[param], fresh_optimizer.state[fresh_param]
        assert torch.equal(saved["exp_avg"], loaded["exp_avg"])
        assert torch.equal(saved["exp_avg_sq"], loaded["exp_avg_sq"])
        assert torch.equal(saved["step"], loaded["step"])
    assert fresh_scheduler.last_epoch == scheduler.last_epoch == 3
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()
    assert fresh_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


def test_rng_round_trip_through_disk(tmp_path):
    seed_everything(3)
    _ = random.random(), np.random.normal(), torch.randn(3)  # np.random.normal leaves a cached gaussian
    model, optimizer, scheduler = make_run()
    rng_before = capture_rng()
    path = save_checkpoint(tmp_path, 0, TrainingState(model, optimizer), None, {}, rng=rng_before)
    expected = (random.random(), np.random.normal(), np.random.normal(), torch.randn(5))
    seed_everything(12345)
    ckpt = load_checkpoint(path, None)
    assert ckpt.scheduler_state is None
    restore_rng(ckpt.rng)
    got = (random.random(), np.random.normal(), np.random.normal(), torch.randn(5))
    assert got[:3] == expected[:3]
    assert torch.equal(got[3], expected[3])


def test_resumed_run_equals_uninterrupted_run_step_for_step(tmp_path):
    data, total_steps, save_at = toy_data(), 8, 3

    # Uninterrupted reference run.
    model, optimizer, scheduler = make_run()
    seed_everything(11)
    state = {"data_position": 0}
    reference_losses = [train_step(model, optimizer, scheduler, state, data) for _ in range(total_steps)]
    reference_weights = {k: v.clone() for k, v in model.state_dict().items()}

    # Interrupted run: save at step 3, then "a new process": other init, other RNG, load, continue.
    model, optimizer, scheduler = make_run()
    seed_everything(11)
    state = {"data_position": 0}
    first_losses = [train_step(model, optimizer, scheduler, state, data) for _ in range(save_at)]
    save(tmp_path, save_at, model, optimizer, scheduler, state)
    train_step(model, optimizer, scheduler, state, data)  # work after the save is lost with the process

    resumed_losses = resume_and_train(tmp_path, data, total_steps - save_at, restore_rng_state=True)
    assert first_losses + resumed_losses[0] == reference_losses  # exact, step for step
    for name, tensor in resumed_losses[1].items():
        assert torch.equal(tensor, reference_weights[name]), name

    # Control: the same resume without restoring the RNG diverges, so the test above can fail.
    no_rng_losses, _ = resume_and_train(tmp_path, data, total_steps - save_at, restore_rng_state=False)
    assert no_rng_losses != reference_losses[save_at:]


def resume_and_train(run_dir, data, steps: int, restore_rng_state: bool):
    seed_everything(999)
    model, optimizer, scheduler = make_run(seed=5)
    path = resolve_resume(run_dir, "auto")
    ckpt = load_checkpoint(path, TrainingState(model, optimizer))
    scheduler.load_state_dict(ckpt.scheduler_state)
    state = {"data_position": ckpt.trainer_state["data_position"]}
    if restore_rng_state:
        restore_rng(ckpt.rng)
    losses = [train_step(model, optimizer, scheduler, state, data) for _ in range(steps)]
    return losses, {k: v.clone() for k, v in model.state_dict().items()}


def test_interrupted_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    model, optimizer, scheduler = make_run()
    first = save(tmp_path, 1, model, optimizer, scheduler, {"data_position": 5})
    weight_at_first = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)

    import mapo.checkpoint as checkpoint_module

    real_save = checkpoint_module._save_synced

    def save_that_dies_on_scheduler(obj, path):
        if str(path).endswith("scheduler.pt"):
            raise OSError("disk full (simulated) while writing scheduler.pt")
        return real_save(obj, path)

    monkeypatch.setattr(checkpoint_module, "_save_synced", save_that_dies_on_scheduler)
    with pytest.raises(OSError, match="simulated"):
        save(tmp_path, 2, model, optimizer, scheduler, {"data_position": 9})
    monkeypatch.undo()

    assert latest_checkpoint(tmp_path) == first
    assert list_checkpoints(tmp_path) == [first]
    # Nothing left behind: no step_000002, no temporary folder.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000001"]
    ckpt = load_checkpoint(first, TrainingState(model, optimizer))
    assert ckpt.trainer_state["data_position"] == 5
    assert torch.equal(model.weight, weight_at_first)


def test_crashed_save_leftovers_are_ignored_then_cleaned(tmp_path):
    model, optimizer, scheduler = make_run()
    first = save(tmp_path, 1, model, optimizer, scheduler, {"data_position": 0})
    root = tmp_path / "checkpoints"
    # A process killed mid-save (no cleanup ran): partial temporary folder of a dead pid.
    partial = root / ".tmp-step_000002"
    partial.mkdir()
    (partial / "scheduler.pt").write_bytes(b"half a file")
    # A process killed between the marker and the rename: complete content, still temporary.
    finished_tmp = root / ".tmp-step_000003"
    os.rename(save(tmp_path / "other", 3, model, optimizer, scheduler, {"data_position": 0}), finished_tmp)
    # A step folder without a marker (copied by hand, or deletion interrupted).
    (root / "step_000004").mkdir()

    assert latest_checkpoint(tmp_path) == first
    assert resolve_resume(tmp_path, "auto") == first

    second = save(tmp_path, 5, model, optimizer, scheduler, {"data_position": 1})
    assert latest_checkpoint(tmp_path) == second
    assert not partial.exists() and not finished_tmp.exists()
    assert sorted(p.name for p in root.iterdir()) == ["step_000001", "step_000004", "step_000005"]


def test_prune_keeps_exactly_last_k(tmp_path):
    model, optimizer, scheduler = make_run()
    for step in [0, 10, 20, 30, 40, 1000000]:
        save(tmp_path, step, model, optimizer, scheduler, {"data_position": step}, keep_last=3)
    kept = list_checkpoints(tmp_path)
    # Ordered by step number, not by name (step_1000000 has 7 digits).
    assert [p.name for p in kept] == ["step_000030", "step_000040", "step_1000000"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [p.name for p in kept]
    assert latest_checkpoint(tmp_path).name == "step_1000000"
    assert load_checkpoint(kept[0], None).trainer_state["data_position"] == 30

    save(tmp_path, 1000001, model, optimizer, scheduler, {"data_position": 0}, keep_last=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_1000001"]
    save(tmp_path, 1000002, model, optimizer, scheduler, {"data_position": 0}, keep_last=None)
    assert len(list_checkpoints(tmp_path)) == 2


def test_saving_the_same_step_again_replaces_it(tmp_path):
    model, optimizer, scheduler = make_run()
    save(tmp_path, 4, model, optimizer, scheduler, {"data_position": 1})
    path = save(tmp_path, 4, model, optimizer, scheduler, {"data_position": 2})
    assert load_checkpoint(path, None).trainer_state["data_position"] == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000004"]


class TiedWithFrozenPart(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(6, 3)
        self.head = nn.Linear(3, 6, bias=False)
        self.head.weight = self.embed.weight  # tied, as in many LMs
        self.tower = nn.Linear(3, 3)
        self.tower.requires_grad_(False)  # a frozen part: rebuilt at resume, not saved


def test_tied_weights_round_trip_and_frozen_weights_are_left_out(tmp_path):
    torch.manual_seed(0)
    model = TiedWithFrozenPart()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.embed(torch.tensor([1, 2])).sum().backward()
    optimizer.step()
    path = save_checkpoint(tmp_path, 1, TrainingState(model, optimizer), None, {})
    stored = read_tensors(path, "training.model.")
    assert sorted(stored) == ["training.model.embed.weight", "training.model.head.weight"]
    assert torch.equal(stored["training.model.embed.weight"], model.embed.weight)

    torch.manual_seed(1)
    fresh = TiedWithFrozenPart()
    fresh.tower.load_state_dict(model.tower.state_dict())  # the frozen part comes from the model folder
    fresh_optimizer = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=0.1)
    load_checkpoint(path, TrainingState(fresh, fresh_optimizer))
    assert fresh.head.weight is fresh.embed.weight  # still tied
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name
    assert torch.equal(fresh_optimizer.state[fresh.embed.weight]["exp_avg"], optimizer.state[model.embed.weight]["exp_avg"])


def test_bad_arguments_write_nothing(tmp_path):
    model, optimizer, scheduler = make_run()
    args = (TrainingState(model, optimizer), scheduler.state_dict())
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(tmp_path, 1, *args, {"sampler": object()})
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(tmp_path, 1, *args, {"loss": float("nan")})
    with pytest.raises(ValueError, match="disagrees"):
        save_checkpoint(tmp_path, 1, *args, {"step": 2})
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(tmp_path, 1, *args, {}, keep_last=0)
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(tmp_path, -1, *args, {})
    assert not (tmp_path / "checkpoints").exists()


def test_resolve_resume_and_incomplete_paths(tmp_path):
    assert resolve_resume(tmp_path, "auto") is None  # fresh run: nothing to resume
    assert resolve_resume(tmp_path, None) is None
    assert resolve_resume(tmp_path, "none") is None
    model, optimizer, scheduler = make_run()
    path = save(tmp_path, 2, model, optimizer, scheduler, {"data_position": 0})
    assert resolve_resume(tmp_path, str(path)) == path
    assert resolve_resume(tmp_path, "auto") == path
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_resume(tmp_path, str(tmp_path / "checkpoints" / "step_000009"))
    (path / "rng_0.pt").unlink()
    with pytest.raises(FileNotFoundError, match="rng_0.pt"):
        load_checkpoint(path, None)
    (path / COMPLETE_MARKER).unlink()
    with pytest.raises(FileNotFoundError, match=COMPLETE_MARKER):
        load_checkpoint(path, None)
    assert latest_checkpoint(tmp_path) is None


def test_marker_is_written_last(tmp_path, monkeypatch):
    # When the marker is written, every other file must already be in the folder.
    import mapo.checkpoint as checkpoint_module

    real_write = checkpoint_module._write_synced
    present_at_marker: list[set[str]] = []

    def spy_write(path, text):
        present_at_marker.append({p.name for p in path.parent.iterdir()})
        return real_write(path, text)

    monkeypatch.setattr(checkpoint_module, "_write_synced", spy_write)
    model, optimizer, scheduler = make_run()
    save(tmp_path, 1, model, optimizer, scheduler, {"data_position": 0})
    # (the first spied write is trainer_state.json itself, before the barrier)
    assert present_at_marker[-1] == {"state", "scheduler.pt", "rng_0.pt", "trainer_state.json"}
    assert (tmp_path / "checkpoints" / "step_000001" / "state" / ".metadata").is_file()
    marker = json.loads((tmp_path / "checkpoints" / "step_000001" / COMPLETE_MARKER).read_text())
    assert marker == {"step": 1, "world_size": 1, "files": ["state/.metadata", "scheduler.pt", "trainer_state.json", "rng_0.pt"]}


class NotPlainData:
    """Anything but plain data in a checkpoint must not be unpickled (it could run code)."""


def test_non_tensor_state_loads_weights_only(tmp_path):
    model, optimizer, scheduler = make_run()
    optimizer.param_groups[0]["note"] = NotPlainData()  # travels as pickled bytes inside the DCP folder
    path = save(tmp_path, 1, model, optimizer, scheduler, {"data_position": 0})
    fresh_model, fresh_optimizer, _ = make_run(seed=1)
    fresh_optimizer.param_groups[0]["note"] = "placeholder"  # so that the load asks for the entry
    with pytest.raises(BaseException, match="Unsupported global: GLOBAL test_checkpoint.NotPlainData"):  # DCP wraps it
        load_checkpoint(path, TrainingState(fresh_model, fresh_optimizer))
    optimizer.param_groups[0]["note"] = "plain text is fine"
    path = save(tmp_path, 2, model, optimizer, scheduler, {"data_position": 0})
    load_checkpoint(path, TrainingState(fresh_model, fresh_optimizer))
    assert fresh_optimizer.param_groups[0]["note"] == "plain text is fine"
    assert torch.equal(fresh_model.weight, model.weight)


def test_each_load_reads_the_metadata_once(tmp_path, monkeypatch):
    """`.metadata` is unpickled once per load (the eager check's read is the one `dcp.load` reuses), and the
    loads give the same result as before; a bf16/int checkpoint's metadata passes the allow-list."""
    from mapo import dcp_reader
    from mapo.checkpoint import load_model_weights

    model, optimizer, scheduler = make_run()
    model.register_buffer("steps", torch.arange(4, dtype=torch.int64))
    model.register_buffer("bf16", torch.ones(2, dtype=torch.bfloat16))
    optimizer.param_groups[0]["note"] = "plain text"  # a bytes entry
    path = save(tmp_path, 1, model, optimizer, scheduler, {"data_position": 0})
    reads = []
    real_load = dcp_reader._MetadataUnpickler.load
    monkeypatch.setattr(dcp_reader._MetadataUnpickler, "load", lambda self: reads.append(self.path) or real_load(self))

    fresh_model, fresh_optimizer, _ = make_run(seed=1)
    fresh_model.register_buffer("steps", torch.zeros(4, dtype=torch.int64))
    fresh_model.register_buffer("bf16", torch.zeros(2, dtype=torch.bfloat16))
    load_checkpoint(path, TrainingState(fresh_model, fresh_optimizer))
    assert len(reads) == 1 and torch.equal(fresh_model.steps, model.steps) and torch.equal(fresh_model.bf16, model.bf16)
    tensors = read_tensors(path, "training.model.")
    assert len(reads) == 2 and torch.equal(tensors["training.model.weight"], model.weight.detach())
    other = make_run(seed=2)[0]
    other.register_buffer("steps", torch.zeros(4, dtype=torch.int64))
    other.register_buffer("bf16", torch.zeros(2, dtype=torch.bfloat16))
    assert sorted(load_model_weights(path, other)) == sorted(key.removeprefix("training.model.") for key in tensors)
    assert len(reads) == 3 and torch.equal(other.weight, model.weight) and torch.equal(other.steps, model.steps)
