"""Aging generator of PAPERS.md §A: encoder, embedded linear age estimator and conditioned decoder.

    images (B, H, W, 3) --encode--> features F (B, h, w, C), embedding e = GAP(F) (B, C)
    e --estimate--> logits z = W e + b (B, K), estimated age y_hat = sum_k k softmax(z)_k
    e_t = e + s (a(target) - a(current)), a(.) = rows of W, s = basis_scale   (models.age_embedding)
    (F, e_t) --decode--> images (B, H, W, 3) in [-1, 1]

with h = H / 2**num_downsamples and C = base_features * 2**num_downsamples.

Parameter tree (`params["params"]`): `encoder`, `decoder`, `age_kernel` (C, K) and `age_bias` (K,).
The estimator's weights are top-level so that trainers can read them directly.

Speed notes (XLA:CPU, measured): convolutions with explicit zero padding are much faster than VALID
ones, so a reflect-padded conv is written as reflect pad + conv with a one-pixel zero pad + crop
(exactly the same function); nearest x2 upsampling + 3x3 conv is computed as one conv at low
resolution that yields the four output phases (again exactly the same function, ~2x faster), and
`nn.ConvTranspose` is avoided because its backward pass is 20-30x slower on CPU.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ganjax.models.age_embedding import expected_age, target_embedding
from ganjax.models.layers import InstanceNorm, reflect_pad

CONDITIONINGS = ("adain", "channel_scale", "concat")
OUTPUTS = ("image", "residual", "mask")

_ONE_PIXEL = ((1, 1), (1, 1))


def _instance_norm(x: jax.Array) -> jax.Array:
    """Parameter-free InstanceNorm with statistics in float32 (bfloat16 means are too coarse)."""
    return InstanceNorm()(x.astype(jnp.float32)).astype(x.dtype)


def reflect_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Stride-1 'same' convolution with reflection padding, for odd square kernels (k = 2p + 1).

    Equal to `conv(reflect_pad(x, p), kernel, VALID)`; the extra one-pixel zero pad and the crop
    make XLA:CPU take its padded-convolution path, 1.5-3x faster than VALID here (forward and
    backward). (Adding the reflected ring's contribution to a zero-padded conv as four thin strip
    convs was measured too: ~5% faster per step but twice the compile time, so not worth it.)

    x: (B, H, W, I) with H, W > p; kernel: (k, k, I, O) -> (B, H, W, O).
    """
    p = kernel.shape[0] // 2
    out = jax.lax.conv_general_dilated(
        reflect_pad(x, p), kernel, (1, 1), _ONE_PIXEL, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return out[:, 1:-1, 1:-1]


class ReflectConv(nn.Module):
    """Reflect-padded stride-1 conv (PyTorch ReflectionPad2d(k // 2) + Conv2d), see `reflect_conv`.

    (B, H, W, I) -> (B, H, W, features); params `kernel` (k, k, I, features) and, with `use_bias`,
    `bias` (features,), float32; computed in `dtype`.
    """

    features: int
    kernel_size: int
    use_bias: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.kernel_size % 2 != 1:
            raise ValueError(f"ReflectConv needs an odd kernel size, got {self.kernel_size}.")
        k = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features))
        y = reflect_conv(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros_init(), (self.features,)).astype(self.dtype)
        return y


