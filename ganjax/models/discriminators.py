"""PatchGAN discriminator of junyanz/pytorch-CycleGAN-and-pix2pix (`NLayerDiscriminator`), optionally
projection-conditioned (Miyato & Koyama 2018).

(B, H, W, C_in) images -> (B, H', W', 1) raw logits (no sigmoid), NHWC; with num_layers=3 each logit
sees a 70x70 patch and H' = H/8 - 2 (30x30 at 256 px). Parameters are float32, activations `dtype`.
Variables: "params"; "batch_stats" with norm="batch" (mutable when train=True).
"""

import flax.linen as nn
import jax.numpy as jnp

from ganjax.models.layers import Conv2d, norm_layer


class PatchDiscriminator(nn.Module):
    """`NLayerDiscriminator(input_nc, ndf, n_layers=num_layers, norm_layer)`.

    conv4 s2 p1 (ndf, bias) + LeakyReLU(0.2); num_layers-1 x [conv4 s2 p1 (ndf * min(2**n, 8)) + norm +
    LeakyReLU]; conv4 s1 p1 (ndf * min(2**num_layers, 8)) + norm + LeakyReLU -> h; conv4 s1 p1 (1, bias).
    Convs before a norm have a bias only with norm="instance", as in the reference.
    Parameter tree: conv_0 .. conv_{num_layers+1}, norm_1 .. norm_{num_layers} (batch only), and
    "projection" only when conditioning_dim > 0, so the unconditional tree is the reference's.

    Projection conditioning (conditioning_dim > 0): `condition` is a (B, conditioning_dim) float vector
    (e.g. a one- or two-hot age encoding) and logits += y^T V phi per patch (Miyato & Koyama's projection
    term), where phi is the 4x4xC window of the penultimate feature map h that the last conv reads for
    that logit (a 1x1 window would not line up: the last conv shrinks h by one pixel). V is the
    "projection" kernel (4, 4, C, conditioning_dim), so the term is one conv of h followed by a dot with
    the condition; with condition = 0 the logits are the unconditional ones.
    """

    ndf: int = 64
    num_layers: int = 3
    norm: str = "instance"
    conditioning_dim: int = 0
    dtype: jnp.dtype = jnp.float32
    conv_impl: str = "auto"  # layers.CONV_IMPLS

    @nn.compact
    def __call__(self, x, condition=None, train: bool = False):
        if (condition is None) != (self.conditioning_dim == 0):
            raise ValueError(
                f"condition must be given iff conditioning_dim > 0 "
                f"(conditioning_dim={self.conditioning_dim}, condition={condition is not None})"
            )
        use_bias = self.norm == "instance"

        def conv(features, stride, name, bias=use_bias):
            # All convs of the reference are k4, padding 1 (zero); conv_impl "auto" gives them the custom-VJP
            # convs on CPU, whose strided input gradients and 1-channel kernel gradient are several times
            # faster than XLA:CPU's own (and Winograd passes for the wide stride-1 conv).
            return Conv2d(
                features,
                4,
                stride=stride,
                padding=1,
                use_bias=bias,
                impl=self.conv_impl,
                dtype=self.dtype,
                name=name,
            )

        h = nn.leaky_relu(conv(self.ndf, 2, "conv_0", bias=True)(x), 0.2)
        for n in range(1, self.num_layers + 1):
            stride = 2 if n < self.num_layers else 1
            h = conv(self.ndf * min(2**n, 8), stride, f"conv_{n}")(h)
            h = nn.leaky_relu(norm_layer(self.norm, f"norm_{n}", self.dtype)(h, train), 0.2)
        logits = conv(1, 1, f"conv_{self.num_layers + 1}", bias=True)(h)

        if self.conditioning_dim:
            if condition.shape != (x.shape[0], self.conditioning_dim):
                raise ValueError(f"condition must be (B, {self.conditioning_dim}), got {condition.shape}")
            proj = conv(self.conditioning_dim, 1, "projection", bias=False)(h)
            logits = logits + jnp.einsum("bhwk,bk->bhw", proj, condition.astype(self.dtype))[..., None]
        return logits
