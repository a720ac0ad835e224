"""Matching train steps in ganjax (one jitted function) and PyTorch (the reference's eager code), for
benchmarks/run.py.

Every builder returns a `Case`: the ganjax step and, where a PyTorch reference exists, the PyTorch step of
the same networks with the same weights (the PyTorch build of the reference network, converted to Flax
through its state_dict, as in ganjax.interop.parity) on the same input batch (uniform in [-1, 1]).

  pix2pix_case   `ganjax.trainers.pix2pix.train_step` (one D update, then one G update: G forward once,
                 D forward three times) vs `ganjax.interop.parity.torch_pix2pix_step`, the reference's
                 `Pix2PixModel.optimize_parameters` written out. Conditional PatchGAN with batch norm.
  distill_case   the same step with a frozen teacher: teacher forward + student pix2pix step + the KD L1
                 and SRPKD relation losses at the ResNet's bottleneck (ganjax: the fused relation loss);
                 PyTorch: teacher forward under no_grad, the student step with the same extra G loss and
                 a literal dense relation loss (two N x N matrices).
  aging_case     `ganjax.trainers.aging.train_step` only: there is no PyTorch build of the aging model.

`Step.run()` performs one step and blocks until its results exist (jax: `block_until_ready` on the new
state; PyTorch on CPU is synchronous). ganjax steps donate their state, as the trainers do.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ganjax.interop import parity
from ganjax.interop import torch as torch_io
from ganjax.models import costs
from ganjax.trainers import distillation, pix2pix

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class Step:
    """One framework's step: `run()` does a step and waits for it."""

    framework: str  # "jax" or "torch"
    run: Callable[[], None]
    compile_s: float | None = None  # jax: lower + compile (the first call's extra time is not in it)
    xla_flops: float | None = None  # XLA's cost_analysis of the compiled step
    memory: dict | None = None  # XLA's compiled memory analysis (bytes)
    compiled: object | None = None  # the jax Compiled, for HLO dumps
    lowered: object | None = None


@dataclasses.dataclass
class Case:
    """A benchmark row: the ganjax step, the PyTorch step (or None) and what they compute."""

    name: str
    kind: str  # "pix2pix", "distill", "aging"
    settings: dict
    jax: Step
    torch: Step | None
    model_flops: float | None  # 2 x MACs of the convolutions a step runs (see `pix2pix_model_flops`)
    images_per_step: int
    notes: list[str] = dataclasses.field(default_factory=list)


def _memory(compiled) -> dict | None:
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes")
    out = {k: int(getattr(mem, k)) for k in keys}
    peak = getattr(mem, "peak_memory_in_bytes", None)
    if peak:
        out["peak_memory_in_bytes"] = int(peak)
    return out


def _flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older jax: one dict per computation
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def jax_step(fn: Callable, state, *args) -> Step:
    """`fn(state, *args) -> (state, metrics)` jitted with the state donated; compiled now (timed)."""
    jitted = jax.jit(fn, donate_argnums=0)
    t0 = time.perf_counter()
    lowered = jitted.lower(state, *args)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    holder = [state]

    def run():
        new_state, metrics = compiled(holder[0], *args)
        holder[0] = new_state
        jax.block_until_ready((new_state, metrics))

    return Step("jax", run, compile_s, _flops(compiled), _memory(compiled), compiled, lowered)


# ---- pix2pix -------------------------------------------------------------------------------------


def pix2pix_model_flops(gen, g_vars, disc, d_vars, size: int, batch: int, teacher=None, t_vars=None) -> float:
    """Useful FLOPs of one pix2pix step: 2 x MACs (ganjax.models.costs, convolutions only) x passes.

    G: forward + input gradient + kernel gradient = 3 passes. D: three forwards (fake for D, real, fake
    for G), kernel gradients of the two D-loss forwards, the input gradient of the G-loss forward = 6.
    A frozen teacher adds one forward. `costs` counts a transposed conv at every output pixel
    (torchprofile's convention), stride^2 = 4x its multiplies: the U-Nets' FLOPs are overstated.
    """
    g = costs.count_macs(gen, g_vars, (batch, size, size, 3))
    d = costs.count_macs(disc, d_vars, (batch, size, size, 6))
    t = costs.count_macs(teacher, t_vars, (batch, size, size, 3)) if teacher is not None else 0
    return 2.0 * (3 * g + 6 * d + t)


