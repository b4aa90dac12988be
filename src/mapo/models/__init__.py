"""Models: the common loader (real Qwen2-Audio or the tiny one) and the tiny-model builder."""
