"""ResNet / U-Net generators against PyTorch builds of the junyanz reference modules.

The torch modules below are written from torch.nn layers following the reference
`models/networks.py` (ResnetGenerator, ResnetBlock, UnetGenerator, UnetSkipConnectionBlock), keeping its
module order (the weight copy relies on it) and its in-place activations.
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


# ---- PyTorch reference ----------------------------------------------------------------------------


def torch_norm(kind):
    if kind == "instance":
        return functools.partial(tnn.InstanceNorm2d, affine=False, track_running_stats=False)
    return functools.partial(tnn.BatchNorm2d, affine=True, track_running_stats=True)


class TorchResnetBlock(tnn.Module):
    def __init__(self, dim, norm_layer, use_dropout, use_bias):
        super().__init__()
        layers = [tnn.ReflectionPad2d(1), tnn.Conv2d(dim, dim, 3, bias=use_bias), norm_layer(dim)]
        layers += [tnn.ReLU(True)] + ([tnn.Dropout(0.5)] if use_dropout else [])
        layers += [tnn.ReflectionPad2d(1), tnn.Conv2d(dim, dim, 3, bias=use_bias), norm_layer(dim)]
        self.conv_block = tnn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv_block(x)


def torch_resnet(ngf, n_blocks=9, norm="instance", use_dropout=False, input_nc=3, output_nc=3):
    norm_layer, use_bias = torch_norm(norm), norm == "instance"
    model = [tnn.ReflectionPad2d(3), tnn.Conv2d(input_nc, ngf, 7, bias=use_bias)]
    model += [norm_layer(ngf), tnn.ReLU(True)]
    for i in range(2):
        mult = 2**i
        model += [tnn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1, bias=use_bias)]
        model += [norm_layer(ngf * mult * 2), tnn.ReLU(True)]
    model += [TorchResnetBlock(ngf * 4, norm_layer, use_dropout, use_bias) for _ in range(n_blocks)]
    for i in range(2):
        mult = 2 ** (2 - i)
        model += [
            tnn.ConvTranspose2d(
                ngf * mult, ngf * mult // 2, 3, stride=2, padding=1, output_padding=1, bias=use_bias
            )
        ]
        model += [norm_layer(ngf * mult // 2), tnn.ReLU(True)]
    model += [tnn.ReflectionPad2d(3), tnn.Conv2d(ngf, output_nc, 7), tnn.Tanh()]
    return tnn.Sequential(*model)


class TorchUnetBlock(tnn.Module):
    def __init__(
        self, outer_nc, inner_nc, input_nc=None, submodule=None, outermost=False,
        innermost=False, norm_layer=None, use_dropout=False, use_bias=False,
    ):  # fmt: skip
        super().__init__()
        self.outermost = outermost
        input_nc = outer_nc if input_nc is None else input_nc
        downconv = tnn.Conv2d(input_nc, inner_nc, 4, stride=2, padding=1, bias=use_bias)
        downrelu, uprelu = tnn.LeakyReLU(0.2, True), tnn.ReLU(True)
        if outermost:
            upconv = tnn.ConvTranspose2d(inner_nc * 2, outer_nc, 4, stride=2, padding=1)
            model = [downconv, submodule, uprelu, upconv, tnn.Tanh()]
        elif innermost:
            upconv = tnn.ConvTranspose2d(inner_nc, outer_nc, 4, 2, 1, bias=use_bias)
            model = [downrelu, downconv, uprelu, upconv, norm_layer(outer_nc)]
        else:
            upconv = tnn.ConvTranspose2d(inner_nc * 2, outer_nc, 4, 2, 1, bias=use_bias)
            model = [downrelu, downconv, norm_layer(inner_nc), submodule]
            model += [uprelu, upconv, norm_layer(outer_nc)]
            model += [tnn.Dropout(0.5)] if use_dropout else []
        self.model = tnn.Sequential(*model)

    def forward(self, x):
        if self.outermost:
            return self.model(x)
        return torch.cat([x, self.model(x)], 1)


def torch_unet(num_downs, ngf, norm="batch", use_dropout=False, input_nc=3, output_nc=3):
    kw = dict(norm_layer=torch_norm(norm), use_bias=norm == "instance")
    block = TorchUnetBlock(ngf * 8, ngf * 8, innermost=True, **kw)
    for _ in range(num_downs - 5):
        block = TorchUnetBlock(ngf * 8, ngf * 8, submodule=block, use_dropout=use_dropout, **kw)
    block = TorchUnetBlock(ngf * 4, ngf * 8, submodule=block, **kw)
    block = TorchUnetBlock(ngf * 2, ngf * 4, submodule=block, **kw)
    block = TorchUnetBlock(ngf, ngf * 2, submodule=block, **kw)
    return TorchUnetBlock(output_nc, ngf, input_nc=input_nc, submodule=block, outermost=True, **kw)


# ---- torch -> flax weight copy ------------------------------------------------------------------


def resnet_layer_names(num_blocks, norm):
    """Flax paths of the parametrised layers, in the order torch's `modules()` lists them."""
    names = ["stem_conv", "stem_norm", "down_0_conv", "down_0_norm", "down_1_conv", "down_1_norm"]
    for i in range(num_blocks):
        names += [f"block_{i}/conv_0", f"block_{i}/norm_0", f"block_{i}/conv_1", f"block_{i}/norm_1"]
    names += ["up_0_conv", "up_0_norm", "up_1_conv", "up_1_norm", "head_conv"]
    return [n for n in names if norm == "batch" or not n.endswith("norm") and "/norm" not in n]