def _reference_nets(arch, ngf, ndf, seed):
    net_g = parity.reference_generator(arch, ngf, seed=seed).train()
    net_d = parity.reference_discriminator(ndf, 3, "batch", input_nc=6, seed=seed + 1).train()
    return net_g, net_d


def _flax_nets(arch, ngf, ndf, net_g, net_d, conv_impl, dtype):
    gen, g_table = torch_io.generator_table(arch, ngf)
    disc, d_table = torch_io.discriminator_table(ndf, 3, "batch", input_nc=6)
    gen = gen.clone(conv_impl=conv_impl, dtype=DTYPES[dtype])
    disc = disc.clone(conv_impl=conv_impl, dtype=DTYPES[dtype])
    g_vars = torch_io.variables_from_state_dict(parity.state_dict_arrays(net_g), g_table)
    d_vars = torch_io.variables_from_state_dict(parity.state_dict_arrays(net_d), d_table)
    return gen, g_vars, disc, d_vars


def _state(g_vars, d_vars, tx) -> pix2pix.Pix2PixState:
    return pix2pix.Pix2PixState(
        step=jnp.zeros((), jnp.int32),
        g_params=g_vars["params"],
        g_batch_stats=g_vars.get("batch_stats", {}),
        d_params=d_vars["params"],
        d_batch_stats=d_vars.get("batch_stats", {}),
        g_opt_state=tx.init(g_vars["params"]),
        d_opt_state=tx.init(d_vars["params"]),
    )


def _torch_runner(step: Callable[[], None], device: str) -> Callable[[], None]:
    """`step` followed by a device sync (CUDA runs asynchronously; the CPU does not)."""
    if device == "cpu":
        return step
    torch = parity.torch

    def run():
        step()
        torch.cuda.synchronize()

    return run


def _torch_optimizers(net_g, net_d):
    torch = parity.torch
    return (
        torch.optim.Adam(net_g.parameters(), lr=parity.LEARNING_RATE, betas=parity.BETAS),
        torch.optim.Adam(net_d.parameters(), lr=parity.LEARNING_RATE, betas=parity.BETAS),
    )


def pix2pix_case(
    arch: str,
    ngf: int,
    *,
    ndf: int = 64,
    size: int = 256,
    batch: int = 1,
    dtype: str = "float32",
    conv_impl: str = "auto",
    with_torch: bool = True,
    torch_device: str = "cpu",
    seed: int = 0,
) -> Case:
    """One pix2pix G+D step of `arch` at width ngf against the PatchGAN (ndf, batch norm, 6 channels)."""
    net_g, net_d = _reference_nets(arch, ngf, ndf, seed)
    gen, g_vars, disc, d_vars = _flax_nets(arch, ngf, ndf, net_g, net_d, conv_impl, dtype)
    a_t, a_j = parity.images(batch, 3, size, seed + 2)
    b_t, b_j = parity.images(batch, 3, size, seed + 3)
    tx = optax.adam(parity.LEARNING_RATE, b1=parity.BETAS[0], b2=parity.BETAS[1])
    step = functools.partial(
        pix2pix.train_step,
        gen=gen,
        disc=disc,
        teacher=None,
        g_tx=tx,
        d_tx=tx,
        schedule=optax.constant_schedule(parity.LEARNING_RATE),
        settings=pix2pix.StepSettings(seed=seed, adversarial="vanilla", l1_weight=parity.L1_WEIGHT),
    )
    flops = pix2pix_model_flops(gen, g_vars, disc, d_vars, size, batch)
    jax_side = jax_step(step, _state(g_vars, d_vars, tx), {"a": a_j, "b": b_j}, {})
    torch_side = None
    if with_torch:
        net_g, net_d = net_g.to(torch_device), net_d.to(torch_device)
        a_t, b_t = a_t.to(torch_device), b_t.to(torch_device)
        opt_g, opt_d = _torch_optimizers(net_g, net_d)
        step_torch = functools.partial(parity.torch_pix2pix_step, net_g, net_d, opt_g, opt_d, a_t, b_t)
        torch_side = Step("torch", _torch_runner(step_torch, torch_device))
    settings = dict(arch=arch, ngf=ngf, ndf=ndf, size=size, batch=batch, dtype=dtype, conv_impl=conv_impl)
    name = f"pix2pix {arch} ngf{ngf}" + (f" {dtype}" if dtype != "float32" else "")
    return Case(name, "pix2pix", settings, jax_side, torch_side, flops, batch)


