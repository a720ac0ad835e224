"""Parameter and MAC counts against the published figures of the teachers and the paper's pairs."""

import jax
import jax.numpy as jnp
import pytest

from ganjax.models import costs
from ganjax.models.discriminators import PatchDiscriminator
from ganjax.models.generators import build_generator


def abstract_variables(module, size):
    return jax.eval_shape(
        module.init, jax.random.key(0), jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    )


@pytest.mark.parametrize(
    "arch, ngf, norm, params_m, gmacs",
    [
        # GAN Compression's CycleGAN horse->zebra teacher: 11.38M parameters, 56.8G MACs at 256 px.
        ("resnet_9blocks", 64, "instance", 11.378, 56.80),
        # PAPERS.md §B pairs: 64 -> 32 (2.85M), 64 -> 16 (0.72M); U-Net-256 64 -> 16 (54.4M -> 3.4M).
        ("resnet_9blocks", 32, "instance", 2.851, 14.51),
        ("resnet_9blocks", 16, "instance", 0.716, 3.78),
        ("unet_256", 64, "batch", 54.41, 18.14),
        ("unet_256", 16, "batch", 3.40, 1.22),
    ],
)
def test_generator_costs_at_256px(arch, ngf, norm, params_m, gmacs):
    gen = build_generator(arch, ngf, norm=norm)
    variables = abstract_variables(gen, 256)
    assert costs.count_params(variables["params"]) / 1e6 == pytest.approx(params_m, abs=0.006)
    assert costs.count_macs(gen, variables, (1, 256, 256, 3)) / 1e9 == pytest.approx(gmacs, abs=0.006)


def test_macs_are_per_image_times_batch_and_follow_the_convention():
    # A 1-layer PatchGAN on 16 px: three 4x4 convs, each output element x input channels x 16 taps.
    disc = PatchDiscriminator(ndf=4, num_layers=1)
    variables = abstract_variables(disc, 16)
    one = costs.count_macs(disc, variables, (1, 16, 16, 3))
    assert costs.count_macs(disc, variables, (3, 16, 16, 3)) == 3 * one
    # conv_0 (s2): 8x8x4 outputs x 3 inputs; conv_1 (s1): 7x7x8 x 4; conv_2: 6x6x1 x 8.
    assert one == 8 * 8 * 4 * 3 * 16 + 7 * 7 * 8 * 4 * 16 + 6 * 6 * 1 * 8 * 16
    assert costs.describe(11_378_179, 56_800_000_000) == "11.38M params, 56.80G MACs"