def _phase_matrices() -> jax.Array:
    """(2, 3, 3) maps, per spatial axis, from the taps of a 3x3 kernel applied to a nearest-x2
    upsampled input to an equivalent 3x3 kernel on the low-resolution input, one per output phase.

    Output row 2i reads low-resolution rows (i-1, i) with taps (w0, w1 + w2); output row 2i + 1
    reads rows (i, i+1) with taps (w0 + w1, w2). Unused taps are zero.
    """
    return jnp.array(
        [
            [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0]],
            [[0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
        ],
        jnp.float32,
    )


class UpsampleConv(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 conv with one pixel of zero padding.

    (B, h, w, C_in) -> (B, 2h, 2w, features). The parameter is the ordinary 3x3 kernel
    (3, 3, C_in, features), no bias (an InstanceNorm follows). Computed without materialising the
    upsampled input: one 3x3 conv of the low-resolution input yields all four output phases
    (4 * features channels), then depth-to-space. About 2x faster on CPU for the same result; the
    tighter 2x2-per-phase form is avoided because even-sized kernels have a very slow backward
    pass on XLA:CPU.
    """

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, in_features = x.shape
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (3, 3, in_features, self.features),
            jnp.float32,
        )
        m = _phase_matrices()
        # phase_kernel[r, s, i, a, b, o] = sum_kl m[a, r, k] m[b, s, l] kernel[k, l, i, o]
        phase_kernel = jnp.einsum("ark,bsl,klio->rsiabo", m, m, kernel)
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            phase_kernel.reshape(3, 3, in_features, 4 * self.features).astype(self.dtype),
            window_strides=(1, 1),
            padding=_ONE_PIXEL,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )  # (B, h, w, [a, b, O])
        y = y.reshape(batch, height, width, 2, 2, self.features).transpose(0, 1, 3, 2, 4, 5)
        return y.reshape(batch, 2 * height, 2 * width, self.features)


class ResidualBlock(nn.Module):
    """pix2pix residual block: x + IN(conv(relu(IN(conv(x))))), reflect-padded 3x3 convs.

    With `modulation` = (scale1, shift1, scale2, shift2), each (B, C), each InstanceNorm output h
    becomes h * (1 + scale) + shift (AdaIN-style conditioning). (B, h, w, C) -> same shape.
    """

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, modulation=None) -> jax.Array:
        features = x.shape[-1]

        def conv():
            return ReflectConv(features, 3, dtype=self.dtype)

        def norm(h, index):
            h = _instance_norm(h)
            if modulation is None:
                return h
            scale, shift = modulation[2 * index], modulation[2 * index + 1]
            return h * (1.0 + scale[:, None, None, :]) + shift[:, None, None, :]

        h = nn.relu(norm(conv()(x), 0))
        h = norm(conv()(h), 1)
        return x + h


class Encoder(nn.Module):
    """(B, H, W, 3) images -> (B, h, w, C) features in `dtype`.

    Reflect-padded 7x7 stem + IN + ReLU; `num_downsamples` x [3x3 stride-2 conv (zero pad 1),
    doubling channels, IN, ReLU]; `num_blocks` residual blocks; a reflect-padded 3x3 conv + ReLU
    without normalisation, so that the features' channel means carry the image's content.
    """

    base_features: int
    num_downsamples: int
    num_blocks: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = images.astype(self.dtype)
        stem = ReflectConv(self.base_features, 7, dtype=self.dtype, name="stem")
        x = nn.relu(_instance_norm(stem(x)))
        features = self.base_features
        for _ in range(self.num_downsamples):
            features *= 2
            x = nn.Conv(
                features,
                (3, 3),
                strides=(2, 2),
                padding=_ONE_PIXEL,
                use_bias=False,
                dtype=self.dtype,
            )(x)
            x = nn.relu(_instance_norm(x))
        for _ in range(self.num_blocks):
            x = ResidualBlock(dtype=self.dtype)(x)
        # The last layer has no InstanceNorm: the embedding e = GAP(F) reads channel means, and after
        # an IN (or a residual sum of IN outputs) those are nearly constant, leaving the estimator blind.
        head = ReflectConv(features, 3, use_bias=True, dtype=self.dtype, name="to_features")
        return nn.relu(head(x))


class Decoder(nn.Module):
    """(B, h, w, C) features + (B, C) target embedding -> (B, H, W, 3) images in [-1, 1], float32.

    Conditioning (see PAPERS.md §A, `aging.conditioning`):
      "adain": an MLP maps e_t to (scale, shift) pairs for both InstanceNorms of every block;
      "channel_scale": F * sigmoid(MLP(e_t)) (HRFAE's age modulation), then plain blocks;
      "concat": Dense(e_t) broadcast over space, concatenated to F, 1x1 conv back to C, plain blocks.
    Then `num_upsamples` x [nearest x2 + 3x3 conv halving channels, IN, ReLU] and a reflect-padded
    7x7 conv to `out_channels` (RGB, or RGB + a mask channel) + tanh.
    """

    num_upsamples: int
    num_blocks: int
    conditioning: str = "adain"
    out_channels: int = 3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array, embedding: jax.Array) -> jax.Array:
        x = features.astype(self.dtype)
        channels = x.shape[-1]
        e = embedding.astype(jnp.float32)  # the small MLPs run in float32

        if self.conditioning == "adain":
            hidden = nn.relu(nn.Dense(channels, name="style_hidden")(e))
            for i in range(self.num_blocks):
                params = nn.Dense(4 * channels, name=f"style_{i}")(hidden)
                modulation = jnp.split(params.astype(self.dtype), 4, axis=-1)
                x = ResidualBlock(dtype=self.dtype)(x, modulation)
        else:
            if self.conditioning == "channel_scale":
                hidden = nn.relu(nn.Dense(channels, name="scale_hidden")(e))
                gate = nn.sigmoid(nn.Dense(channels, name="scale_out")(hidden))
                x = x * gate.astype(self.dtype)[:, None, None, :]
            elif self.conditioning == "concat":
                projected = nn.Dense(channels, name="embed_proj")(e).astype(self.dtype)
                tiled = jnp.broadcast_to(projected[:, None, None, :], x.shape)
                x = nn.Conv(channels, (1, 1), dtype=self.dtype, name="embed_mix")(
                    jnp.concatenate([x, tiled], axis=-1)
                )
            else:
                raise ValueError(
                    f"Unknown conditioning {self.conditioning!r}; choose one of {CONDITIONINGS}."
                )
            for _ in range(self.num_blocks):
                x = ResidualBlock(dtype=self.dtype)(x)

        for _ in range(self.num_upsamples):
            channels //= 2
            x = nn.relu(_instance_norm(UpsampleConv(channels, dtype=self.dtype)(x)))
        to_rgb = ReflectConv(self.out_channels, 7, use_bias=True, dtype=self.dtype, name="to_rgb")
        return jnp.tanh(to_rgb(x)).astype(jnp.float32)


class AgingGenerator(nn.Module):
    """Encoder + embedded linear age estimator + embedding-conditioned decoder (PAPERS.md §A).

    Attributes:
      num_ages: K, estimator classes = integer ages 0..K-1.
      base_features: stem channels; C = base_features * 2**num_downsamples at the bottleneck.
      num_downsamples: stride-2 stages of the encoder (and x2 stages of the decoder).
      num_encoder_blocks, num_decoder_blocks: residual blocks at the bottleneck.
      conditioning: "adain", "channel_scale" or "concat" (see `Decoder`).
      normalize_basis: use L2-normalised aging bases (PAPERS.md option).
      output: "image" (the decoder draws the whole face), "residual" (it draws a change that is
        added to the input face) or "mask" (it draws colours and where to paint them over the input
        face); see `decode`.
      replace_feature_mean: the decoder sees F - GAP(F) + e_t instead of F (see `decode`).
      basis_scale: s in e_t = e + s (a(target) - a(current)) (`age_embedding.target_embedding`).
      dtype: compute dtype of the convolutions; parameters are float32, and the embedding, logits,
        estimated ages and output images are float32.

    Use `apply(..., method=...)` with `encode`, `estimate` or `decode` for the pieces.
    """

    num_ages: int = 101
    base_features: int = 32
    num_downsamples: int = 2
    num_encoder_blocks: int = 4
    num_decoder_blocks: int = 4
    conditioning: str = "adain"
    normalize_basis: bool = False
    output: str = "image"
    replace_feature_mean: bool = True
    basis_scale: float = 1.0
    dtype: Any = jnp.float32

    def setup(self):
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"Unknown conditioning {self.conditioning!r}; choose one of {CONDITIONINGS}.")
        if self.output not in OUTPUTS:
            raise ValueError(f"Unknown output {self.output!r}; choose one of {OUTPUTS}.")
        width = self.base_features * 2**self.num_downsamples
        self.encoder = Encoder(
            self.base_features, self.num_downsamples, self.num_encoder_blocks, dtype=self.dtype
        )
        self.decoder = Decoder(
            self.num_downsamples,
            self.num_decoder_blocks,
            self.conditioning,
            out_channels=4 if self.output == "mask" else 3,
            dtype=self.dtype,
        )
        self.age_kernel = self.param(
            "age_kernel", nn.initializers.lecun_normal(), (width, self.num_ages), jnp.float32
        )
        self.age_bias = self.param("age_bias", nn.initializers.zeros_init(), (self.num_ages,), jnp.float32)

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(B, H, W, 3) images in [-1, 1] -> (features (B, h, w, C) in `dtype`, embedding (B, C)
        float32 = spatial mean of the features)."""
        features = self.encoder(images)
        embedding = jnp.mean(features.astype(jnp.float32), axis=(1, 2))
        return features, embedding

    def estimate(self, embedding: jax.Array, frozen: bool = False) -> jax.Array:
        """Linear age estimator: (B, C) embeddings -> (B, K) float32 logits z = W e + b.

        `frozen=True` stops the gradient to W and b (but not to the embedding): use it for the age
        loss on generated images, since the estimator learns only from real faces.
        """
        kernel, bias = self.age_kernel, self.age_bias
        if frozen:
            kernel, bias = jax.lax.stop_gradient(kernel), jax.lax.stop_gradient(bias)
        return embedding.astype(jnp.float32) @ kernel + bias

    def decode(
        self, features: jax.Array, target_embedding: jax.Array, images: jax.Array | None = None
    ) -> jax.Array:
        """(B, h, w, C) features + (B, C) target embedding -> (B, H, W, 3) float32 images in [-1, 1].

        With `output="residual"` the decoder's output is a change added to the input `images`
        (B, H, W, 3): out = clip(images + 2 * tanh(.), -1, 1), so identity detail need not pass the
        bottleneck and the decoder learns only what aging changes. With `output="mask"` it draws
        colours c and a mask m in [0, 1] (attention-based editing, as in GANimation):
        out = m c + (1 - m) images, so a region that changes colour as a whole (greying hair) is
        painted over instead of shifted by an input-dependent amount.
        """
        return self.decode_with_layers(features, target_embedding, images)[0]

    def decode_with_layers(
        self, features: jax.Array, target_embedding: jax.Array, images: jax.Array | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """`decode`, also returning the layers it blended: with `output="mask"` the (B, H, W, 1)
        float32 `mask` and the (B, H, W, 3) drawn `colours`; an empty dict for the other outputs."""
        if self.replace_feature_mean:
            # e = GAP(F): give the decoder F with its channel means swapped for e_t. At e_t = e this
            # is F itself; otherwise the current age that F's means carry cannot bypass e_t.
            mean = jnp.mean(features.astype(jnp.float32), axis=(1, 2), keepdims=True)
            shift = target_embedding.astype(jnp.float32)[:, None, None, :] - mean
            features = (features.astype(jnp.float32) + shift).astype(features.dtype)
        decoded = self.decoder(features, target_embedding)
        if self.output == "image":
            return decoded, {}
        if images is None:
            raise ValueError(f"AgingGenerator(output={self.output!r}).decode needs the input images.")
        images = images.astype(jnp.float32)
        if self.output == "residual":
            return jnp.clip(images + 2.0 * decoded, -1.0, 1.0), {}
        colours, mask = decoded[..., :3], 0.5 * (decoded[..., 3:] + 1.0)  # tanh -> [0, 1]
        return mask * colours + (1.0 - mask) * images, {"mask": mask, "colours": colours}

    def __call__(
        self,
        images: jax.Array,
        target_ages: jax.Array,
        current_ages: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        """Full pass: encode, estimate the age, build e_t and decode at `target_ages`.

        Args:
          images: (B, H, W, 3) float in [-1, 1].
          target_ages: (B,) float target ages (years; fractional allowed).
          current_ages: (B,) ages for the residual e - a(current); None uses the estimated age
            (through a stop-gradient), PAPERS.md `aging.current_age = "estimated"`.

        Returns:
          dict with `features` (B, h, w, C), `embedding` (B, C), `logits` (B, K), `estimated_age`
          (B,), `target_embedding` (B, C), `images` (B, H, W, 3) and, with `output="mask"`, the
          blend's `mask` (B, H, W, 1) and `colours` (B, H, W, 3). The aging bases are taken from
          a stop-gradient copy of the estimator kernel: the estimator learns only from `logits`.
        """
        features, embedding = self.encode(images)
        logits = self.estimate(embedding)
        estimated = expected_age(logits)
        if current_ages is None:
            current_ages = jax.lax.stop_gradient(estimated)
        e_t = target_embedding(
            embedding,
            jax.lax.stop_gradient(self.age_kernel),
            current_ages,
            target_ages,
            normalize=self.normalize_basis,
            basis_scale=self.basis_scale,
        )
        out = {
            "features": features,
            "embedding": embedding,
            "logits": logits,
            "estimated_age": estimated,
            "target_embedding": e_t,
        }
        out["images"], layers = self.decode_with_layers(features, e_t, images)
        out.update(layers)
        return out