# ---- Distillation --------------------------------------------------------------------------------

RELATION_LAYER = "bottleneck"  # the ResNet's last residual block (64 x 64 at 256 px), as configs use


def torch_relation_loss(teacher_features, student_features):
    """The SRPKD loss written literally: A = Q Q^T per image (N x N), rows L2-normalised
    (F.normalize), mean over the batch of ||A~_T - A~_S||_F^2 / N^2. NCHW features."""
    torch = parity.torch

    def relation(f):
        q = f.flatten(2).transpose(1, 2)  # (B, N, C)
        return torch.nn.functional.normalize(q @ q.transpose(1, 2), dim=-1)

    n = teacher_features.shape[2] * teacher_features.shape[3]
    diff = relation(teacher_features) - relation(student_features)
    return diff.square().sum(dim=(1, 2)).mean() / (n * n)


def _bottleneck_module(net, arch):
    if not arch.startswith("resnet"):
        raise ValueError(f"the distillation benchmark taps the ResNet bottleneck; got {arch!r}")
    blocks = [m for m in net.model if m.__class__.__name__ == "ResnetBlock"]
    return blocks[-1]


def distill_case(
    arch: str,
    teacher_ngf: int,
    student_ngf: int,
    *,
    ndf: int = 64,
    size: int = 256,
    batch: int = 1,
    lambda_kd: float = 10.0,
    lambda_sp: float = 10000.0,
    dtype: str = "float32",
    conv_impl: str = "auto",
    with_torch: bool = True,
    torch_device: str = "cpu",
    seed: int = 0,
) -> Case:
    """An SRPKD student step: frozen teacher forward, student pix2pix step + KD L1 + relation loss."""
    torch = parity.torch
    net_t = parity.reference_generator(arch, teacher_ngf, seed=seed + 7).eval()
    net_s, net_d = _reference_nets(arch, student_ngf, ndf, seed)
    gen, g_vars, disc, d_vars = _flax_nets(arch, student_ngf, ndf, net_s, net_d, conv_impl, dtype)
    teacher, t_table = torch_io.generator_table(arch, teacher_ngf)
    teacher = teacher.clone(conv_impl=conv_impl, dtype=DTYPES[dtype])
    t_vars = torch_io.variables_from_state_dict(parity.state_dict_arrays(net_t), t_table)
    a_t, a_j = parity.images(batch, 3, size, seed + 2)
    b_t, b_j = parity.images(batch, 3, size, seed + 3)
    tx = optax.adam(parity.LEARNING_RATE, b1=parity.BETAS[0], b2=parity.BETAS[1])
    distill = distillation.DistillSettings(
        lambda_kd=lambda_kd,
        lambda_sp=lambda_sp,
        relation_layers=(RELATION_LAYER,),
        relation_norm="row",
        relation_method="fused",
        teacher_train_mode=False,
    )
    step = functools.partial(
        pix2pix.train_step,
        gen=gen,
        disc=disc,
        teacher=teacher,
        g_tx=tx,
        d_tx=tx,
        schedule=optax.constant_schedule(parity.LEARNING_RATE),
        settings=pix2pix.StepSettings(
            seed=seed, adversarial="vanilla", l1_weight=parity.L1_WEIGHT, distill=distill
        ),
    )
    flops = pix2pix_model_flops(gen, g_vars, disc, d_vars, size, batch, teacher, t_vars)
    jax_side = jax_step(step, _state(g_vars, d_vars, tx), {"a": a_j, "b": b_j}, t_vars)

    torch_side = None
    if with_torch:
        net_t, net_s, net_d = (n.to(torch_device) for n in (net_t, net_s, net_d))
        a_t, b_t = a_t.to(torch_device), b_t.to(torch_device)
        opt_g, opt_d = _torch_optimizers(net_s, net_d)
        taps = {}
        _bottleneck_module(net_t, arch).register_forward_hook(lambda m, i, o: taps.__setitem__("t", o))
        _bottleneck_module(net_s, arch).register_forward_hook(lambda m, i, o: taps.__setitem__("s", o))

        def run():
            with torch.no_grad():
                teacher_out = net_t(a_t)

            def extra(fake_b):
                kd = torch.nn.functional.l1_loss(fake_b, teacher_out)
                return lambda_kd * kd + lambda_sp * torch_relation_loss(taps["t"], taps["s"])

            parity.torch_pix2pix_step(net_s, net_d, opt_g, opt_d, a_t, b_t, extra_g_loss=extra)

        torch_side = Step("torch", _torch_runner(run, torch_device))
    settings = dict(
        arch=arch,
        teacher_ngf=teacher_ngf,
        ngf=student_ngf,
        ndf=ndf,
        size=size,
        batch=batch,
        dtype=dtype,
        conv_impl=conv_impl,
        relation_layer=RELATION_LAYER,
        lambda_kd=lambda_kd,
        lambda_sp=lambda_sp,
        relation_method_jax="fused",
        relation_method_torch="dense (literal)",
    )
    name = f"distill {arch} {teacher_ngf}->{student_ngf}" + (f" {dtype}" if dtype != "float32" else "")
    return Case(name, "distill", settings, jax_side, torch_side, flops, batch)


