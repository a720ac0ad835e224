"""ResNet / U-Net generators against PyTorch builds of the junyanz reference modules.

The torch modules are `ganjax.interop.torch_reference` (torch.nn layers following the reference
`models/networks.py`, with its state_dict key names and in-place activations); weights are copied through
their state_dicts with `ganjax.interop.torch`, the same path users' checkpoints take.
"""

import functools

import flax.errors
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ganjax.models.generators import (
    GENERATOR_ARCHS,
    ResnetGenerator,
    UnetGenerator,
    build_generator,
)
from ganjax.models.layers import Conv2d, ConvTranspose2d, resolve_conv_impl

torch = pytest.importorskip("torch")
tnn = torch.nn

# The PyTorch builds of the reference networks and the state_dict conversion under test live in the library
# (benchmarks/parity.py uses them too).
from ganjax.interop import torch_reference as tr  # noqa: E402
from ganjax.interop.parity import images, nchw, random_variables, state_dict_arrays  # noqa: E402
from ganjax.interop.torch import generator_table, variables_from_state_dict  # noqa: E402


def port(net, arch, ngf, norm, dropout=False):
    """Flax variables of a torch reference generator, through its state_dict (the reference's key names)."""
    _, table = generator_table(arch, ngf, norm, dropout=dropout)
    return variables_from_state_dict(state_dict_arrays(net), table)


