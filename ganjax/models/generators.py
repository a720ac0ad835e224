"""Image-to-image generators of junyanz/pytorch-CycleGAN-and-pix2pix (CycleGAN, pix2pix).

Both generators map (B, H, W, C_in) images in [-1, 1] to (B, H, W, output_nc) images in [-1, 1]
(tanh), NHWC. Parameters are float32; activations are computed in `dtype`, and the output image is float32
(the tanh is taken in float32, so losses and pictures never see bfloat16). Layer for layer they are the
reference `ResnetGenerator` / `UnetGenerator` (same parameter counts, same outputs for ported weights),
including `use_bias = (norm == "instance")`.

Intermediate features. `__call__(x, train=False, return_features=())` returns the image; with a
non-empty `return_features` (names of taps, see each class) it returns `(image, {name: feature})`.
Taps only read activations that the forward pass computes anyway: the parameter tree and the output are
unchanged and, under `jax.jit`, unrequested taps cost nothing. The alias "bottleneck" names the
innermost stage of either architecture (the last residual block of the ResNet, the SRPKD relation layer).

Variables: "params" always; "batch_stats" with norm="batch" (make it mutable when train=True).
Random streams: "dropout" when use_dropout and train=True.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from ganjax.models.layers import Conv2d, ConvTranspose2d, norm_layer

GENERATOR_ARCHS = ("resnet_9blocks", "resnet_6blocks", "unet_256", "unet_128")


def _select_features(taps: dict, names: Sequence[str], aliases: dict):
    out = {}
    for name in names:
        key = aliases.get(name, name)
        if key not in taps:
            raise ValueError(f"unknown feature {name!r}; available: {sorted(taps) + sorted(aliases)}")
        out[name] = taps[key]
    return out


class ResnetBlock(nn.Module):
    """x + [reflect pad, conv3, norm, ReLU, (dropout 0.5), reflect pad, conv3, norm](x); shape-preserving."""

    norm: str = "instance"
    use_dropout: bool = False
    conv_impl: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        dim = x.shape[-1]
        use_bias = self.norm == "instance"

        def conv(name):
            return Conv2d(
                dim,
                3,
                padding=1,
                padding_mode="reflect",
                use_bias=use_bias,
                impl=self.conv_impl,
                dtype=self.dtype,
                name=name,
            )

        h = conv("conv_0")(x)
        h = nn.relu(norm_layer(self.norm, "norm_0", self.dtype)(h, train))
        if self.use_dropout:
            h = nn.Dropout(0.5, deterministic=not train)(h)
        h = conv("conv_1")(h)
        h = norm_layer(self.norm, "norm_1", self.dtype)(h, train)
        return x.astype(self.dtype) + h


class ResnetGenerator(nn.Module):
    """The CycleGAN ResNet generator (`resnet_9blocks` / `resnet_6blocks`).

    reflect pad 3 + conv7 (ngf) + norm + ReLU -> 2 x [conv3 s2 p1 (x2 channels) + norm + ReLU]
    -> num_blocks ResnetBlocks (4 ngf channels, H/4 x W/4) -> 2 x [conv-transpose3 s2 p1 op1 (/2 channels)
    + norm + ReLU] -> reflect pad 3 + conv7 (output_nc, with bias) + tanh.
    H and W must be multiples of 4 for the output to have the input's size.

    Feature taps (each the stage output, after its activation; block outputs are post-residual):
      "stem" (H, W, ngf), "down_0" (H/2, W/2, 2 ngf), "down_1" (H/4, W/4, 4 ngf),
      "block_0" .. "block_{num_blocks-1}" (H/4, W/4, 4 ngf), "up_0" (H/2, W/2, 2 ngf), "up_1" (H, W, ngf);
      alias "bottleneck" = the last block.
    Parameter tree: stem_conv, down_{0,1}_conv, block_{i}/conv_{0,1}, up_{0,1}_conv, head_conv (+ the
    matching *_norm entries with norm="batch").
    """

    output_nc: int = 3
    ngf: int = 64
    num_blocks: int = 9
    norm: str = "instance"
    use_dropout: bool = False
    conv_impl: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, return_features: Sequence[str] = ()):
        use_bias = self.norm == "instance"
        kw = dict(impl=self.conv_impl, dtype=self.dtype)
        taps = {}

        stem = Conv2d(
            self.ngf, 7, padding=3, padding_mode="reflect", use_bias=use_bias, name="stem_conv", **kw
        )
        h = stem(x)
        h = taps["stem"] = nn.relu(norm_layer(self.norm, "stem_norm", self.dtype)(h, train))

        for i in range(2):
            ch = self.ngf * 2 ** (i + 1)
            h = Conv2d(ch, 3, stride=2, padding=1, use_bias=use_bias, name=f"down_{i}_conv", **kw)(h)
            h = nn.relu(norm_layer(self.norm, f"down_{i}_norm", self.dtype)(h, train))
            taps[f"down_{i}"] = h

        for i in range(self.num_blocks):
            block = ResnetBlock(self.norm, self.use_dropout, self.conv_impl, self.dtype, name=f"block_{i}")
            h = taps[f"block_{i}"] = block(h, train)

        for i in range(2):
            ch = self.ngf * 2 ** (1 - i)
            up = ConvTranspose2d(
                ch, 3, 2, padding=1, output_padding=1, use_bias=use_bias, name=f"up_{i}_conv", **kw
            )
            h = up(h)
            h = nn.relu(norm_layer(self.norm, f"up_{i}_norm", self.dtype)(h, train))
            taps[f"up_{i}"] = h

        h = Conv2d(self.output_nc, 7, padding=3, padding_mode="reflect", name="head_conv", **kw)(h)
        y = jnp.tanh(h.astype(jnp.float32))
        if not return_features:
            return y
        aliases = {"bottleneck": f"block_{self.num_blocks - 1}"} if self.num_blocks else {}
        return y, _select_features(taps, return_features, aliases)


class UnetGenerator(nn.Module):
    """The pix2pix U-Net generator (`unet_256`: num_downs 8; `unet_128`: num_downs 7).

    Level i = 0 .. num_downs-1 halves the resolution with a conv4 s2 p1 and doubles it back with a
    conv-transpose4 s2 p1; channels ngf, 2 ngf, 4 ngf, then 8 ngf. As in the reference
    `UnetSkipConnectionBlock`s, level i > 0 applies LeakyReLU(0.2) to its input, down conv, norm (not
    at the innermost level), the inner levels, ReLU, up conv, norm, dropout 0.5 (levels 4 .. num_downs-2
    when use_dropout), and concatenates [input, output] on channels. (The reference's LeakyReLU is
    in-place, so its skip half is the activated input, as here; the parent's ReLU makes that moot.)
    Level 0: conv on the image, ..., ReLU, up conv (with bias), tanh. H and W must be multiples of
    2**num_downs.

    Feature taps: "down_i" = level i's down conv (+ norm) output, (H / 2**(i+1), ..., channels of level i),
    pre-activation; "up_i" (i >= 1) = level i's up path output (after norm/dropout, before the concat);
    alias "bottleneck" = "down_{num_downs-1}".
    Parameter tree: down_{i}_conv, down_{i}_norm (0 < i < num_downs-1), up_{i}_conv, up_{i}_norm (i > 0).
    """

    output_nc: int = 3
    num_downs: int = 8
    ngf: int = 64
    norm: str = "batch"
    use_dropout: bool = False
    conv_impl: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, return_features: Sequence[str] = ()):
        n = self.num_downs
        if n < 5:
            raise ValueError(f"num_downs must be >= 5 (as in the reference), got {n}")
        use_bias = self.norm == "instance"
        kw = dict(impl=self.conv_impl, dtype=self.dtype)
        inner = [self.ngf * min(2**i, 8) for i in range(n)]  # channels produced by level i's down conv
        outer = [self.output_nc] + inner[:-1]  # channels produced by level i's up conv
        taps, skips = {}, {}

        h = x
        for i in range(n):
            if i > 0:
                h = skips[i] = nn.leaky_relu(h, 0.2)
            h = Conv2d(inner[i], 4, stride=2, padding=1, use_bias=use_bias, name=f"down_{i}_conv", **kw)(h)
            if 0 < i < n - 1:
                h = norm_layer(self.norm, f"down_{i}_norm", self.dtype)(h, train)
            taps[f"down_{i}"] = h

        for i in reversed(range(n)):
            h = nn.relu(h)
            # The outermost up conv has a bias whatever the norm (it is followed by tanh, not a norm).
            up = ConvTranspose2d(
                outer[i], 4, 2, padding=1, use_bias=use_bias or i == 0, name=f"up_{i}_conv", **kw
            )
            h = up(h)
            if i == 0:
                break
            h = norm_layer(self.norm, f"up_{i}_norm", self.dtype)(h, train)
            if self.use_dropout and 4 <= i < n - 1:
                h = nn.Dropout(0.5, deterministic=not train)(h)
            taps[f"up_{i}"] = h
            h = jnp.concatenate([skips[i], h], axis=-1)

        y = jnp.tanh(h.astype(jnp.float32))
        if not return_features:
            return y
        return y, _select_features(taps, return_features, {"bottleneck": f"down_{n - 1}"})


def build_generator(arch: str, ngf: int = 64, **kw) -> nn.Module:
    """Generator by the reference's `netG` name; kw go to the class (output_nc, norm, use_dropout,
    conv_impl, dtype). Defaults follow the class (ResNet: instance norm; U-Net: batch norm)."""
    if arch == "resnet_9blocks":
        return ResnetGenerator(ngf=ngf, num_blocks=9, **kw)
    if arch == "resnet_6blocks":
        return ResnetGenerator(ngf=ngf, num_blocks=6, **kw)
    if arch == "unet_256":
        return UnetGenerator(ngf=ngf, num_downs=8, **kw)
    if arch == "unet_128":
        return UnetGenerator(ngf=ngf, num_downs=7, **kw)
    raise ValueError(f"unknown generator arch {arch!r}; choose one of {GENERATOR_ARCHS}")