# ---- Aging ---------------------------------------------------------------------------------------


def aging_case(*, size: int = 128, batch: int = 8, dtype: str = "float32", variant: str = "", seed: int = 0):
    """`ganjax.trainers.aging.train_step` with configs/aging_utkface.py's model (variant "" = the paper
    model, "smoke" = the tiny test model) at `size` px. ganjax only: no PyTorch build of it exists."""
    from configs import aging_utkface
    from ganjax.trainers import aging

    config = aging_utkface.get_config(variant)
    with config.unlocked():
        config.data.size = size
        config.train.batch_size = batch
        config.dtype = dtype
    model, disc = aging.build_models(config)
    g_tx, d_tx = aging.build_optimizers(config)
    init = aging.state_initializer(config, model, disc, g_tx, d_tx)
    state = jax.jit(init)(jax.random.key(seed, impl="rbg"))  # rbg keys compile the initialisers faster
    rng = np.random.default_rng(seed)
    batch_arrays = {
        "image": jnp.asarray(rng.uniform(-1, 1, (batch, size, size, 3)), jnp.float32),
        "age": jnp.asarray(rng.uniform(config.data.age_min, config.data.age_max, (batch,)), jnp.float32),
    }
    step = functools.partial(
        aging.train_step,
        model=model,
        disc=disc,
        g_tx=g_tx,
        d_tx=d_tx,
        settings=aging.StepSettings.from_config(config),
    )
    jax_side = jax_step(step, state, batch_arrays)
    settings = dict(
        size=size,
        batch=batch,
        dtype=dtype,
        variant=variant or "paper",
        base_features=config.model.base_features,
        disc_features=config.disc.features,
    )
    name = f"aging {variant or 'paper'} {size}px" + (f" {dtype}" if dtype != "float32" else "")
    notes = ["no PyTorch reference of the aging model exists: ganjax only"]
    return Case(name, "aging", settings, jax_side, None, None, batch, notes)
