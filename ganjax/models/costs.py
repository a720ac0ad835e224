"""Model size and compute: parameter counts and multiply-accumulates (MACs) of one forward pass.

MACs follow the convention of torchprofile, the profiler behind the numbers GAN Compression and the
SRPKD comparisons report: every convolution counts (output elements) x (input channels) x (kernel
area), transposed convolutions included (so a stride-2 transposed conv counts the kernel at every
output pixel); normalisations, activations and additions are not counted. With it the ResNet-9blocks
generator at ngf 64 and 256 px costs 56.8 GMACs, GAN Compression's figure for its horse->zebra teacher.

Counting runs the module abstractly (`jax.eval_shape`): no FLOPs are spent and any input size works.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from ganjax.models.layers import Conv2d, ConvTranspose2d


def count_params(params) -> int:
    """Number of scalars in a parameter tree (batch-norm running statistics are not parameters)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def count_macs(module: nn.Module, variables, input_shape: tuple[int, ...], **apply_kwargs) -> int:
    """MACs of `module.apply(variables, x, **apply_kwargs)` for x of `input_shape` (NHWC, float32).

    `variables` may be arrays or ShapeDtypeStructs. Raises ValueError for a module without any
    Conv2d / ConvTranspose2d (nothing to count is more likely a mistake than a free model).
    """
    macs = []

    def count(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        layer = context.module
        if context.method_name == "__call__" and isinstance(layer, Conv2d | ConvTranspose2d):
            in_channels = args[0].shape[-1]
            macs.append(math.prod(out.shape) * in_channels * layer.kernel_size**2)
        return out

    def forward(variables, x):
        with nn.intercept_methods(count):
            return module.apply(variables, x, **apply_kwargs)

    jax.eval_shape(forward, variables, jax.ShapeDtypeStruct(input_shape, jnp.float32))
    if not macs:
        raise ValueError(f"{type(module).__name__} has no Conv2d / ConvTranspose2d layers to count.")
    return sum(macs)


def describe(params_count: int, macs: int) -> str:
    """'11.38M params, 56.80G MACs'."""
    return f"{params_count / 1e6:.2f}M params, {macs / 1e9:.2f}G MACs"
