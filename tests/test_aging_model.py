"""AgingGenerator: shapes, parameter layout, reconstruction identity, stop-gradients, exact rewrites."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ganjax.losses.aging import age_cross_entropy
from ganjax.models.age_embedding import target_embedding
from ganjax.models.aging import AgingGenerator, UpsampleConv, reflect_conv
from ganjax.models.layers import reflect_pad

K = 21
TINY = dict(num_ages=K, base_features=4, num_encoder_blocks=1, num_decoder_blocks=1)
KEY = jax.random.key(0)


def normal(seed, shape):
    """Fixed random test data, drawn with NumPy (an eager jax.random call compiles a kernel)."""
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def images_of(size, batch=2):
    return jnp.tanh(normal(1, (batch, size, size, 3)))


@functools.cache
def tiny(conditioning="adain"):
    """(model, params, images) of a tiny generator at 32 px.

    The parameters are random normals of the right shapes drawn with NumPy (fan-in scaled): the
    tests need some parameters, and a jitted `model.init` would cost a compilation per model.
    """
    model = AgingGenerator(conditioning=conditioning, **TINY)
    images = images_of(32)
    shapes = jax.eval_shape(model.init, KEY, images, jnp.zeros((2,)))
    rng = np.random.default_rng(0)

    def draw(leaf):
        scale = 0.1 if len(leaf.shape) == 1 else 1.0 / np.sqrt(np.prod(leaf.shape[:-1]))
        return jnp.asarray(rng.normal(scale=scale, size=leaf.shape), jnp.float32)

    return model, jax.tree.map(draw, shapes), images


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("conditioning", ["adain", "channel_scale", "concat"])
def test_output_shapes(conditioning, size):
    model = AgingGenerator(conditioning=conditioning, **TINY)
    images, ages = images_of(size), jnp.array([10.0, 15.5])
    params = jax.eval_shape(model.init, KEY, images, ages)
    out = jax.eval_shape(model.apply, params, images, ages)
    c, h = 16, size // 4
    expected = {
        "features": (2, h, h, c),
        "embedding": (2, c),
        "logits": (2, K),
        "estimated_age": (2,),
        "target_embedding": (2, c),
        "images": (2, size, size, 3),
    }
    assert {k: v.shape for k, v in out.items()} == expected
    assert all(v.dtype == jnp.float32 for v in out.values())
    tree = params["params"]
    assert set(tree) == {"encoder", "decoder", "age_kernel", "age_bias"}
    assert tree["age_kernel"].shape == (c, K) and tree["age_bias"].shape == (K,)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


def _reconstruction_probe(model, params, images, labels):
    """Everything the reconstruction-identity test compares (jitted as one function)."""
    estimated = model.apply(params, images, jnp.zeros((2,)))["estimated_age"]
    out = model.apply(params, images, estimated)
    direct = model.apply(params, out["features"], out["embedding"], method="decode")
    logits = model.apply(params, out["embedding"], method="estimate")
    with_labels = model.apply(params, images, labels, labels)
    return out, direct, logits, with_labels


@pytest.mark.parametrize("conditioning", ["adain", "channel_scale", "concat"])
def test_decoding_at_the_estimated_age_is_decoding_the_embedding(conditioning):
    model, params, images = tiny(conditioning)
    probe = jax.jit(functools.partial(_reconstruction_probe, model))
    out, direct, logits, with_labels = probe(params, images, jnp.array([30.0, 4.5]))
    np.testing.assert_allclose(out["target_embedding"], out["embedding"], atol=1e-5)
    np.testing.assert_allclose(out["images"], direct, atol=1e-5)
    assert float(jnp.max(jnp.abs(out["images"]))) <= 1.0
    # The pieces compose to the full pass; e is the spatial mean of F.
    np.testing.assert_allclose(out["logits"], logits, atol=1e-5)
    np.testing.assert_allclose(out["embedding"], out["features"].mean(axis=(1, 2)), atol=1e-6)
    # With known current ages, target = current also gives back e.
    np.testing.assert_allclose(with_labels["target_embedding"], with_labels["embedding"], atol=1e-5)


def test_estimator_learns_only_from_real_image_estimation():
    model, params, images = tiny()
    targets, ages = jnp.array([5.0, 18.0]), jnp.array([12.0, 3.0])

    def image_loss(p):
        return jnp.mean(model.apply(p, images, targets)["images"] ** 2)

    def estimator_loss(p, embedding, frozen):
        logits = model.apply(p, embedding, frozen, method="estimate")
        return age_cross_entropy(logits, ages)

    @jax.jit
    def all_grads(p):
        _, embedding = model.apply(p, images, method="encode")
        estimator_grads = jax.grad(estimator_loss, argnums=(0, 1))
        return (
            jax.grad(image_loss)(p)["params"],
            estimator_grads(p, embedding, False),
            estimator_grads(p, embedding, True),
            # The aging-basis path itself does depend on the kernel, so without the stop-gradient
            # the image loss would reach it.
            jax.grad(lambda k: jnp.sum(target_embedding(embedding, k, ages, targets) ** 2))(
                p["params"]["age_kernel"]
            ),
        )

    from_images, from_estimate, from_frozen, from_basis = all_grads(params)

    def peak(x):
        return float(jnp.abs(x).max())

    assert peak(from_images["age_kernel"]) == 0.0 and peak(from_images["age_bias"]) == 0.0
    assert peak(from_images["decoder"]["to_rgb"]["kernel"]) > 0.0
    assert peak(from_images["encoder"]["stem"]["kernel"]) > 0.0
    assert peak(from_estimate[0]["params"]["age_kernel"]) > 0.0
    # frozen=True (the age loss on generated faces): no gradient to W, b; still one to e.
    assert peak(from_frozen[0]["params"]["age_kernel"]) == 0.0
    assert peak(from_frozen[0]["params"]["age_bias"]) == 0.0
    assert peak(from_frozen[1]) > 0.0
    assert peak(from_basis) > 0.0


def test_bfloat16_compute_keeps_float32_params_and_outputs():
    _, params, images = tiny()  # the parameter tree does not depend on the compute dtype
    model = AgingGenerator(dtype=jnp.bfloat16, **TINY)
    out = jax.jit(model.apply)(params, images, jnp.array([10.0, 15.5]))
    assert out["features"].dtype == jnp.bfloat16
    assert out["images"].dtype == out["logits"].dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out["images"])))


def test_unknown_conditioning_is_rejected():
    model = AgingGenerator(conditioning="film", **TINY)
    with pytest.raises(ValueError, match="adain.*channel_scale.*concat"):
        model.init(KEY, jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,)))


def _valid_conv(x, kernel):
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


@pytest.mark.parametrize("k", [3, 7])
def test_reflect_conv_equals_reflect_pad_then_valid_conv(k):
    x, kernel = normal(0, (2, 9, 11, 3)), normal(1, (k, k, 3, 5))

    def reference(x, kernel):
        return _valid_conv(reflect_pad(x, k // 2), kernel)

    @functools.partial(jax.jit, static_argnums=0)
    def value_and_vjp(fn, cotangent):
        out, vjp = jax.vjp(fn, x, kernel)
        return out, vjp(cotangent)

    cotangent = normal(2, (2, 9, 11, 5))
    got, got_grads = value_and_vjp(reflect_conv, cotangent)
    want, want_grads = value_and_vjp(reference, cotangent)
    np.testing.assert_allclose(got, want, atol=1e-4)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-3)


def test_upsample_conv_equals_nearest_upsampling_then_conv():
    module = UpsampleConv(5)
    x = normal(0, (2, 5, 7, 4))
    params = {"params": {"kernel": normal(1, (3, 3, 4, 5))}}
    upsampled = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    padded = jnp.pad(upsampled, ((0, 0), (1, 1), (1, 1), (0, 0)))
    expected = _valid_conv(padded, params["params"]["kernel"])
    np.testing.assert_allclose(jax.jit(module.apply)(params, x), expected, atol=1e-5)


def test_embedding_carries_image_content():
    # Regression: with an InstanceNorm right before the pool, GAP(F) is nearly the same for every
    # image and the embedded estimator cannot learn ages. Dark vs bright faces must embed apart.
    from ganjax.data.synthetic_faces import render

    model = AgingGenerator(base_features=8, num_encoder_blocks=1, num_decoder_blocks=1)
    faces = np.stack([render(i, age, 32) for i, age in ((0, 5.0), (0, 90.0), (1, 40.0), (2, 70.0))])
    images = jnp.asarray(faces, jnp.float32) / 127.5 - 1.0
    params = model.init(jax.random.key(0), images, jnp.zeros((4,)))
    _, embedding = model.apply(params, images, method=model.encode)
    spread = jnp.std(embedding, axis=0).mean() / jnp.abs(embedding).mean()
    assert spread > 0.05, float(spread)


def test_residual_output_adds_a_bounded_change_to_the_input():
    model = AgingGenerator(base_features=8, num_encoder_blocks=1, num_decoder_blocks=1, output="residual")
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
    params = model.init(jax.random.key(0), images, jnp.zeros((2,)))
    out = model.apply(params, images, jnp.array([10.0, 70.0]))
    assert out["images"].shape == images.shape
    assert float(jnp.min(out["images"])) >= -1.0 and float(jnp.max(out["images"])) <= 1.0
    features, embedding = out["features"], out["embedding"]
    decoded = model.apply(params, features, embedding, method=model.decode, images=images)
    image_model = model.clone(output="image")  # same parameter tree, decoder drawn directly
    change = 2.0 * image_model.apply(params, features, embedding, method=image_model.decode)
    np.testing.assert_allclose(decoded, jnp.clip(images + change, -1, 1), atol=1e-6)
    with pytest.raises(ValueError, match="needs the input images"):
        model.apply(params, features, embedding, method=model.decode)


def test_mask_output_blends_decoded_colours_over_the_input():
    model = AgingGenerator(
        base_features=8, num_encoder_blocks=1, num_decoder_blocks=1, output="mask", replace_feature_mean=False
    )
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
    params = model.init(jax.random.key(0), images, jnp.zeros((2,)))
    assert params["params"]["decoder"]["to_rgb"]["kernel"].shape[-1] == 4  # RGB + mask
    out = model.apply(params, images, jnp.array([10.0, 70.0]))
    # The decoder's raw 4 tanh channels (without the mean replacement, decode only adds the blend).
    decoded = model.apply(
        params, out["features"], out["target_embedding"], method=lambda m, f, e: m.decoder(f, e)
    )
    colours, mask = decoded[..., :3], (decoded[..., 3:] + 1) / 2
    assert 0.0 < float(mask.min()) and float(mask.max()) < 1.0
    np.testing.assert_allclose(out["mask"], mask, atol=1e-6)
    np.testing.assert_allclose(out["colours"], colours, atol=1e-6)
    np.testing.assert_allclose(out["images"], mask * colours + (1 - mask) * images, atol=1e-6)
    # Each output pixel lies between the input and the drawn colour: the blend never overshoots.
    low, high = jnp.minimum(images, colours), jnp.maximum(images, colours)
    assert bool(jnp.all((out["images"] >= low - 1e-6) & (out["images"] <= high + 1e-6)))
    with pytest.raises(ValueError, match="needs the input images"):
        model.apply(params, out["features"], out["embedding"], method=model.decode)
