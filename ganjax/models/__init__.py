"""Flax linen modules: pure functions of parameters and inputs."""
