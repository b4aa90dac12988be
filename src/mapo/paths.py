"""Where generated files go. Everything the project writes lives under one git-ignored folder."""

from __future__ import annotations

import os
from pathlib import Path

#: Root of generated files (models, data, runs). Override with MAPO_ARTIFACTS.
ARTIFACTS = Path(os.environ.get("MAPO_ARTIFACTS", "artifacts"))
TINY_MODEL_DIR = ARTIFACTS / "models" / "tiny-qwen2-audio"
TINY_QWEN25_OMNI_DIR = ARTIFACTS / "models" / "tiny-qwen25-omni"  # the thinker only
TINY_QWEN3_OMNI_DIR = ARTIFACTS / "models" / "tiny-qwen3-omni"  # the thinker only
SYNTHETIC_DATA_DIR = ARTIFACTS / "data" / "synthetic"