def unet_layer_names(num_downs, norm):
    names = ["down_0_conv"]
    for i in range(1, num_downs - 1):
        names += [f"down_{i}_conv", f"down_{i}_norm"]
    names += [f"down_{num_downs - 1}_conv"]
    for i in reversed(range(1, num_downs)):
        names += [f"up_{i}_conv", f"up_{i}_norm"]
    names += ["up_0_conv"]
    return [n for n in names if norm == "batch" or not n.endswith("norm")]


def _t2n(t):
    return np.array(t.detach().cpu().numpy(), np.float32)  # a copy: torch updates stats in place


def port_torch(module, names):
    """{"params", "batch_stats"} for a Flax model from a torch module's parametrised layers.

    Conv2d weight (O, I, k, k) and ConvTranspose2d weight (I, O, k, k) both go through
    `.transpose(2, 3, 1, 0)`: to (k, k, I, O) for the conv, (k, k, O, I) for the transposed conv.
    """
    layers = [
        m for m in module.modules() if isinstance(m, tnn.Conv2d | tnn.ConvTranspose2d | tnn.BatchNorm2d)
    ]
    assert len(layers) == len(names), (len(layers), len(names))
    params, stats = {}, {}

    def put(tree, path, leaf):
        *parents, last = path.split("/")
        for p in parents:
            tree = tree.setdefault(p, {})
        tree[last] = leaf

    for m, name in zip(layers, names, strict=True):
        if isinstance(m, tnn.BatchNorm2d):
            put(params, name, {"scale": _t2n(m.weight), "bias": _t2n(m.bias)})
            put(stats, name, {"mean": _t2n(m.running_mean), "var": _t2n(m.running_var)})
        else:
            leaf = {"kernel": _t2n(m.weight).transpose(2, 3, 1, 0)}
            if m.bias is not None:
                leaf["bias"] = _t2n(m.bias)
            put(params, name, leaf)
    return {"params": params, "batch_stats": stats} if stats else {"params": params}


def assert_same_tree(a, b):
    """Same structure and leaf shapes."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.shape == y.shape


def randomize_bn_stats(module, seed=0):
    """Random affine params and running stats, so that eval-mode comparisons test all four."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, tnn.BatchNorm2d):
            c = m.num_features
            with torch.no_grad():
                m.weight.copy_(1 + 0.1 * torch.randn(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))


