"""Differentiable capture of the attention mass generated tokens put on the audio span."""
