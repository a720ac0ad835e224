"""PyTorch builds of the junyanz/pytorch-CycleGAN-and-pix2pix networks, for parity tests and benchmarks.

Written from `torch.nn` layers following the reference `models/networks.py` (ResnetGenerator, ResnetBlock,
UnetGenerator, UnetSkipConnectionBlock, NLayerDiscriminator): the same layers in the same order, inside the
same attribute names (`model`, `conv_block`), so that `state_dict()` has the reference's keys, e.g.

  ResnetGenerator      model.1.weight (stem conv), model.10.conv_block.1.weight (block 0, first conv), ...
  UnetGenerator        model.model.0.weight (outermost down conv), model.model.1.model.1.weight, ...
  NLayerDiscriminator  model.0.weight, model.2.weight, model.3.weight (first norm), ..., model.11.weight

and files saved from them load into the reference classes (and vice versa). Activations are in-place where
the reference's are (this matters for the U-Net skip connections, see ganjax.models.generators).
Tensors are NCHW float32. `norm` is a string ("batch" or "instance") instead of the reference's
`norm_layer` factory: "batch" = BatchNorm2d(affine, running stats), "instance" = InstanceNorm2d(no affine,
no running stats), and convs followed by a norm have a bias only with "instance", as in the reference.

Needs torch (the [test] extra).
"""

from __future__ import annotations

import functools

try:
    import torch
    from torch import nn
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "ganjax.interop.torch_reference needs PyTorch: pip install torch (or pip install -e '.[test]')."
    ) from e

GENERATOR_ARCHS = ("resnet_9blocks", "resnet_6blocks", "unet_256", "unet_128")


def norm_factory(norm: str):
    """The reference's `get_norm_layer(norm)`: channels -> norm module."""
    if norm == "instance":
        return functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)
    if norm == "batch":
        return functools.partial(nn.BatchNorm2d, affine=True, track_running_stats=True)
    raise ValueError(f"norm must be 'batch' or 'instance', got {norm!r}")


class ResnetBlock(nn.Module):
    """x + conv_block(x); conv_block = [pad, conv3, norm, ReLU, (Dropout), pad, conv3, norm]."""

    def __init__(self, dim: int, norm: str, use_dropout: bool):
        super().__init__()
        norm_layer, use_bias = norm_factory(norm), norm == "instance"
        layers = [
            nn.ReflectionPad2d(1),
            nn.Conv2d(dim, dim, 3, bias=use_bias),
            norm_layer(dim),
            nn.ReLU(True),
        ]
        # The dropout shifts the second conv from conv_block.5 to conv_block.6 in the state_dict.
        layers += [nn.Dropout(0.5)] if use_dropout else []
        layers += [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=use_bias), norm_layer(dim)]
        self.conv_block = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv_block(x)


class ResnetGenerator(nn.Module):
    """CycleGAN's ResNet generator: `model` = [pad, conv7, norm, ReLU, 2 x (conv3 s2, norm, ReLU),
    n_blocks x ResnetBlock, 2 x (conv-transpose3 s2, norm, ReLU), pad, conv7, tanh]."""

    def __init__(self, input_nc=3, output_nc=3, ngf=64, norm="batch", use_dropout=False, n_blocks=6):
        super().__init__()
        norm_layer, use_bias = norm_factory(norm), norm == "instance"
        model = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(input_nc, ngf, 7, bias=use_bias),
            norm_layer(ngf),
            nn.ReLU(True),
        ]
        for i in range(2):
            mult = 2**i
            model += [
                nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1, bias=use_bias),
                norm_layer(ngf * mult * 2),
                nn.ReLU(True),
            ]
        model += [ResnetBlock(ngf * 4, norm, use_dropout) for _ in range(n_blocks)]
        for i in range(2):
            mult = 2 ** (2 - i)
            model += [
                nn.ConvTranspose2d(
                    ngf * mult, ngf * mult // 2, 3, stride=2, padding=1, output_padding=1, bias=use_bias
                ),
                norm_layer(ngf * mult // 2),
                nn.ReLU(True),
            ]
        model += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, 7), nn.Tanh()]
        self.model = nn.Sequential(*model)

    def forward(self, x):
        return self.model(x)


