"""Safety (issue 12 item 5): safetensors only, weights_only loads, no remote code, no eval/pickle of user
text, no audio to W&B, no API key in any log.

The source scans read every module of the package with `ast`, so a new `torch.load` without
`weights_only=True`, an `eval`, a `pickle.load` or a `trust_remote_code=True` anywhere fails here.
"""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch

import mapo

SRC = Path(mapo.__file__).resolve().parent
MODULES = sorted(SRC.rglob("*.py"))


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _dotted(func: ast.expr) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    parts.append(func.id if isinstance(func, ast.Name) else "<expr>")  # model.to(d).eval() is "<expr>.to.eval"
    return ".".join(reversed(parts))


def _keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def scan(predicate) -> list[str]:
    """'file:line: call' for every call in the package for which `predicate(call, name)` is true."""
    found = []
    for module in MODULES:
        tree = ast.parse(module.read_text(), filename=str(module))
        for call in _calls(tree):
            name = _dotted(call.func)
            if predicate(call, name):
                found.append(f"{module.relative_to(SRC)}:{call.lineno}: {name}")
    return found


def test_the_scan_sees_the_package():
    assert len(MODULES) > 30 and scan(lambda call, name: name == "torch.load")  # checkpoint.py loads state


def test_every_torch_load_is_weights_only():
    def unsafe(call, name):
        if name != "torch.load":
            return False
        value = _keyword(call, "weights_only")
        return not (isinstance(value, ast.Constant) and value.value is True)

    assert scan(unsafe) == []


def test_no_eval_exec_or_unpickling_anywhere():
    forbidden = {"eval", "exec", "pickle.load", "pickle.loads", "marshal.load", "marshal.loads", "dill.load",
                 "dill.loads", "yaml.unsafe_load", "yaml.full_load", "shelve.open", "numpy.load", "np.load"}

    def bad(call, name):
        if name in forbidden:
            return True
        if name in ("yaml.load",):  # only with an explicit SafeLoader
            loader = _keyword(call, "Loader")
            return not (loader is not None and "Safe" in _dotted(loader))
        return False

    assert scan(bad) == []


def test_remote_code_is_never_trusted():
    def trusts(call, name):
        value = _keyword(call, "trust_remote_code")
        return value is not None and not (isinstance(value, ast.Constant) and value.value is False)

    assert scan(trusts) == []


def test_from_pretrained_model_loads_use_safetensors_only():
    def pickled_ok(call, name):
        # configs, processors, tokenizers and feature extractors hold no weights
        if not name.endswith("from_pretrained") or any(k in name for k in ("Config", "Processor", "Tokenizer", "FeatureExtractor")):
            return False
        value = _keyword(call, "use_safetensors")
        return not (isinstance(value, ast.Constant) and value.value is True)

    assert scan(pickled_ok) == []


