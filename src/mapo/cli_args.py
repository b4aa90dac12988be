"""`key=value` command-line overrides onto a dataclass config, for the small build commands.

The training program uses Hydra; the one-shot builders (`python -m mapo.data.synthetic`,
`python -m mapo.models.tiny`) only need typed overrides, which OmegaConf gives with errors that
name the bad key and list the valid ones.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

T = TypeVar("T")


def parse_overrides(config_cls: type[T], argv: list[str] | None = None) -> T:
    """Build `config_cls()` with `key=value` overrides from argv; exit 2 with a clear message on a bad key."""
    argv = sys.argv[1:] if argv is None else argv
    base = OmegaConf.structured(config_cls)
    for arg in argv:
        if "=" not in arg:
            raise SystemExit(f"error: expected key=value, got {arg!r}")
    try:
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist(argv))
    except (ConfigKeyError, ValidationError) as err:
        valid = ", ".join(f.name for f in dataclasses.fields(config_cls))
        raise SystemExit(f"error: {err.msg if hasattr(err, 'msg') else err}\nvalid keys: {valid}") from None
    return OmegaConf.to_object(merged)
