"""Numerical parity of ganjax with the PyTorch reference, shared by tests/test_interop.py and
benchmarks/parity.py.

Each check builds the reference network in PyTorch (`ganjax.interop.torch_reference`, the reference's
N(0, 0.02) init plus random BatchNorm statistics), moves it to Flax through its state_dict (the
`ganjax.interop.torch` key mapping, so the conversion is under test too), runs both frameworks on the same
inputs and returns absolute differences as plain floats:

  generator_forward / discriminator_forward   eval mode (running statistics, no dropout), NCHW vs NHWC
  pix2pix_step   one step of the reference's `Pix2PixModel.optimize_parameters` (PyTorch, written out
                 literally) against `ganjax.trainers.pix2pix.train_step`: losses, parameter updates and
                 BatchNorm running statistics of G and D after the step

Inputs are uniform in [-1, 1] (images), float32. Needs torch.
"""

from __future__ import annotations

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ganjax.interop import torch as torch_io
from ganjax.interop import torch_reference as tr
from ganjax.trainers import pix2pix

torch = tr.torch

# The reference's pix2pix optimiser and loss weights (train_options / pix2pix_model.py).
LEARNING_RATE = 2e-4
BETAS = (0.5, 0.999)
L1_WEIGHT = 100.0
# `pix2pix_step`: gradients below GRAD_FLOOR times the network's largest are "numerically zero"; updates
# that differ by more than UPDATE_TOLERANCE (0.5% of the learning rate) are counted.
GRAD_FLOOR = 1e-6
UPDATE_TOLERANCE = 1e-6


def images(batch: int, channels: int, size: int, seed: int = 0):
    """The same uniform [-1, 1] images as (torch NCHW, jax NHWC) float32."""
    x = np.random.default_rng(seed).uniform(-1, 1, (batch, channels, size, size)).astype(np.float32)
    return torch.from_numpy(x), jnp.asarray(x.transpose(0, 2, 3, 1))


def nchw(y) -> np.ndarray:
    return np.asarray(y).transpose(0, 3, 1, 2)


def abs_diff(a, b) -> dict[str, float]:
    """{"max", "mean"} of |a - b| over all leaves of two pytrees (or arrays) of the same structure."""
    diffs = [np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).ravel() for x, y in _pairs(a, b)]
    d = np.concatenate(diffs) if diffs else np.zeros(1)
    return {"max": float(d.max()), "mean": float(d.mean())}


