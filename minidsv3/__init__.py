"""minidsv3: a scaled-down DeepSeek-V3 in JAX / Flax NNX, written to be read."""