class UnetSkipConnectionBlock(nn.Module):
    """One U-Net level: `model` = [LeakyReLU, down conv4 s2, norm, submodule, ReLU, up conv-transpose4 s2,
    norm, (Dropout)] with the input concatenated to the output; the outermost level has no LeakyReLU or
    norms and ends with tanh, the innermost has no down norm and no submodule."""

    def __init__(
        self,
        outer_nc,
        inner_nc,
        input_nc=None,
        submodule=None,
        outermost=False,
        innermost=False,
        norm="batch",
        use_dropout=False,
    ):
        super().__init__()
        self.outermost = outermost
        norm_layer, use_bias = norm_factory(norm), norm == "instance"
        input_nc = outer_nc if input_nc is None else input_nc
        down = nn.Conv2d(input_nc, inner_nc, 4, stride=2, padding=1, bias=use_bias)
        if outermost:
            up = nn.ConvTranspose2d(inner_nc * 2, outer_nc, 4, stride=2, padding=1)
            model = [down, submodule, nn.ReLU(True), up, nn.Tanh()]
        elif innermost:
            up = nn.ConvTranspose2d(inner_nc, outer_nc, 4, stride=2, padding=1, bias=use_bias)
            model = [nn.LeakyReLU(0.2, True), down, nn.ReLU(True), up, norm_layer(outer_nc)]
        else:
            up = nn.ConvTranspose2d(inner_nc * 2, outer_nc, 4, stride=2, padding=1, bias=use_bias)
            model = [nn.LeakyReLU(0.2, True), down, norm_layer(inner_nc), submodule]
            model += [nn.ReLU(True), up, norm_layer(outer_nc)]
            model += [nn.Dropout(0.5)] if use_dropout else []
        self.model = nn.Sequential(*model)

    def forward(self, x):
        if self.outermost:
            return self.model(x)
        return torch.cat([x, self.model(x)], 1)


class UnetGenerator(nn.Module):
    """pix2pix's U-Net: `model` = the outermost UnetSkipConnectionBlock; num_downs levels."""

    def __init__(self, input_nc=3, output_nc=3, num_downs=8, ngf=64, norm="batch", use_dropout=False):
        super().__init__()
        block = UnetSkipConnectionBlock(ngf * 8, ngf * 8, innermost=True, norm=norm)
        for _ in range(num_downs - 5):
            block = UnetSkipConnectionBlock(
                ngf * 8, ngf * 8, submodule=block, norm=norm, use_dropout=use_dropout
            )
        block = UnetSkipConnectionBlock(ngf * 4, ngf * 8, submodule=block, norm=norm)
        block = UnetSkipConnectionBlock(ngf * 2, ngf * 4, submodule=block, norm=norm)
        block = UnetSkipConnectionBlock(ngf, ngf * 2, submodule=block, norm=norm)
        self.model = UnetSkipConnectionBlock(
            output_nc, ngf, input_nc=input_nc, submodule=block, outermost=True, norm=norm
        )

    def forward(self, x):
        return self.model(x)


class NLayerDiscriminator(nn.Module):
    """The PatchGAN: `model` = [conv4 s2, LeakyReLU, (n_layers - 1) x (conv4 s2, norm, LeakyReLU),
    conv4 s1, norm, LeakyReLU, conv4 s1 (1 channel)]; raw logits."""

    def __init__(self, input_nc=3, ndf=64, n_layers=3, norm="batch"):
        super().__init__()
        norm_layer, use_bias = norm_factory(norm), norm == "instance"
        seq = [nn.Conv2d(input_nc, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            seq += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=use_bias),
                norm_layer(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        seq += [nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1)]
        self.model = nn.Sequential(*seq)

    def forward(self, x):
        return self.model(x)


def build_generator(
    arch: str, ngf: int = 64, norm: str = "batch", use_dropout: bool = False, input_nc=3, output_nc=3
):
    """The reference's `define_G(input_nc, output_nc, ngf, arch, norm, use_dropout)` without weight init
    (torch's default init; call `init_weights` for the reference's N(0, 0.02))."""
    if arch in ("resnet_9blocks", "resnet_6blocks"):
        n_blocks = 9 if arch == "resnet_9blocks" else 6
        return ResnetGenerator(input_nc, output_nc, ngf, norm, use_dropout, n_blocks)
    if arch in ("unet_256", "unet_128"):
        num_downs = 8 if arch == "unet_256" else 7
        return UnetGenerator(input_nc, output_nc, num_downs, ngf, norm, use_dropout)
    raise ValueError(f"unknown generator arch {arch!r}; choose one of {GENERATOR_ARCHS}")


def init_weights(net: nn.Module, gain: float = 0.02, seed: int | None = None) -> nn.Module:
    """The reference's `init_weights(net, "normal", gain)`: conv weights N(0, gain), biases 0, BatchNorm
    weight N(1, gain), bias 0. Returns `net`."""
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
                m.weight.copy_(gain * torch.randn(m.weight.shape, generator=gen))
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + gain * torch.randn(m.weight.shape, generator=gen))
                m.bias.zero_()
    return net


def randomize_batch_norm(net: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm affine parameters and running statistics (mean ~0.1 N(0, 1), var in [0.5, 1.5]),
    so that eval-mode comparisons exercise all four tensors. Returns `net`."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(1 + 0.1 * torch.randn(c, generator=gen))
                m.bias.copy_(0.1 * torch.randn(c, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
    return net
