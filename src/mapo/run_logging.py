"""Run logging: a JSONL metrics file always, W&B when asked, a console progress bar.

`make_logger(kind, run_dir, config, ...)` returns a `RunLogger`:

- `kind="wandb"` (default of the trainer config): online when the user has set W&B up (an API key in
  `WANDB_API_KEY` or a `~/.netrc` entry for the W&B host), otherwise offline files under
  `run_dir/wandb/`. `WANDB_MODE` (or the `wandb_mode` argument) overrides the decision. The decision
  never touches the network, and a failing online start (no network, bad key) falls back to offline
  with a printed warning after `init_timeout` seconds instead of blocking the run.
- `kind="none"`: no W&B at all (tests, quick local runs); the local files are still written.

Local files in `run_dir` (the source of truth; W&B is a view of them):
    config.json     {"config": <the run config>, "git": {"commit": sha, "dirty": bool} | null}
    metrics.jsonl   one line per `.log` call: {"step": int, <metric>: number, ...}, flushed per line
    samples.jsonl   one line per completion row of `.log_samples`: {"step": int, <column>: value}
    images.jsonl    one line per `.log_images` call: {"step": int, <name>: png path}

On non-zero ranks pass `enabled=False`: every method is then a no-op (nothing is written, no W&B run,
no bar), so the training loop can call the logger unconditionally.

Metrics arrive already reduced across ranks, once per step, so converting 0-d tensors with `float()`
(a host sync) here is fine; it must not happen inside the loss.

Secrets: the config is written (config.json, W&B config) with the values of secret-looking keys
(`api_key`, `token`, `secret`, `password`, …) and any text equal to the W&B API key replaced by
"<redacted>", and the W&B fallback message is scrubbed the same way, so no log shows a key. Hydra's own
files (`.hydra/*.yaml`) are redacted structurally by `scrub_hydra_files` (the same rule, `_is_secret`). Only
scalars, completion texts and PNG plots are logged: no audio is ever uploaded to W&B.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import re
import subprocess
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mapo.atomic import json_default, write_json_atomic, write_text_atomic

LOGGER_KINDS = ("wandb", "none")
WANDB_MODES = ("online", "offline", "disabled", "dryrun", "run", "shared")
DEFAULT_WANDB_HOST = "api.wandb.ai"

#: Progress-bar postfix: short label -> metric key (the keys the trainer logs). Missing keys are skipped.
DEFAULT_PROGRESS_KEYS: dict[str, str] = {
    "reward": "reward/mean",
    "acc": "reward/accuracy",
    "ω̃": "mapo/omega_mean",
    "L_attn": "loss/attn",
    "tok/s": "throughput/rollout_tok_s",
}


# ---------------------------------------------------------------------------------------------
# Small helpers (pure, testable without W&B)
# ---------------------------------------------------------------------------------------------


def git_commit(path: str | Path | None = None) -> dict[str, Any] | None:
    """Commit of the git repository holding `path` (default: this package's source), and a dirty flag.

    Returns {"commit": 40-hex sha, "dirty": bool} where dirty means tracked files differ from HEAD
    (untracked files are ignored: artifacts and scratch files should not mark a run dirty).
    Returns None outside a git work tree or when git is not installed; never raises for that.
    """
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    if where.is_file():
        where = where.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where, capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (FileNotFoundError, NotADirectoryError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        # No git binary, not a repository, a repository without commits, or a hung git: no commit to record.
        return None
    return {"commit": sha, "dirty": bool(status.strip())}


def wandb_host(env: Mapping[str, str] | None = None) -> str:
    """Host name of the W&B server the SDK would talk to (`WANDB_BASE_URL`, default api.wandb.ai)."""
    env = os.environ if env is None else env
    base_url = env.get("WANDB_BASE_URL", "").strip()
    if not base_url:
        return DEFAULT_WANDB_HOST
    return urlparse(base_url).hostname or base_url


def has_wandb_api_key(env: Mapping[str, str] | None = None, netrc_path: str | Path | None = None) -> bool:
    """True when W&B credentials are configured locally: `WANDB_API_KEY`, or a netrc entry for the host.

    netrc_path: default `$NETRC`, else `~/.netrc`. Reads files only; no network.
    An unreadable/malformed netrc counts as "no key" (with a warning) so the run goes offline
    rather than failing on a file it does not need.
    """
    env = os.environ if env is None else env
    if env.get("WANDB_API_KEY", "").strip():
        return True
    if netrc_path is None:
        netrc_path = env.get("NETRC") or Path.home() / ".netrc"
    netrc_path = Path(netrc_path)
    if not netrc_path.is_file():
        return False
    try:
        entry = netrc.netrc(str(netrc_path)).authenticators(wandb_host(env))
    except (netrc.NetrcParseError, OSError) as err:
        warnings.warn(f"ignoring unreadable netrc {netrc_path}: {err}", stacklevel=2)
        return False
    # authenticators() -> (login, account, password); W&B stores the API key as the password.
    return entry is not None and bool(entry[2])


def decide_wandb_mode(
    explicit: str | None = None,
    env: Mapping[str, str] | None = None,
    netrc_path: str | Path | None = None,
) -> str:
    """The W&B mode to start in, decided without network access.

    Order: `explicit` (the logger's `wandb_mode` argument) > `WANDB_MODE` > "online" when an API key
    is configured (see `has_wandb_api_key`) > "offline".
    Raises ValueError for a mode W&B does not know, listing the valid ones.
    """
    env = os.environ if env is None else env
    for source, mode in (("wandb_mode", explicit), ("WANDB_MODE", env.get("WANDB_MODE"))):
        if mode:
            mode = mode.strip().lower()
            if mode not in WANDB_MODES:
                raise ValueError(f"{source}={mode!r} is not a W&B mode; valid: {', '.join(WANDB_MODES)}")
            return mode
    return "online" if has_wandb_api_key(env, netrc_path) else "offline"


def to_number(key: str, value: Any) -> float | int:
    """A metric value as a plain Python number: ints stay ints, everything else becomes float.

    Accepts Python/numpy scalars and one-element tensors/arrays (`float()` syncs a GPU tensor; the
    logger runs once per step on reduced metrics, so that is acceptable). Raises TypeError naming the key
    for strings, multi-element tensors and other non-numbers.
    """
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, (str, bytes)):
        raise TypeError(f"metric {key!r}: expected a number, got text {value!r}")
    numel = getattr(value, "numel", None) or getattr(value, "size", None)
    count = numel() if callable(numel) else numel
    if count is not None and count != 1:
        shape = tuple(getattr(value, "shape", ()))
        raise TypeError(f"metric {key!r}: expected a scalar, got a tensor/array of shape {shape}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"metric {key!r}: expected a number, got {type(value).__name__} {value!r}") from None


REDACTED = "<redacted>"
#: Config keys whose values are credentials: the name ends in one of these words (so `wandb_api_key`,
#: `hf_token` match, `max_new_tokens` and `eos_token_id` do not).
SECRET_KEY = re.compile(r"(^|[_\-.])(api[_\-]?key|apikey|token|secret|password|passwd|credentials?)$", re.IGNORECASE)


def _secret_values(env: Mapping[str, str] | None = None) -> list[str]:
    env = os.environ if env is None else env
    return [v for k in ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN") if len(v := env.get(k, "").strip()) >= 8]


def redact_text(text: str, env: Mapping[str, str] | None = None) -> str:
    """`text` with every credential from the environment (W&B / Hugging Face) replaced by <redacted>."""
    for secret in _secret_values(env):
        text = text.replace(secret, REDACTED)
    return text


def _is_secret(key: Any, value: Any) -> bool:
    """The one secret rule: a secret-looking key (`SECRET_KEY`) holding a value (anything but None or "").
    The whole value is hidden, a nested block (`credentials: {user: …, pw: …}`) included."""
    return isinstance(key, str) and SECRET_KEY.search(key) is not None and value not in (None, "")


def redact_secrets(config: Any, env: Mapping[str, str] | None = None, *, strings=None) -> Any:
    """A copy of a plain config (dicts, lists, scalars) with secret-looking keys' values and any
    credential from the environment replaced by <redacted>. strings(text, env): how a string value is
    redacted (default `redact_text`: environment credentials; Hydra's files also redact overrides)."""
    strings = redact_text if strings is None else strings
    if isinstance(config, Mapping):
        return {k: REDACTED if _is_secret(k, v) else redact_secrets(v, env, strings=strings) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [redact_secrets(v, env, strings=strings) for v in config]
    if isinstance(config, str):
        return strings(config, env)
    return config


#: A Hydra override as Hydra records it (`+extra.wandb_api_key=…`, `~key`, `++key=…`, `group@pkg=…`).
_OVERRIDE = re.compile(r"([~+]{0,2})([\w.\-/@]+)=(.*)", re.DOTALL)


def _redact_override(text: str, env: Mapping[str, str] | None = None) -> str:
    """An override string `key=value` with the value replaced by <redacted> when a component of the key
    path (`extra.wandb_api_key`, `extra.credentials.pw`) is secret-looking; environment credentials
    replaced by <redacted> in any text."""
    match = _OVERRIDE.fullmatch(text)
    if match is not None and match.group(3) != "":
        prefix, key, _ = match.groups()
        if any(SECRET_KEY.search(part) for part in re.split(r"[./@]", key)):
            return f"{prefix}{key}={REDACTED}"
    return redact_text(text, env)


def scrub_hydra_files(run_dir: str | Path, env: Mapping[str, str] | None = None) -> list[Path]:
    """Hide secrets in Hydra's own record of the run (`run_dir/.hydra/*.yaml`), which Hydra writes before
    mapo sees the config: a key given on the command line (`+extra.wandb_api_key=…`) lands there verbatim.

    Each file is loaded as YAML, redacted structurally (the values of secret-looking keys, as
    `redact_secrets` does; override strings `key=value` whose key path has a secret-looking component; the
    environment's credentials in any text) and written back as YAML (UTF-8) when something changed; other
    text (numbers, names) is never touched. Returns the files rewritten."""
    import yaml

    rewritten = []
    for path in sorted((Path(run_dir) / ".hydra").glob("*.yaml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        redacted = redact_secrets(data, env, strings=_redact_override)
        if redacted != data:
            write_text_atomic(path, yaml.safe_dump(redacted, sort_keys=False, allow_unicode=True,
                                                   default_flow_style=False))
            rewritten.append(path)
    return rewritten


def _plain_config(config: Mapping[str, Any] | Any) -> dict[str, Any]:
    """The config as a plain dict; an OmegaConf DictConfig is resolved first (interpolations filled)."""
    if config is None:
        return {}
    if type(config).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        container = OmegaConf.to_container(config, resolve=True)
        if not isinstance(container, dict):
            raise TypeError(f"config must be a mapping, got an OmegaConf {type(config).__name__}")
        return container
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping, got {type(config).__name__}")
    return dict(config)


# ---------------------------------------------------------------------------------------------
# The logger
# ---------------------------------------------------------------------------------------------


class RunLogger:
    """Writes a run's metrics, samples and images to local files, and to W&B when `wandb_run` is given.

    Create it with `make_logger`; the constructor takes an already-started W&B run (or None) so the
    file logic is testable without W&B. Usable as a context manager (`finish()` on exit).
    `config` is written to config.json as given: a plain dict, already redacted (`make_logger` passes
    `redact_secrets` of the run config).
    """

    def __init__(
        self,
        run_dir: str | Path,
        config: Mapping[str, Any],
        *,
        wandb_run: Any = None,
        total_steps: int | None = None,
        enabled: bool = True,
        progress_keys: Mapping[str, str] | None = None,
        git: dict[str, Any] | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.wandb_run = wandb_run if enabled else None
        self.progress_keys = dict(DEFAULT_PROGRESS_KEYS if progress_keys is None else progress_keys)
        self._bar = None
        self._files: dict[str, Any] = {}
        self._finished = False
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.run_dir / "config.json", {"config": config, "git": git})
        from tqdm.auto import tqdm

        # One bar on stderr; ETA comes from tqdm's rate estimate over the steps done so far.
        self._bar = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True, mininterval=0.5)

    # -- local files ------------------------------------------------------------------------

    def _append(self, name: str, record: Mapping[str, Any]) -> None:
        """Append one JSON line to run_dir/name and flush, so a crash loses at most the line being written."""
        f = self._files.get(name)
        if f is None:
            f = self._files[name] = open(self.run_dir / name, "a", encoding="utf-8")
        f.write(json.dumps(record, default=json_default) + "\n")
        f.flush()

    def _check_open(self) -> None:
        if self._finished:
            raise RuntimeError("RunLogger used after finish()")

    # -- public API -------------------------------------------------------------------------

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record scalar metrics for `step`: one line in metrics.jsonl and one W&B `log` call.

        metrics: {name: scalar}; 0-d tensors / numpy scalars are converted with `float()`.
        """
        if not self.enabled:
            return
        self._check_open()
        if "step" in metrics:
            raise ValueError("metric name 'step' is reserved for the step number")
        values = {key: to_number(key, value) for key, value in metrics.items()}
        self._append("metrics.jsonl", {"step": int(step), **values})
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=int(step))

    def log_samples(self, step: int, rows: Sequence[Mapping[str, Any]], key: str = "samples") -> None:
        """Record a table of completions: one line per row in samples.jsonl, and a W&B Table under `key`.

        rows: e.g. [{"prompt_id": ..., "completion": ..., "reward": ...}, ...]; columns are the union of
        the rows' keys in first-seen order, a row missing a column gets None there.
        """
        if not self.enabled or not rows:
            return
        self._check_open()
        columns: list[str] = []
        for row in rows:
            columns.extend(c for c in row if c not in columns)
        if "step" in columns:
            raise ValueError("sample column name 'step' is reserved for the step number")
        for row in rows:
            self._append("samples.jsonl", {"step": int(step), **row})
        if self.wandb_run is not None:
            import wandb

            data = [[row.get(c) for c in columns] for row in rows]
            self.wandb_run.log({key: wandb.Table(columns=["step", *columns],
                                                 data=[[int(step), *r] for r in data])}, step=int(step))

    def log_images(self, step: int, images: Mapping[str, str | Path]) -> None:
        """Record PNG files (plots): their paths in images.jsonl and the images in W&B under their names.

        Raises FileNotFoundError naming the image when a path does not exist.
        """
        if not self.enabled or not images:
            return
        self._check_open()
        for name, path in images.items():
            if not Path(path).is_file():
                raise FileNotFoundError(f"image {name!r}: no file at {path}")
        self._append("images.jsonl", {"step": int(step), **{k: str(v) for k, v in images.items()}})
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({k: wandb.Image(str(v)) for k, v in images.items()}, step=int(step))

    def progress(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        """Move the console bar to `step` (= optimizer steps completed, 1 after the first) and show metrics.

        The postfix shows the `progress_keys` present in `metrics` (reward, accuracy, ω̃ mean, L_attn).
        """
        if self._bar is None:
            return
        self._check_open()
        self._bar.update(int(step) - self._bar.n)
        if metrics:
            postfix = {}
            for label, key in self.progress_keys.items():
                if key in metrics:
                    value = to_number(key, metrics[key])
                    postfix[label] = f"{value:.3g}" if isinstance(value, float) and math.isfinite(value) else value
            self._bar.set_postfix(postfix, refresh=False)
        self._bar.refresh()

    def finish(self) -> None:
        """Close the bar and files and finish the W&B run. Safe to call twice.

        W&B's service process may still be flushing the offline record file when this returns; it is
        complete once the process exits (W&B's atexit hook) or after `wandb.teardown()`.
        """
        if self._finished:
            return
        self._finished = True
        if self._bar is not None:
            self._bar.close()
        for f in self._files.values():
            f.close()
        self._files.clear()
        if self.wandb_run is not None:
            self.wandb_run.finish()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish()


def _start_wandb(
    mode: str, run_dir: Path, config: dict[str, Any], project: str, run_name: str | None,
    init_timeout: float,
) -> Any:
    """Start a W&B run in `mode`; when an online start fails, warn and start offline instead."""
    import wandb

    def start(run_mode: str):
        return wandb.init(
            project=project, name=run_name, dir=str(run_dir), config=config, mode=run_mode,
            # init_timeout bounds the wait for the server; offline starts do not wait at all.
            settings=wandb.Settings(init_timeout=init_timeout),
        )

    if mode != "online":
        return start(mode)
    try:
        return start("online")
    except wandb.errors.Error as err:  # CommError (no network, timeout), AuthenticationError (bad key), UsageError
        print(f"[mapo] W&B online start failed ({type(err).__name__}: {redact_text(str(err))}); logging offline to "
              f"{run_dir / 'wandb'} (upload later with `wandb sync`)", file=sys.stderr)
        return start("offline")


def make_logger(
    kind: str,
    run_dir: str | Path,
    config: Mapping[str, Any] | Any,
    project: str = "mapo",
    run_name: str | None = None,
    total_steps: int | None = None,
    enabled: bool = True,
    wandb_mode: str | None = None,
    *,
    progress_keys: Mapping[str, str] | None = None,
    init_timeout: float = 15.0,
) -> RunLogger:
    """Build the run logger.

    kind:         "wandb" (local files + W&B, online or offline, see `decide_wandb_mode`) | "none" (local files).
    run_dir:      folder of this run; local files and the W&B folder (`run_dir/wandb/`) go there.
    config:       the resolved run config (dict or OmegaConf); recorded with the git commit.
    total_steps:  length of the progress bar (None: no ETA).
    enabled:      False on non-zero ranks: returns a logger whose methods do nothing.
    wandb_mode:   force a W&B mode ("online", "offline", "disabled"); default: `decide_wandb_mode`.
    progress_keys: label -> metric key shown on the bar; default `DEFAULT_PROGRESS_KEYS`.
    init_timeout: seconds an online W&B start may wait for the server before falling back to offline.
    """
    if kind not in LOGGER_KINDS:
        raise ValueError(f"unknown logger {kind!r}; valid: {', '.join(LOGGER_KINDS)}")
    run_dir = Path(run_dir).resolve()
    if not enabled:
        return RunLogger(run_dir, {}, enabled=False)
    scrub_hydra_files(run_dir)
    plain = redact_secrets(_plain_config(config))
    git = git_commit()
    wandb_run = None
    if kind == "wandb":
        mode = decide_wandb_mode(wandb_mode)
        run_dir.mkdir(parents=True, exist_ok=True)
        if "git" in plain:
            raise ValueError("config key 'git' is reserved for the git commit recorded by the logger")
        wandb_run = _start_wandb(mode, run_dir, {**plain, "git": git}, project, run_name, init_timeout)
    return RunLogger(run_dir, plain, wandb_run=wandb_run, total_steps=total_steps, enabled=True,
                     progress_keys=progress_keys, git=git)
