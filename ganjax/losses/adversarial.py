"""Adversarial losses with the conventions of junyanz/pytorch-CycleGAN-and-pix2pix's `GANLoss`.

  "lsgan":          D: MSE of real logits to 1 and fake logits to 0;  G: MSE of fake logits to 1.
  "nonsaturating":  D: BCE-with-logits, real -> 1, fake -> 0;          G: BCE-with-logits, fake -> 1
                    (= mean softplus(-fake)); "vanilla" is an alias (pix2pix's name for it).
  "hinge":          D: mean relu(1 - real) + mean relu(1 + fake);        G: -mean(fake).

The reference halves the discriminator objective (`loss_D = (loss_D_real + loss_D_fake) * 0.5` in
its `backward_D`); `discriminator_loss` does the same for every kind, so hinge D values are half
of the usual (Miyato et al.) form. Generator losses are not halved. All means are over every
logit (a PatchGAN's patch map included); logits are upcast to float32.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

ADVERSARIAL_LOSSES = ("lsgan", "nonsaturating", "vanilla", "hinge")


def _check(kind: str) -> None:
    if kind not in ADVERSARIAL_LOSSES:
        raise ValueError(f"Unknown adversarial loss {kind!r}; choose one of {ADVERSARIAL_LOSSES}.")


def discriminator_loss(kind: str, real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """Scalar D loss: 0.5 * (loss on real logits + loss on fake logits), see the module docstring."""
    _check(kind)
    real = jnp.asarray(real_logits, jnp.float32)
    fake = jnp.asarray(fake_logits, jnp.float32)
    if kind == "lsgan":
        real_loss, fake_loss = jnp.mean(jnp.square(real - 1.0)), jnp.mean(jnp.square(fake))
    elif kind == "hinge":
        real_loss, fake_loss = jnp.mean(jax.nn.relu(1.0 - real)), jnp.mean(jax.nn.relu(1.0 + fake))
    else:  # BCE with logits: -log sigmoid(real) = softplus(-real), -log(1 - sigmoid(fake)) = softplus(fake)
        real_loss, fake_loss = jnp.mean(jax.nn.softplus(-real)), jnp.mean(jax.nn.softplus(fake))
    return 0.5 * (real_loss + fake_loss)


def generator_loss(kind: str, fake_logits: jax.Array) -> jax.Array:
    """Scalar G loss on the discriminator's logits for generated images."""
    _check(kind)
    fake = jnp.asarray(fake_logits, jnp.float32)
    if kind == "lsgan":
        return jnp.mean(jnp.square(fake - 1.0))
    if kind == "hinge":
        return -jnp.mean(fake)
    return jnp.mean(jax.nn.softplus(-fake))


def r1_penalty(disc_fn: Callable[[jax.Array], jax.Array], real_images: jax.Array) -> jax.Array:
    """R1 penalty (Mescheder et al. 2018): mean over the batch of ||grad_x sum D(x)||^2.

    `disc_fn` maps (B, H, W, C) images to logits of any shape with leading batch axis (a closure
    over the discriminator's params). Summing the logits gives each example's gradient in one
    backward pass, since examples do not interact (true for InstanceNorm; not for BatchNorm with
    batch statistics). Returns a float32 scalar without the gamma / 2 factor: the caller weights it.
    """
    grads = jax.grad(lambda x: jnp.sum(disc_fn(x).astype(jnp.float32)))(real_images)
    per_example = jnp.sum(jnp.square(grads.astype(jnp.float32)), axis=tuple(range(1, grads.ndim)))
    return jnp.mean(per_example)