def _pairs(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    if jax.tree.structure(a) != jax.tree.structure(b):
        raise ValueError(f"different trees: {jax.tree.structure(a)} vs {jax.tree.structure(b)}")
    return zip(leaves_a, leaves_b, strict=True)


def random_variables(module, x, seed: int = 0, scale: float = 0.1):
    """Flax variables with `module.init`'s tree for input `x`, filled with N(0, scale) numbers (BatchNorm
    variances uniform in [0.5, 1.5]) without compiling `init`."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), x)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if jax.tree_util.keystr(path).endswith("['var']"):
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), jnp.float32)
        return jnp.asarray(rng.normal(0.0, scale, leaf.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def reference_generator(arch, ngf, norm=None, *, dropout=False, seed=0):
    """The PyTorch generator with the reference's init and random BatchNorm statistics."""
    norm = torch_io.resolve_generator_norm(arch, norm)
    torch.manual_seed(seed)
    net = tr.build_generator(arch, ngf, norm, dropout)
    return tr.randomize_batch_norm(tr.init_weights(net, seed=seed), seed=seed)


def reference_discriminator(ndf, n_layers=3, norm="batch", *, input_nc=6, seed=0):
    torch.manual_seed(seed)
    net = tr.NLayerDiscriminator(input_nc, ndf, n_layers, norm)
    return tr.randomize_batch_norm(tr.init_weights(net, seed=seed), seed=seed)


def state_dict_arrays(net) -> dict[str, np.ndarray]:
    """A torch module's state_dict as numpy copies (torch updates parameters and statistics in place)."""
    return {k: np.array(v.detach().cpu().numpy()) for k, v in net.state_dict().items()}


def gradient_arrays(net) -> dict[str, np.ndarray]:
    """The state_dict with each parameter replaced by its `.grad` (buffers kept, so it converts as one)."""
    out = state_dict_arrays(net)
    out.update({k: np.array(p.grad.detach().cpu().numpy()) for k, p in net.named_parameters()})
    return out


def generator_forward(arch, ngf, size, *, norm=None, batch=1, seed=0, conv_impl="auto") -> dict[str, float]:
    """|G_torch(x) - G_flax(x)| ("max", "mean") in eval mode for a reference generator converted by its
    state_dict, and "scale" = max |G_torch(x)|."""
    net = reference_generator(arch, ngf, norm, seed=seed).eval()
    module, table = torch_io.generator_table(arch, ngf, norm)
    variables = torch_io.variables_from_state_dict(state_dict_arrays(net), table)
    xt, xj = images(batch, 3, size, seed)
    with torch.no_grad():
        expected = net(xt).numpy()
    y = jax.jit(module.clone(conv_impl=conv_impl).apply)(variables, xj)
    return {**abs_diff(nchw(y), expected), "scale": float(np.abs(expected).max())}


def discriminator_forward(
    ndf, size, *, n_layers=3, norm="batch", input_nc=6, batch=1, seed=0, conv_impl="auto"
):
    """|D_torch(x) - D_flax(x)| ("max", "mean" over the logits) in eval mode for a reference PatchGAN
    converted by its state_dict, and "scale" = max |D_torch(x)|."""
    net = reference_discriminator(ndf, n_layers, norm, input_nc=input_nc, seed=seed).eval()
    module, table = torch_io.discriminator_table(ndf, n_layers, norm, input_nc=input_nc)
    variables = torch_io.variables_from_state_dict(state_dict_arrays(net), table)
    xt, xj = images(batch, input_nc, size, seed)
    with torch.no_grad():
        expected = net(xt).numpy()
    y = jax.jit(module.clone(conv_impl=conv_impl).apply)(variables, xj)
    return {**abs_diff(nchw(y), expected), "scale": float(np.abs(expected).max())}


def torch_pix2pix_step(
    net_g, net_d, opt_g, opt_d, real_a, real_b, l1_weight=L1_WEIGHT, extra_g_loss=None
) -> dict[str, float]:
    """The reference's `Pix2PixModel.optimize_parameters` with gan_mode "vanilla", written out.

    forward: fake_B = G(A); backward_D on D(A, fake_B.detach()) -> 0 and D(A, B) -> 1, each
    BCEWithLogits, times 0.5; optimizer_D.step(); then, with D frozen, backward_G on
    BCEWithLogits(D(A, fake_B), 1) + l1_weight * L1(fake_B, B) through the same forward; optimizer_G.step().
    Both networks in train mode. `extra_g_loss(fake_B)`, when given, returns a scalar tensor added to the G
    loss (a distillation student's terms; benchmarks/train_steps.py). Returns the losses.
    """
    bce, l1 = torch.nn.BCEWithLogitsLoss(), torch.nn.L1Loss()
    fake_b = net_g(real_a)

    for p in net_d.parameters():
        p.requires_grad_(True)
    opt_d.zero_grad()
    pred_fake = net_d(torch.cat([real_a, fake_b], 1).detach())
    loss_d_fake = bce(pred_fake, torch.zeros_like(pred_fake))
    pred_real = net_d(torch.cat([real_a, real_b], 1))
    loss_d_real = bce(pred_real, torch.ones_like(pred_real))
    loss_d = (loss_d_fake + loss_d_real) * 0.5
    loss_d.backward()
    opt_d.step()

    for p in net_d.parameters():
        p.requires_grad_(False)
    opt_g.zero_grad()
    pred_fake = net_d(torch.cat([real_a, fake_b], 1))
    loss_g_gan = bce(pred_fake, torch.ones_like(pred_fake))
    loss_g_l1 = l1(fake_b, real_b)
    loss_g = loss_g_gan + l1_weight * loss_g_l1
    if extra_g_loss is not None:
        loss_g = loss_g + extra_g_loss(fake_b)
    loss_g.backward()
    opt_g.step()
    losses = {"d_total": loss_d, "g_adversarial": loss_g_gan, "g_l1": loss_g_l1, "g_total": loss_g}
    return {k: v.item() for k, v in losses.items()}


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def _compare_updates(torch_update, jax_update, grads, normalized_convs) -> dict[str, float]:
    """The "g_update" / "d_update" entry of `pix2pix_step` from the two frameworks' updates and PyTorch's
    gradients (all Flax-layout trees of the same structure)."""
    diff = np.abs(_flat(torch_update) - _flat(jax_update))
    grad = _flat(grads)
    # Adam's first update is lr * g / (|g| + eps) ~ lr * sign(g): where the gradient is zero up to rounding,
    # the noise picks the sign. So it is for the biases feeding a norm (exact gradient 0: the norm subtracts
    # each channel's mean) and wherever |g| < GRAD_FLOOR * max |g|.
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    names = [jax.tree_util.keystr(path, simple=True, separator="/") for path, _ in leaves]
    exact_zero = [n.endswith("/bias") and n.rsplit("/", 1)[0] in normalized_convs for n in names]
    exact_zero = np.repeat(exact_zero, [np.size(leaf) for _, leaf in leaves])
    floor = GRAD_FLOOR * float(np.abs(grad[~exact_zero]).max())
    tiny = exact_zero | (np.abs(grad) < floor)
    return {
        "max": float(diff.max()),
        "mean": float(diff.mean()),
        "max_where_grad_not_tiny": float(np.max(diff[~tiny], initial=0.0)),
        "differ": int(np.sum(diff > UPDATE_TOLERANCE)),
        "differ_where_grad_not_tiny": int(np.sum(diff[~tiny] > UPDATE_TOLERANCE)),
        "params": int(diff.size),
        "largest_update": float(np.abs(_flat(torch_update)).max()),
    }


def pix2pix_step(
    arch,
    ngf,
    size,
    *,
    norm=None,
    ndf=8,
    n_layers=3,
    d_norm="batch",
    batch=1,
    seed=0,
    conv_impl="auto",
    float64_reference=False,
) -> dict[str, dict[str, float]]:
    """One pix2pix G+D step in both frameworks from the same weights and batch (generator dropout off:
    the two frameworks draw different masks).

    Returns a dict:
      "losses":        {name: |torch - jax|} for d_total, g_adversarial, g_l1, g_total
      "losses_torch":  {name: the PyTorch value}
      "g_stats", "d_stats":  {"max", "mean"} |difference| of the BatchNorm running statistics after the
                       step (zeros without batch norm)
      "g_update", "d_update":  over all parameters of the network, |update_torch - update_jax|'s "max" and
                       "mean"; "max_where_grad_not_tiny", the max over parameters whose PyTorch gradient is
                       at least GRAD_FLOOR times the network's largest; "differ" and
                       "differ_where_grad_not_tiny", how many updates differ by more than
                       UPDATE_TOLERANCE; "params", how many parameters; "largest_update", max |update_torch|
                       (about the learning rate: Adam's first step is lr * g / (|g| + eps) ~ lr * sign(g)).
                       With float64_reference, the same step is also run by PyTorch in float64 and
                       "vs_float64" = {"jax": {"max", "mean", "differ"}, "torch": {...}} compares each
                       float32 update with it: how close each framework gets to the exact step.
    """
    net_g = reference_generator(arch, ngf, norm, seed=seed).train()
    net_d = reference_discriminator(ndf, n_layers, d_norm, input_nc=6, seed=seed + 1).train()
    gen, g_table = torch_io.generator_table(arch, ngf, norm)
    disc, d_table = torch_io.discriminator_table(ndf, n_layers, d_norm, input_nc=6)
    gen, disc = gen.clone(conv_impl=conv_impl), disc.clone(conv_impl=conv_impl)
    g_vars = torch_io.variables_from_state_dict(state_dict_arrays(net_g), g_table)
    d_vars = torch_io.variables_from_state_dict(state_dict_arrays(net_d), d_table)

    a_t, a_j = images(batch, 3, size, seed + 2)
    b_t, b_j = images(batch, 3, size, seed + 3)

    def torch_step(net_g, net_d, dtype):
        opt_g = torch.optim.Adam(net_g.parameters(), lr=LEARNING_RATE, betas=BETAS)
        opt_d = torch.optim.Adam(net_d.parameters(), lr=LEARNING_RATE, betas=BETAS)
        losses = torch_pix2pix_step(net_g, net_d, opt_g, opt_d, a_t.to(dtype), b_t.to(dtype))
        after = [
            torch_io.variables_from_state_dict(state_dict_arrays(n), t)
            for n, t in ((net_g, g_table), (net_d, d_table))
        ]
        return losses, after

    if float64_reference:  # the step's float64 result (parameters rounded to float32 for the comparison)
        _, (g_exact, d_exact) = torch_step(
            copy.deepcopy(net_g).double(), copy.deepcopy(net_d).double(), torch.float64
        )
    losses_torch, (g_after, d_after) = torch_step(net_g, net_d, torch.float32)

    tx = optax.adam(LEARNING_RATE, b1=BETAS[0], b2=BETAS[1])  # eps 1e-8, as torch.optim.Adam
    state = pix2pix.Pix2PixState(
        step=jnp.zeros((), jnp.int32),
        g_params=g_vars["params"],
        g_batch_stats=g_vars.get("batch_stats", {}),
        d_params=d_vars["params"],
        d_batch_stats=d_vars.get("batch_stats", {}),
        g_opt_state=tx.init(g_vars["params"]),
        d_opt_state=tx.init(d_vars["params"]),
    )
    step = functools.partial(
        pix2pix.train_step,
        gen=gen,
        disc=disc,
        teacher=None,
        g_tx=tx,
        d_tx=tx,
        schedule=optax.constant_schedule(LEARNING_RATE),
        settings=pix2pix.StepSettings(seed=seed, adversarial="vanilla", l1_weight=L1_WEIGHT),
    )
    new, metrics = jax.jit(step)(state, {"a": a_j, "b": b_j}, {})

    def updates(after, before):
        return jax.tree.map(lambda x, y: np.asarray(x) - np.asarray(y), after, before)

    out = {
        "losses": {k: abs(float(metrics[k]) - v) for k, v in losses_torch.items()},
        "losses_torch": losses_torch,
        "g_stats": abs_diff(g_after.get("batch_stats", {}), new.g_batch_stats),
        "d_stats": abs_diff(d_after.get("batch_stats", {}), new.d_batch_stats),
    }
    for name, net, table, before, after_torch, after_jax in (
        ("g", net_g, g_table, g_vars, g_after, new.g_params),
        ("d", net_d, d_table, d_vars, d_after, new.d_params),
    ):
        torch_update = updates(after_torch["params"], before["params"])
        jax_update = updates(after_jax, before["params"])
        grads = torch_io.variables_from_state_dict(gradient_arrays(net), table)["params"]
        out[f"{name}_update"] = _compare_updates(torch_update, jax_update, grads, table.normalized_convs)
        if float64_reference:
            exact = _flat(updates((g_exact if name == "g" else d_exact)["params"], before["params"]))
            out[f"{name}_update"]["vs_float64"] = {
                framework: {
                    "max": float(np.abs(_flat(u) - exact).max()),
                    "mean": float(np.abs(_flat(u) - exact).mean()),
                    "differ": int(np.sum(np.abs(_flat(u) - exact) > UPDATE_TOLERANCE)),
                }
                for framework, u in (("jax", jax_update), ("torch", torch_update))
            }
    return out
