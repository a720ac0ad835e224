"""config.dtype = "bfloat16": one step of each trainer's step function on its :smoke networks.

Parameters and optimizer states must stay float32, the losses must be float32, finite and close to the
float32 step's from the same state and batch (bfloat16 keeps ~3 significant digits, so the tolerance is
loose), and an unknown dtype must be refused by config validation.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import aging_utkface, cyclegan_horse2zebra, pix2pix_cityscapes
from ganjax.trainers import aging, common, cyclegan, distillation, pix2pix
from ganjax.trainers import translation_common as tc

LOSS_RTOL = 0.1


def _with_dtype(config, dtype):
    config = config.copy_and_resolve_references()
    config.dtype = dtype
    return config


def _batch(size, keys, seed=0):
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.uniform(-1, 1, (2, size, size, 3)), jnp.float32) for k in keys}


def _assert_float32_state(state):
    for leaf in jax.tree.leaves((state.g_params, state.d_params, state.g_opt_state, state.d_opt_state)):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert leaf.dtype == jnp.float32


def _assert_close_losses(m16, m32, keys):
    for key in keys:
        assert m16[key].dtype == jnp.float32, key
        assert np.isfinite(float(m16[key])), key
        np.testing.assert_allclose(float(m16[key]), float(m32[key]), rtol=LOSS_RTOL, atol=1e-3, err_msg=key)


def _translation_step(trainer, config, batch, teacher=None, teacher_variables=None):
    """One step of pix2pix / CycleGAN with config's networks in config.dtype, from the float32 init."""
    gen, disc = tc.make_generator(config), tc.make_discriminator(config)
    tx, schedule = tc.make_optimizer(config)
    size = config.data.crop_size
    if trainer is pix2pix:
        init = functools.partial(pix2pix.init_state, gen=gen, disc=disc, g_tx=tx, d_tx=tx, image_size=size)
    else:
        pool = config.train.pool_size
        init = functools.partial(
            cyclegan.init_state, gen=gen, disc=disc, g_tx=tx, d_tx=tx, image_size=size, pool_size=pool
        )
    state = jax.jit(init)(tc.init_key(0))  # parameters are float32 whatever the compute dtype
    step = functools.partial(
        trainer.train_step,
        gen=gen,
        disc=disc,
        teacher=teacher,
        g_tx=tx,
        d_tx=tx,
        schedule=schedule,
        settings=trainer.StepSettings.from_config(config),
    )
    return jax.jit(step)(state, batch, teacher_variables or {})


def test_distill_pix2pix_bfloat16_step():
    """The distillation step: pix2pix's G+D step plus a bfloat16 teacher and the KD losses (one compile
    per dtype covers both trainers' step code)."""
    base = pix2pix_cityscapes.get_config("smoke")
    batch = _batch(base.data.crop_size, ("a", "b"))
    results = {}
    for dtype in ("float32", "bfloat16"):
        config = _with_dtype(base, dtype)
        with config.unlocked():
            config.trainer = "distill_pix2pix"
            config.teacher = dict(ngf=8, norm="batch", dropout=False, train_mode=False)
            config.distill = dict(
                lambda_kd=10.0,
                lambda_sp=100.0,
                relation_layers=("bottleneck",),
                relation_norm="row",
                relation_method="fused",
            )
        teacher = distillation.make_teacher(config)
        x = jnp.zeros((1, config.data.crop_size, config.data.crop_size, 3))
        teacher_variables = teacher.init(jax.random.key(3), x)
        results[dtype] = _translation_step(pix2pix, config, batch, teacher, teacher_variables)
    (state16, m16), (_, m32) = results["bfloat16"], results["float32"]
    _assert_float32_state(state16)
    _assert_close_losses(m16, m32, ["g_total", "d_total", "g_l1", "g_adversarial", "kd_l1", "kd_relation"])


def test_cyclegan_bfloat16_step():
    base = cyclegan_horse2zebra.get_config("smoke")
    batch = _batch(base.data.crop_size, ("a", "b"))
    (state16, m16), (_, m32) = (
        _translation_step(cyclegan, _with_dtype(base, dtype), batch) for dtype in ("bfloat16", "float32")
    )
    _assert_float32_state(state16)
    _assert_close_losses(m16, m32, [k for k in m32 if k.startswith(("g_", "d_")) and "norm" not in k])


def test_aging_bfloat16_step():
    base = aging_utkface.get_config("smoke")
    size = base.data.size
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.uniform(-1, 1, (2, size, size, 3)), jnp.float32),
        "age": jnp.asarray([20.0, 60.0], jnp.float32),
    }
    results = {}
    for dtype in ("float32", "bfloat16"):
        config = _with_dtype(base, dtype)
        model, disc = aging.build_models(config)
        g_tx, d_tx = aging.build_optimizers(config)
        init = aging.state_initializer(config, model, disc, g_tx, d_tx)
        state = jax.jit(init)(jax.random.key(0))
        step = functools.partial(
            aging.train_step,
            model=model,
            disc=disc,
            g_tx=g_tx,
            d_tx=d_tx,
            settings=aging.StepSettings.from_config(config),
        )
        results[dtype] = jax.jit(step)(state, batch)
    (state16, m16), (_, m32) = results["bfloat16"], results["float32"]
    _assert_float32_state(state16)
    for leaf in jax.tree.leaves(state16.ema_params):
        assert leaf.dtype == jnp.float32
    _assert_close_losses(m16, m32, ["g_total", "d_total", "estimator", "reconstruction", "adversarial"])


@pytest.mark.parametrize(
    "get_config,validate",
    [
        (pix2pix_cityscapes.get_config, pix2pix.validate_config),
        (aging_utkface.get_config, aging.validate_config),
    ],
    ids=["pix2pix", "aging"],
)
def test_unknown_dtype_is_refused(get_config, validate):
    config = get_config("smoke")
    config.dtype = "float16"
    with pytest.raises(common.ConfigError, match="config.dtype = 'float16' is not one of"):
        validate(config)