def assert_same_tree(a, b):
    """Same structure and leaf shapes."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.shape == y.shape


def num_params(model, size):
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
    return sum(x.size for x in jax.tree.leaves(variables["params"]))


# ---- parameter counts ---------------------------------------------------------------------------

# Counted like PyTorch's sum(p.numel() for p in net.parameters()): BatchNorm's affine parameters count,
# its running statistics do not. Each number is also checked against the torch build below.
REFERENCE_COUNTS = [
    ("resnet_9blocks", 64, 11_378_179),
    ("resnet_9blocks", 32, 2_850_563),
    ("resnet_9blocks", 16, 715_651),
    ("resnet_6blocks", 64, 7_837_699),
    ("unet_256", 64, 54_413_955),
    ("unet_256", 16, 3_404_451),
    ("unet_128", 64, 41_828_995),
]


@pytest.mark.parametrize("arch,ngf,expected", REFERENCE_COUNTS)
def test_parameter_counts_match_reference(arch, ngf, expected):
    size = 128 if arch == "unet_128" else 256
    assert num_params(build_generator(arch, ngf), size) == expected
    net = tr.build_generator(arch, ngf, norm="instance" if arch.startswith("resnet") else "batch")
    assert sum(p.numel() for p in net.parameters()) == expected


@pytest.mark.parametrize("arch", GENERATOR_ARCHS)
def test_both_conv_impls_have_the_same_variables(arch):
    size = 128 if arch == "unet_128" else 256
    x = jnp.zeros((1, size, size, 3))

    def variables(impl):
        return jax.eval_shape(build_generator(arch, 8, conv_impl=impl).init, jax.random.PRNGKey(0), x)

    assert_same_tree(variables("reference"), variables("fast"))


def test_build_generator_rejects_unknown_arch():
    with pytest.raises(ValueError, match="unknown generator arch"):
        build_generator("resnet_12blocks", 64)


# ---- outputs against PyTorch --------------------------------------------------------------------


@pytest.mark.parametrize(
    "ngf,num_blocks,norm,size,impl",
    [
        *[(16, 9, "instance", 64, impl) for impl in ("reference", "fast")],
        *[(32, 6, "instance", 128, impl) for impl in ("reference", "fast")],
        *[(8, 9, "batch", 64, impl) for impl in ("reference", "fast")],
        (16, 9, "instance", 256, "fast"),  # full resolution: 64x64 residual blocks
        (16, 9, "instance", 256, "winograd"),  # ... whose 64-channel convs take the Winograd passes
    ],
)
def test_resnet_matches_torch(ngf, num_blocks, norm, size, impl):
    torch.manual_seed(0)
    net = tr.randomize_batch_norm(tr.ResnetGenerator(3, 3, ngf, norm, n_blocks=num_blocks).eval())
    batch = 1 if size > 128 else 2
    xt, xj = images(batch, 3, size)
    with torch.no_grad():
        expected = net(xt).numpy()
    model = ResnetGenerator(ngf=ngf, num_blocks=num_blocks, norm=norm, conv_impl=impl)
    variables = port(net, f"resnet_{num_blocks}blocks", ngf, norm)
    assert_same_tree(variables, jax.eval_shape(model.init, jax.random.PRNGKey(0), xj[:1]))
    y = jax.jit(model.apply)(variables, xj)
    assert y.shape == (batch, size, size, 3) and y.dtype == jnp.float32
    np.testing.assert_allclose(nchw(y), expected, atol=1e-4, rtol=0)


def test_resnet_feature_taps():
    torch.manual_seed(1)
    net = tr.ResnetGenerator(3, 3, 8, "instance", n_blocks=9).eval()
    xt, xj = images(1, 3, 64, seed=1)
    with torch.no_grad():
        last_block = net.model[:19](xt).numpy()  # pad, conv, norm, relu, 2 x (conv, norm, relu), 9 blocks
        expected = net(xt).numpy()
    model = ResnetGenerator(ngf=8)
    variables = port(net, "resnet_9blocks", 8, "instance")
    names = ("bottleneck", "block_8", "stem", "down_1", "up_0")
    y, feats = jax.jit(functools.partial(model.apply, return_features=names))(variables, xj)
    np.testing.assert_allclose(nchw(y), expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(nchw(feats["block_8"]), last_block, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(feats["bottleneck"], feats["block_8"])
    shapes = {k: v.shape for k, v in feats.items()}
    assert shapes == {
        "bottleneck": (1, 16, 16, 32),
        "block_8": (1, 16, 16, 32),
        "stem": (1, 64, 64, 8),
        "down_1": (1, 16, 16, 32),
        "up_0": (1, 32, 32, 16),
    }
    with pytest.raises(ValueError, match="unknown feature"):
        jax.eval_shape(functools.partial(model.apply, return_features=("block_9",)), variables, xj)


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_unet_256_matches_torch_in_eval_mode(impl):
    torch.manual_seed(0)
    net = tr.randomize_batch_norm(tr.UnetGenerator(3, 3, 8, 8, "batch", use_dropout=True).eval())
    xt, xj = images(2, 3, 256)
    with torch.no_grad():
        expected = net(xt).numpy()
    model = UnetGenerator(num_downs=8, ngf=8, norm="batch", use_dropout=True, conv_impl=impl)
    variables = port(net, "unet_256", 8, "batch")
    assert_same_tree(variables, jax.eval_shape(model.init, jax.random.PRNGKey(0), xj[:1]))
    y, feats = jax.jit(functools.partial(model.apply, return_features=("bottleneck", "down_3")))(
        variables, xj
    )
    np.testing.assert_allclose(nchw(y), expected, atol=1e-4, rtol=0)
    assert feats["bottleneck"].shape == (2, 1, 1, 64)
    assert feats["down_3"].shape == (2, 16, 16, 64)


def test_unet_train_mode_batch_statistics_match_torch():
    """Batch statistics in the forward pass and PyTorch's running-stat update (unbiased variance)."""
    torch.manual_seed(2)
    net = tr.randomize_batch_norm(tr.UnetGenerator(3, 3, 7, 4, "batch").train())
    xt, xj = images(2, 3, 128, seed=2)
    variables = port(net, "unet_128", 4, "batch")
    with torch.no_grad():
        expected = net(xt).numpy()
    updated = port(net, "unet_128", 4, "batch")["batch_stats"]
    model = UnetGenerator(num_downs=7, ngf=4, norm="batch")
    y, new_vars = jax.jit(
        functools.partial(model.apply, train=True, mutable=["batch_stats"]),
    )(variables, xj)
    np.testing.assert_allclose(nchw(y), expected, atol=1e-4, rtol=0)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
        new_vars["batch_stats"],
        updated,
    )


