"""Pure algorithm functions (tensors in, tensors out): advantages, losses, MAPO weights."""
