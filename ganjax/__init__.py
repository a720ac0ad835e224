"""ganjax: JAX/Flax continuous face aging (CVPR 2021) and SRPKD GAN distillation (ECCV 2020)."""

__version__ = "0.1.0"
