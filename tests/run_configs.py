"""Composing a training config in-process (for tests that call `mapo.train.run` without a subprocess).

Not a test module: imported as `from run_configs import compose_run_config` (tests/ is on sys.path).
"""

from __future__ import annotations

from pathlib import Path

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose_run_config(env: dict, run_dir: Path, experiment: str, *overrides: str):
    """The MapoConfig of `experiment` on the test model and data (`env` from the tiny_env fixture),
    logging to files only, one thread, small evaluation; `overrides` come last."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from mapo.config import MapoConfig, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("config", overrides=[
            f"experiment={experiment}", "logger=none", f"model.path={env['model']}", f"data.dir={env['data']}",
            f"trainer.run_dir={run_dir}", "trainer.num_threads=1", "trainer.eval_on_start=false", "data.eval_max_items=2",
            *overrides,
        ])
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(MapoConfig), cfg))
