"""mapo: GRPO and MAPO (Modality-Aware Policy Optimization) for audio language models."""

__version__ = "0.1.0"