def images(batch, size, seed=0, channels=3):
    x = np.random.default_rng(seed).uniform(-1, 1, (batch, channels, size, size)).astype(np.float32)
    return torch.from_numpy(x), jnp.asarray(x.transpose(0, 2, 3, 1))


def nchw(y):
    return np.asarray(y).transpose(0, 3, 1, 2)


def random_variables(model, x, seed=0):
    """Variables with init's tree, filled with random numbers without compiling `model.init`."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if jax.tree_util.keystr(path).endswith("['var']"):
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), jnp.float32)
        return jnp.asarray(rng.normal(0.0, 0.1, leaf.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


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
    if arch.startswith("resnet"):
        net = torch_resnet(ngf, n_blocks=int(arch[7]))
    else:
        net = torch_unet(8 if arch == "unet_256" else 7, ngf)
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
    ],
)
def test_resnet_matches_torch(ngf, num_blocks, norm, size, impl):
    torch.manual_seed(0)
    net = torch_resnet(ngf, num_blocks, norm).eval()
    randomize_bn_stats(net)
    batch = 1 if size > 128 else 2
    xt, xj = images(batch, size)
    with torch.no_grad():
        expected = net(xt).numpy()
    model = ResnetGenerator(ngf=ngf, num_blocks=num_blocks, norm=norm, conv_impl=impl)
    variables = port_torch(net, resnet_layer_names(num_blocks, norm))
    assert_same_tree(variables, jax.eval_shape(model.init, jax.random.PRNGKey(0), xj[:1]))
    y = jax.jit(model.apply)(variables, xj)
    assert y.shape == (batch, size, size, 3) and y.dtype == jnp.float32
    np.testing.assert_allclose(nchw(y), expected, atol=1e-4, rtol=0)


def test_resnet_feature_taps():
    torch.manual_seed(1)
    net = torch_resnet(8, 9).eval()
    xt, xj = images(1, 64, seed=1)
    with torch.no_grad():
        last_block = net[:19](xt).numpy()  # pad, conv, norm, relu, 2 x (conv, norm, relu), 9 blocks
        expected = net(xt).numpy()
    model = ResnetGenerator(ngf=8)
    variables = port_torch(net, resnet_layer_names(9, "instance"))
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
    net = torch_unet(8, 8, "batch", use_dropout=True).eval()
    randomize_bn_stats(net)
    xt, xj = images(2, 256)
    with torch.no_grad():
        expected = net(xt).numpy()
    model = UnetGenerator(num_downs=8, ngf=8, norm="batch", use_dropout=True, conv_impl=impl)
    variables = port_torch(net, unet_layer_names(8, "batch"))
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
    net = torch_unet(7, 4, "batch").train()
    randomize_bn_stats(net)
    xt, xj = images(2, 128, seed=2)
    variables = port_torch(net, unet_layer_names(7, "batch"))
    with torch.no_grad():
        expected = net(xt).numpy()
    updated = port_torch(net, unet_layer_names(7, "batch"))["batch_stats"]
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
    x = images(1, 64)[1]
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
    params = {"params": {"kernel": _t2n(layer.weight).transpose(2, 3, 1, 0), "bias": _t2n(layer.bias)}}
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
    x = images(1, 16)[1]
    model = ResnetGenerator(ngf=4, num_blocks=1)
    variables = random_variables(model, x)
    y16 = jax.jit(model.clone(dtype=jnp.bfloat16).apply)(variables, x)
    assert y16.dtype == jnp.bfloat16
    assert jax.tree.leaves(variables)[0].dtype == jnp.float32
    y32 = jax.jit(model.apply)(variables, x)
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, atol=0.05)


def test_auto_conv_impl_is_fast_on_cpu():
    assert jax.default_backend() == "cpu"
    assert resolve_conv_impl("auto") == "fast"
    assert resolve_conv_impl("reference") == "reference"
    with pytest.raises(ValueError, match="conv_impl must be one of"):
        resolve_conv_impl("xla")