def test_a_model_folder_with_only_pickled_weights_is_refused(tiny_env, tmp_path):
    """A .bin checkpoint (a pickle that could run code) is never loaded, with a message that says why."""
    from safetensors.torch import load_file

    from mapo.models.loader import load_model_and_processor

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_env["model"], folder)
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors weights \(found pytorch_model\.bin: pickle"):
        load_model_and_processor(folder)


@pytest.mark.parametrize("poisoned", ["scheduler.pt", "rng_0.pt"])
def test_checkpoint_state_refuses_pickled_code(tmp_path, poisoned):
    """mapo's own loader, not just torch: a checkpoint's non-tensor state whose pickle would run a command."""
    import os

    from torch import nn

    from mapo.checkpoint import TrainingState, load_checkpoint, save_checkpoint

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    path = save_checkpoint(tmp_path / "run", 1, TrainingState(model, optimizer), {"last_epoch": 1}, {"step": 1})
    assert load_checkpoint(path, TrainingState(model, optimizer)).scheduler_state == {"last_epoch": 1}
    torch.save({"state": Boom()}, path / poisoned)
    with pytest.raises(Exception, match="Weights only load failed|weights_only"):
        load_checkpoint(path, TrainingState(model, optimizer))
    assert not (tmp_path / "pwned").exists()


def test_checkpoint_metadata_that_would_run_code_is_refused(tmp_path):
    """DCP's `.metadata` is a pickle: our reader resolves only DCP's own types, so a poisoned checkpoint
    folder raises on resume, export and read_tensors without running anything; a clean one still loads."""
    import os
    import pickle

    from torch import nn

    from mapo.checkpoint import (
        STATE_DIR,
        TrainingState,
        load_checkpoint,
        read_tensors,
        save_checkpoint,
    )
    from mapo.dcp_reader import UnsafeCheckpointError

    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    path = save_checkpoint(tmp_path / "run", 1, TrainingState(model, optimizer), None, {"step": 1})
    assert torch.equal(read_tensors(path, "training.model.")["training.model.weight"], model.weight.detach())

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    metadata = path / STATE_DIR / ".metadata"
    metadata.write_bytes(pickle.dumps(Boom()))
    for load in (lambda: load_checkpoint(path, TrainingState(model, optimizer)), lambda: read_tensors(path)):
        with pytest.raises(UnsafeCheckpointError, match=r"\.metadata.*refers to (posix|os|nt)\.system"):
            load()
    assert not (tmp_path / "pwned").exists()
    metadata.write_bytes(pickle.dumps({"not": "metadata"}))
    with pytest.raises(UnsafeCheckpointError, match="not DCP metadata"):
        read_tensors(path)



def _short_str(text: str) -> bytes:
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data  # SHORT_BINUNICODE


def _call_pickle(module: str, name: str, args: tuple[str, ...], opcode: str) -> bytes:
    """A hand-built protocol-4 pickle that calls `module`'s `name` with string `args`, naming it by a GLOBAL
    or a STACK_GLOBAL opcode: pickle ≥ 4 resolves a dotted `name` attribute by attribute."""
    if opcode == "GLOBAL":
        target = b"c" + module.encode() + b"\n" + name.encode() + b"\n"
    else:
        target = _short_str(module) + _short_str(name) + b"\x93"
    return (b"\x80\x04" + target + b"(" + b"".join(_short_str(a) for a in args) + b"t" + b"R" + b".")


@pytest.mark.parametrize("opcode", ["GLOBAL", "STACK_GLOBAL"])
@pytest.mark.parametrize("exploit", ["os.system", "torch_save_to_dcp"])
def test_checkpoint_metadata_reaching_past_dcp_types_is_refused(tmp_path, exploit, opcode):
    """Any name under `torch.distributed.checkpoint.` is not safe: a dotted name in one of its modules
    reaches `os.system`, and `format_utils.torch_save_to_dcp` unpickles a file with `weights_only=False`.
    Both are refused, naming the file and the name, and never run (the marker file is never made)."""
    import os

    from torch import nn

    from mapo.checkpoint import (
        STATE_DIR,
        TrainingState,
        load_checkpoint,
        read_tensors,
        save_checkpoint,
    )
    from mapo.dcp_reader import UnsafeCheckpointError

    marker = tmp_path / "pwned"
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    path = save_checkpoint(tmp_path / "run", 1, TrainingState(model, optimizer), None, {"step": 1})
    if exploit == "os.system":
        module, name, args = "torch.distributed.checkpoint.filesystem", "os.system", ("touch " + str(marker),)
    else:
        class Boom:
            def __reduce__(self):
                return (os.system, ("touch " + str(marker),))

        torch.save(Boom(), tmp_path / "boom.pt")  # what torch_save_to_dcp would torch.load(weights_only=False)
        module, name, args = ("torch.distributed.checkpoint.format_utils", "torch_save_to_dcp",
                              (str(tmp_path / "boom.pt"), str(tmp_path / "out")))
    metadata = path / STATE_DIR / ".metadata"
    metadata.write_bytes(_call_pickle(module, name, args, opcode))
    for load in (lambda: load_checkpoint(path, TrainingState(model, optimizer)), lambda: read_tensors(path)):
        with pytest.raises(UnsafeCheckpointError) as error:
            load()
        assert str(metadata) in str(error.value) and f"{module}.{name}" in str(error.value)
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ logs and W&B

KEY = "0123456789abcdef0123456789abcdef01234567"  # 40 hex characters, like a W&B API key


def test_config_secrets_and_the_environment_key_are_redacted(tmp_path, monkeypatch):
    from mapo.run_logging import make_logger

    monkeypatch.setenv("WANDB_API_KEY", KEY)
    config = {"logger": {"kind": "none"}, "extra": {"wandb_api_key": "plain-secret-value", "note": f"key={KEY}"},
              "rollout": {"max_new_tokens": 48}}
    logger = make_logger("none", tmp_path, config)
    logger.log(1, {"loss": 1.0})
    logger.finish()
    written = (tmp_path / "config.json").read_text()
    assert KEY not in written and "plain-secret-value" not in written
    saved = json.loads(written)["config"]
    assert saved["extra"] == {"wandb_api_key": "<redacted>", "note": "key=<redacted>"}
    assert saved["rollout"]["max_new_tokens"] == 48  # "tokens" is not a secret


def test_hydra_files_of_the_run_lose_the_secrets(tmp_path, monkeypatch):
    """Hydra writes .hydra/overrides.yaml and config.yaml before mapo runs: a key given on the command line
    lands there verbatim until the logger scrubs them."""
    from mapo.run_logging import make_logger

    monkeypatch.setenv("WANDB_API_KEY", KEY)
    hydra = tmp_path / ".hydra"
    hydra.mkdir()
    (hydra / "overrides.yaml").write_text("- +extra.wandb_api_key=plain-secret-value\n- rollout.max_new_tokens=48\n")
    (hydra / "config.yaml").write_text(f"extra:\n  wandb_api_key: plain-secret-value\n  note: key={KEY}\n")
    (hydra / "hydra.yaml").write_text("job:\n  name: train\n")
    config = {"extra": {"wandb_api_key": "plain-secret-value", "note": f"key={KEY}"}, "rollout": {"max_new_tokens": 48}}
    make_logger("none", tmp_path, config).finish()
    assert (hydra / "overrides.yaml").read_text() == "- +extra.wandb_api_key=<redacted>\n- rollout.max_new_tokens=48\n"
    assert (hydra / "config.yaml").read_text() == "extra:\n  wandb_api_key: <redacted>\n  note: key=<redacted>\n"
    assert (hydra / "hydra.yaml").read_text() == "job:\n  name: train\n"  # nothing secret: untouched


def test_failed_online_start_message_does_not_show_the_key(tmp_path, monkeypatch, capsys):
    import wandb

    from mapo import run_logging

    monkeypatch.setenv("WANDB_API_KEY", KEY)
    calls = []

    def fake_init(**kwargs):
        calls.append(kwargs["mode"])
        if kwargs["mode"] == "online":
            raise wandb.errors.AuthenticationError(f"API key {KEY} is invalid")
        return object()

    monkeypatch.setattr(wandb, "init", fake_init)
    run_logging._start_wandb("online", tmp_path, {}, "p", None, 1.0)
    err = capsys.readouterr().err
    assert calls == ["online", "offline"] and "AuthenticationError" in err and KEY not in err and "<redacted>" in err