def test_unet_dropout_uses_the_dropout_rng():
    model = UnetGenerator(num_downs=6, ngf=2, use_dropout=True)
    x = images(1, 3, 64)[1]
    variables = random_variables(model, x)

    @jax.jit
    def run(seed):
        rngs = {"dropout": jax.random.PRNGKey(seed)}
        return model.apply(variables, x, train=True, mutable=["batch_stats"], rngs=rngs)[0]

    assert not np.allclose(run(0), run(1))
    np.testing.assert_array_equal(run(0), run(0))
    with pytest.raises(flax.errors.InvalidRngError):
        jax.eval_shape(functools.partial(model.apply, train=True, mutable=["batch_stats"]), variables, x)


# ---- the fast conv formulations -----------------------------------------------------------------


@pytest.mark.parametrize(
    "k,s,p,op,h,w",
    [
        (3, 2, 1, 1, 8, 8),  # ResNet up-sampling
        (4, 2, 1, 0, 8, 6),  # U-Net up-sampling
        (4, 2, 1, 0, 1, 1),  # U-Net innermost level
        (5, 2, 2, 1, 7, 5),
        (3, 3, 1, 2, 4, 5),
        (6, 3, 1, 1, 3, 4),  # output size not a multiple of the stride
    ],
)
@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_conv_transpose_matches_torch(k, s, p, op, h, w, impl):
    torch.manual_seed(0)
    layer = tnn.ConvTranspose2d(5, 7, k, s, p, op)
    x = torch.randn(2, 5, h, w)
    with torch.no_grad():
        expected = layer(x).numpy()
    weight, bias = (np.array(t.detach().numpy()) for t in (layer.weight, layer.bias))
    params = {"params": {"kernel": weight.transpose(2, 3, 1, 0), "bias": bias}}
    y = ConvTranspose2d(7, k, s, p, op, impl=impl).apply(params, jnp.asarray(x.numpy()).transpose(0, 2, 3, 1))
    np.testing.assert_allclose(nchw(y), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "layer,in_channels",
    [
        (Conv2d(6, 3, padding=1, padding_mode="reflect"), 5),  # ResNet block conv
        (Conv2d(6, 7, padding=3, padding_mode="reflect"), 5),  # ResNet stem / head conv
        (ConvTranspose2d(6, 3, stride=2, padding=1, output_padding=1), 5),  # ResNet up-sampling
        (ConvTranspose2d(6, 4, stride=2, padding=1), 5),  # U-Net up-sampling
    ],
    ids=["reflect3", "reflect7", "convT3", "convT4"],
)
def test_fast_and_reference_layers_have_the_same_gradients(layer, in_channels):
    """The two implementations differ only in these layers; everything else is shared code."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 9, 8, in_channels)), jnp.float32)
    variables = random_variables(layer, x)

    def loss_and_grads(impl):
        def loss(variables, x):
            y = layer.clone(impl=impl).apply(variables, x)
            return jnp.sum(jnp.sin(y))  # a non-trivial cotangent

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(variables, x)

    (l_ref, g_ref), (l_fast, g_fast) = loss_and_grads("reference"), loss_and_grads("fast")
    np.testing.assert_allclose(l_fast, l_ref, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g_fast, g_ref)


def test_bfloat16_compute():
    x = images(1, 3, 16)[1]
    model = ResnetGenerator(ngf=4, num_blocks=1)
    variables = random_variables(model, x)
    y16, feats = jax.jit(functools.partial(model.clone(dtype=jnp.bfloat16).apply, return_features=("stem",)))(
        variables, x
    )
    assert y16.dtype == jnp.float32  # the image leaves in float32 (tanh in float32) ...
    assert feats["stem"].dtype == jnp.bfloat16  # ... the activations are bfloat16
    assert jax.tree.leaves(variables)[0].dtype == jnp.float32
    y32 = jax.jit(model.apply)(variables, x)
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, atol=0.05)


def test_auto_conv_impl_is_winograd_on_cpu():
    assert jax.default_backend() == "cpu"
    assert resolve_conv_impl("auto") == "winograd"
    assert resolve_conv_impl("reference") == "reference"
    with pytest.raises(ValueError, match="conv_impl must be one of"):
        resolve_conv_impl("xla")
