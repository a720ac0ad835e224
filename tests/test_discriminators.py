"""PatchGAN discriminator against a PyTorch build of the junyanz reference `NLayerDiscriminator`
(`ganjax.interop.torch_reference`), weights copied through its state_dict by `ganjax.interop.torch`."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ganjax.models.discriminators import PatchDiscriminator

torch = pytest.importorskip("torch")

# The PyTorch `NLayerDiscriminator` and the state_dict conversion under test live in the library.
from ganjax.interop.parity import images, nchw, state_dict_arrays  # noqa: E402
from ganjax.interop.torch import discriminator_table, variables_from_state_dict  # noqa: E402
from ganjax.interop.torch_reference import NLayerDiscriminator, randomize_batch_norm  # noqa: E402


def port(net, input_nc=3):
    """Flax variables of a torch NLayerDiscriminator, through its state_dict (the reference's key names)."""
    ndf, n_layers = net.model[0].out_channels, (len(net.model) - 2) // 3
    norm = "batch" if isinstance(net.model[3], torch.nn.BatchNorm2d) else "instance"
    _, table = discriminator_table(ndf, n_layers, norm, input_nc=input_nc)
    return variables_from_state_dict(state_dict_arrays(net), table)


def init_shapes(model, size=64, **kw):
    return jax.eval_shape(
        functools.partial(model.init, **kw), jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))
    )


def count(tree):
    return sum(x.size for x in jax.tree.leaves(tree))


def assert_same_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.shape == y.shape


@pytest.mark.parametrize(
    "ndf,num_layers,norm,expected",
    [
        (64, 3, "instance", 2_764_737),
        (64, 3, "batch", 2_765_633),  # no conv biases before BN, plus BN scale/bias
        (32, 5, "instance", 2_791_905),
        (16, 1, "instance", 9_521),
    ],
)
def test_parameter_counts_match_reference(ndf, num_layers, norm, expected):
    model = PatchDiscriminator(ndf=ndf, num_layers=num_layers, norm=norm)
    net = NLayerDiscriminator(3, ndf, num_layers, norm)
    assert sum(p.numel() for p in net.parameters()) == expected
    assert count(init_shapes(model, size=128)["params"]) == expected
    assert_same_tree(port(net), init_shapes(model, size=128))


@pytest.mark.parametrize(
    "ndf,num_layers,norm,size",
    [(64, 3, "instance", 70), (16, 3, "batch", 64), (8, 4, "instance", 96), (16, 1, "batch", 32)],
)
def test_matches_torch_in_eval_mode(ndf, num_layers, norm, size):
    torch.manual_seed(0)
    net = randomize_batch_norm(NLayerDiscriminator(3, ndf, num_layers, norm).eval())
    xt, xj = images(2, 3, size)
    with torch.no_grad():
        expected = net(xt).numpy()
    model = PatchDiscriminator(ndf=ndf, num_layers=num_layers, norm=norm)
    y = jax.jit(model.apply)(port(net), xj)
    assert y.shape == expected.shape[:1] + expected.shape[2:] + (1,)
    np.testing.assert_allclose(nchw(y), expected, atol=1e-4, rtol=0)


def test_70x70_patchgan_output_size_at_256px():
    shape = jax.eval_shape(
        PatchDiscriminator().apply, init_shapes(PatchDiscriminator()), jnp.zeros((2, 256, 256, 3))
    ).shape
    assert shape == (2, 30, 30, 1)


def test_batch_norm_train_mode_matches_torch():
    torch.manual_seed(1)
    net = randomize_batch_norm(NLayerDiscriminator(3, 8, 3, "batch").train(), seed=1)
    xt, xj = images(3, 3, 64, seed=1)
    variables = port(net)
    with torch.no_grad():
        expected = net(xt).numpy()
    model = PatchDiscriminator(ndf=8, norm="batch")
    y, new = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(variables, xj)
    np.testing.assert_allclose(nchw(y), expected, atol=1e-4, rtol=0)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
        new["batch_stats"],
        port(net)["batch_stats"],
    )


# ---- projection conditioning --------------------------------------------------------------------


def test_projection_only_adds_its_kernel_to_the_tree():
    plain = init_shapes(PatchDiscriminator(ndf=8))
    cond = init_shapes(PatchDiscriminator(ndf=8, conditioning_dim=5), condition=jnp.zeros((1, 5)))
    extra = cond["params"].pop("projection")
    assert extra == {"kernel": jax.ShapeDtypeStruct((4, 4, 64, 5), jnp.float32)}
    assert_same_tree(plain, cond)


def test_projection_term():
    """logits(x, y) = logits(x) + <window of h, sum_k y_k V_k>, with each logit's 4x4 window of h."""
    model = PatchDiscriminator(ndf=8, conditioning_dim=4)
    x = images(2, 3, 64, seed=2)[1]
    y = jnp.asarray([[0.0, 0.3, 0.7, 0.0], [1.0, 0.0, 0.0, 0.5]])
    rng = np.random.default_rng(0)
    variables = jax.tree.map(  # random weights without compiling init
        lambda s: jnp.asarray(rng.normal(0, 0.1, s.shape), jnp.float32),
        init_shapes(model, condition=jnp.zeros((1, 4))),
    )
    params = dict(variables["params"])
    v = np.asarray(params.pop("projection")["kernel"])  # (4, 4, C, K)

    # The unconditional network with the same weights, and its penultimate feature map h.
    base, feats = jax.jit(
        functools.partial(
            PatchDiscriminator(ndf=8).apply, capture_intermediates=True, mutable=["intermediates"]
        )
    )({"params": params}, x)
    h = np.asarray(jax.nn.leaky_relu(feats["intermediates"]["norm_3"]["__call__"][0], 0.2))
    h = np.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)))  # (B, 9, 9, C): the last conv's zero padding
    kernels = np.einsum("hwck,bk->bhwc", v, np.asarray(y))  # per-sample 4x4xC kernels
    manual = np.zeros((2, 6, 6, 1), np.float32)
    for i in range(6):
        for j in range(6):
            manual[:, i, j, 0] = np.einsum("bhwc,bhwc->b", h[:, i : i + 4, j : j + 4], kernels)

    apply = jax.jit(model.apply)
    logits = apply(variables, x, y)
    np.testing.assert_allclose(logits - base, manual, atol=1e-5)
    np.testing.assert_allclose(apply(variables, x, jnp.zeros_like(y)), base, atol=1e-6)
    assert float(np.abs(manual).max()) > 1e-2


def test_condition_must_match_conditioning_dim():
    x = jnp.zeros((2, 64, 64, 3))
    with pytest.raises(ValueError, match="condition must be given"):
        init_shapes(PatchDiscriminator(ndf=8, conditioning_dim=3))
    with pytest.raises(ValueError, match="condition must be given"):
        init_shapes(PatchDiscriminator(ndf=8), condition=jnp.zeros((1, 3)))
    model = PatchDiscriminator(ndf=8, conditioning_dim=3)
    with pytest.raises(ValueError, match=r"condition must be \(B, 3\)"):
        jax.eval_shape(functools.partial(model.init, condition=jnp.zeros((2, 4))), jax.random.key(0), x)
