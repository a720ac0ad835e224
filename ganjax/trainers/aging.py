"""Trainer: continuous face aging via self-estimated residual age embedding (CVPR 2021).

PAPERS.md §A. One jitted step updates the discriminator and the generator (encoder + embedded linear
age estimator + decoder) from the same forward pass:

  F, e = E(x);  z = W e + b;  y_hat = E_k[k];  e_t = e + s (a(t) - a(y_hat))   (a(.) = columns of W,
  s = aging.basis_scale)
  G loss = w_est CE(z, age) [+ mean-variance] + w_adv adv(D(G(F, e_t))) + w_age CE(z(E(G(F, e_t))), t)
           + w_rec |G(F, e) - x| [+ w_cyc |G(G(x, t), y_hat) - x|]
  D loss = adv(D(x), D(G(F, e_t))) [+ R1]

The estimator's weights get gradients only from the real-image estimation loss: the aging basis is
read through a stop-gradient, and the age loss on generated faces runs E and W with stopped
parameters (a fixed judge for that term), so the generator cannot pass it by moving the judge.

Loop: mesh -> data -> state -> restore -> jit steps -> loop with periodic log / eval / samples /
checkpoint. Resume order: latest checkpoint in workdir > fresh init (see ganjax/checkpoint.py).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import parameter_overview

from ganjax import sharding, visualize
from ganjax.data import pipeline
from ganjax.evaluation import aging_in_loop, aging_offline, batching, offline
from ganjax.losses import adversarial
from ganjax.losses import aging as aging_losses
from ganjax.models import age_embedding
from ganjax.models.aging import OUTPUTS, AgingGenerator
from ganjax.models.discriminators import PatchDiscriminator
from ganjax.trainers import common, loop
from ganjax.trainers.common import check_choice, check_positive, require

DATASETS = ("synthetic_faces", "utkface")
CONDITIONINGS = ("adain", "channel_scale", "concat")
BASES = ("weights", "normalized")
CURRENT_AGES = ("estimated", "label")


@flax.struct.dataclass
class AgingState:
    """Everything a step reads and writes; checkpointed whole."""

    step: jax.Array  # int32 scalar: number of completed steps
    g_params: Any  # generator (encoder, estimator, decoder)
    d_params: Any  # PatchGAN discriminator
    ema_params: Any  # EMA of g_params, used for samples and evaluation
    g_opt_state: Any
    d_opt_state: Any


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """The plain (hashable) values a step needs, read once from the config."""

    seed: int
    age_min: float
    age_max: float
    num_ages: int
    use_label_age: bool
    age_conditioned_disc: bool
    adversarial: str
    adversarial_weight: float
    estimator_weight: float
    age_label_sigma: float
    mean_variance: bool
    mean_weight: float
    variance_weight: float
    age_weight: float
    age_weight_end: float
    age_weight_steps: int
    reconstruction_weight: float
    cycle_weight: float
    mask_weight: float
    colour_weight: float
    r1_weight: float
    ema_decay: float

    @classmethod
    def from_config(cls, config) -> StepSettings:
        loss = config.loss
        return cls(
            seed=config.seed,
            age_min=float(config.data.age_min),
            age_max=float(config.data.age_max),
            num_ages=config.model.num_ages,
            use_label_age=config.aging.current_age == "label",
            age_conditioned_disc=config.disc.age_conditioned,
            adversarial=loss.adversarial,
            adversarial_weight=loss.adversarial_weight,
            estimator_weight=loss.estimator_weight,
            age_label_sigma=float(loss.get("age_label_sigma", 0.0)),
            mean_variance=loss.mean_variance,
            mean_weight=loss.mean_weight,
            variance_weight=loss.variance_weight,
            age_weight=loss.age_weight,
            age_weight_end=_age_weight_end(loss),
            age_weight_steps=_age_weight_steps(config),
            reconstruction_weight=loss.reconstruction_weight,
            cycle_weight=loss.cycle_weight,
            mask_weight=float(loss.get("mask_weight", 0.0)),
            colour_weight=float(loss.get("colour_weight", 0.0)),
            r1_weight=loss.r1_weight,
            ema_decay=config.train.ema_decay,
        )


def _age_weight_end(loss) -> float:
    """loss.age_weight_end, or loss.age_weight where it is unset (None) or absent (older runs)."""
    end = loss.get("age_weight_end")
    return float(loss.age_weight if end is None else end)


def _age_weight_steps(config) -> int:
    """loss.age_weight_steps, or train.num_steps where it is unset (None) or absent (older runs)."""
    steps = config.loss.get("age_weight_steps")
    return int(config.train.num_steps if steps is None else steps)


def age_weight_at(step, settings: StepSettings):
    """The age loss weight at `step`: linear from age_weight at 0 to age_weight_end at age_weight_steps,
    then constant."""
    s = settings
    progress = jnp.clip(step / s.age_weight_steps, 0.0, 1.0)
    return s.age_weight + (s.age_weight_end - s.age_weight) * progress


# ---- Config validation ---------------------------------------------------------------------------


def validate_config(config) -> None:
    """Checks everything that can be checked without devices or data; raises ConfigError."""
    data, model, train = config.data, config.model, config.train
    check_choice("data.name", data.name, DATASETS)
    check_choice("aging.conditioning", config.aging.conditioning, CONDITIONINGS)
    check_choice("aging.basis", config.aging.basis, BASES)
    check_choice("aging.current_age", config.aging.current_age, CURRENT_AGES)
    check_choice("model.output", config.model.output, OUTPUTS)
    check_choice("loss.adversarial", config.loss.adversarial, adversarial.ADVERSARIAL_LOSSES)
    check_choice("disc.norm", config.disc.norm, ("instance",))
    common.compute_dtype(config)  # config.dtype is one of common.COMPUTE_DTYPES
    check_positive("aging.basis_scale", config.aging.get("basis_scale", 1.0))
    if config.loss.get("age_weight_end") is not None:  # unset = constant loss.age_weight, nothing to check
        check_positive("loss.age_weight_end", config.loss.age_weight_end, allow_zero=True)
    if config.loss.get("age_weight_steps") is not None:
        check_positive("loss.age_weight_steps", config.loss.age_weight_steps)
        require(
            config.loss.get("age_weight_end") is not None,
            f"config.loss.age_weight_steps = {config.loss.age_weight_steps} is when the age weight reaches "
            "loss.age_weight_end, which is unset (a constant weight): set age_weight_end or unset "
            "age_weight_steps.",
        )
    check_positive("loss.age_label_sigma", config.loss.get("age_label_sigma", 0.0), allow_zero=True)
    for key, what in (("mask_weight", "penalises the blend mask"), ("colour_weight", "trains the colours")):
        weight = config.loss.get(key, 0.0)
        check_positive(f"loss.{key}", weight, allow_zero=True)
        require(
            weight == 0 or model.output == "mask",
            f'config.loss.{key} = {weight} {what} of config.model.output = "mask", but model.output '
            f"is {model.output!r}: set one or the other.",
        )
    require(model.num_ages >= 2, f"config.model.num_ages = {model.num_ages} must be >= 2.")
    require(
        0 <= data.age_min < data.age_max <= model.num_ages - 1,
        f"config.data.age_min/age_max = {data.age_min}/{data.age_max} must satisfy "
        f"0 <= age_min < age_max <= model.num_ages - 1 = {model.num_ages - 1}.",
    )
    factor = 2 ** max(model.num_downsamples, config.disc.num_layers)
    require(
        data.size % factor == 0 and data.size >= 4 * 2**config.disc.num_layers,
        f"config.data.size = {data.size} must be a multiple of {factor} (2**num_downsamples and "
        f"2**disc.num_layers) and at least {4 * 2**config.disc.num_layers}.",
    )
    for key in ("base_features", "num_downsamples"):
        check_positive(f"model.{key}", model[key])
    for key in ("num_encoder_blocks", "num_decoder_blocks"):
        check_positive(f"model.{key}", model[key], allow_zero=True)
    for key, value in config.loss.items():
        if key.endswith("_weight"):
            check_positive(f"loss.{key}", value, allow_zero=True)
    for key in ("num_steps", "batch_size", "g_learning_rate", "d_learning_rate"):
        check_positive(f"train.{key}", train[key])
    require(
        0 <= train.get("decay_steps", 0) <= train.num_steps,
        f"config.train.decay_steps = {train.get('decay_steps', 0)} must be in [0, train.num_steps = "
        f"{train.num_steps}] (the last decay_steps updates decay the learning rates linearly).",
    )
    require(0 <= train.ema_decay < 1, f"config.train.ema_decay = {train.ema_decay} not in [0, 1).")
    for key in ("log.every_steps", "log.sample_every_steps", "eval.every_steps"):
        section, name = key.split(".")
        check_positive(key, config[section][name])
    check_positive("checkpoint.every_steps", config.checkpoint.every_steps)
    check_positive("checkpoint.keep", config.checkpoint.keep)
    require(
        all(0 <= a <= model.num_ages - 1 for a in config.log.sample_ages),
        f"config.log.sample_ages {tuple(config.log.sample_ages)} must lie in [0, num_ages - 1].",
    )


# ---- Models, optimizers, state -------------------------------------------------------------------


def build_models(config) -> tuple[AgingGenerator, PatchDiscriminator]:
    model = AgingGenerator(
        num_ages=config.model.num_ages,
        base_features=config.model.base_features,
        num_downsamples=config.model.num_downsamples,
        num_encoder_blocks=config.model.num_encoder_blocks,
        num_decoder_blocks=config.model.num_decoder_blocks,
        conditioning=config.aging.conditioning,
        normalize_basis=config.aging.basis == "normalized",
        output=config.model.output,
        replace_feature_mean=config.aging.replace_feature_mean,
        basis_scale=config.aging.get("basis_scale", 1.0),  # runs from before the knob: 1
        dtype=common.compute_dtype(config),
    )
    disc = PatchDiscriminator(
        ndf=config.disc.features,
        num_layers=config.disc.num_layers,
        norm=config.disc.norm,
        conditioning_dim=config.model.num_ages if config.disc.age_conditioned else 0,
        dtype=common.compute_dtype(config),
    )
    return model, disc


def build_optimizers(config) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
    """Adam for G and D; constant rates, decayed linearly over the last train.decay_steps updates."""
    train = config.train
    decay_steps = train.get("decay_steps", 0)  # runs from before the knob: no decay

    def adam(rate):
        # A plain float keeps the optimizer state of constant-rate runs (no schedule count): their
        # checkpoints restore as before.
        schedule = common.linear_decay_schedule(rate, train.num_steps, decay_steps) if decay_steps else rate
        return optax.adam(schedule, b1=train.b1, b2=train.b2)

    return adam(train.g_learning_rate), adam(train.d_learning_rate)


def init_state(rng, *, model, disc, g_tx, d_tx, image_size: int, num_ages: int) -> AgingState:
    """Fresh parameters; pure, so it can be jitted straight into its sharding."""
    g_rng, d_rng = jax.random.split(rng)
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    ages = jnp.zeros((1,), jnp.float32)
    g_params = model.init(g_rng, images, ages)["params"]
    condition = jnp.zeros((1, num_ages)) if disc.conditioning_dim else None
    d_params = disc.init(d_rng, images, condition)["params"]
    return AgingState(
        step=jnp.zeros((), jnp.int32),
        g_params=g_params,
        d_params=d_params,
        ema_params=g_params,
        g_opt_state=g_tx.init(g_params),
        d_opt_state=d_tx.init(d_params),
    )


def state_initializer(config, model, disc, g_tx, d_tx):
    """rng -> fresh AgingState for the config's image size and ages (pure, jittable)."""
    return functools.partial(
        init_state,
        model=model,
        disc=disc,
        g_tx=g_tx,
        d_tx=d_tx,
        image_size=config.data.size,
        num_ages=config.model.num_ages,
    )


# ---- The step ------------------------------------------------------------------------------------


def train_step(state: AgingState, batch, *, model, disc, g_tx, d_tx, settings: StepSettings):
    """One D and one G update from the same forward pass.

    batch: image float32 (B, H, W, 3) in [-1, 1], age float32 (B,). Returns (new state, metrics of
    float32 scalars).
    """
    s = settings
    images, ages = batch["image"], batch["age"]
    rng = jax.random.fold_in(jax.random.key(s.seed), state.step)
    target_ages = jax.random.uniform(rng, ages.shape, minval=s.age_min, maxval=s.age_max, dtype=jnp.float32)
    current_ages = ages if s.use_label_age else None

    def condition(a):
        return aging_losses.two_hot(a, s.num_ages) if s.age_conditioned_disc else None

    def discriminate(d_params, x, a):
        return disc.apply({"params": d_params}, x, condition(a))

    def generator_loss(g_params):
        out = model.apply({"params": g_params}, images, target_ages, current_ages)
        fake = out["images"]
        reconstruction, reconstruction_layers = model.apply(
            {"params": g_params},
            out["features"],
            out["embedding"],
            images,
            method=model.decode_with_layers,
        )
        # The age judge for generated faces: the same E and W, parameters stopped.
        judge = jax.lax.stop_gradient(g_params)
        _, fake_embedding = model.apply({"params": judge}, fake, method=model.encode)
        fake_logits = model.apply({"params": judge}, fake_embedding, method=model.estimate)

        losses = {
            "estimator": aging_losses.age_cross_entropy(out["logits"], ages, s.age_label_sigma),
            "adversarial": adversarial.generator_loss(
                s.adversarial, discriminate(state.d_params, fake, target_ages)
            ),
            "age": aging_losses.age_cross_entropy(fake_logits, target_ages, s.age_label_sigma),
            "reconstruction": aging_losses.l1(reconstruction, images),
        }
        weights = {
            "estimator": s.estimator_weight,
            "adversarial": s.adversarial_weight,
            "age": age_weight_at(state.step, s),
            "reconstruction": s.reconstruction_weight,
        }
        if s.mean_variance:
            losses["mean"], losses["variance"] = aging_losses.mean_variance_loss(out["logits"], ages)
            weights.update(mean=s.mean_weight, variance=s.variance_weight)
        if s.cycle_weight > 0:
            back_ages = ages if s.use_label_age else out["estimated_age"]
            back = model.apply({"params": g_params}, fake, back_ages, target_ages)["images"]
            losses["cycle"] = aging_losses.l1(back, images)
            weights["cycle"] = s.cycle_weight
        if s.colour_weight > 0:  # the colour layer must draw the whole face, not only under the mask
            losses["colour"] = aging_losses.l1(reconstruction_layers["colours"], images)
            weights["colour"] = s.colour_weight
        if s.mask_weight > 0:  # paint only what aging changes (GANimation's attention L1)
            losses["mask"] = jnp.mean(out["mask"])
            weights["mask"] = s.mask_weight
        total = sum(weights[k] * losses[k] for k in losses)
        return total, (losses, fake, out["estimated_age"])

    def discriminator_loss(d_params, fake):
        real_logits = discriminate(d_params, images, ages)
        fake_logits = discriminate(d_params, fake, target_ages)
        loss = adversarial.discriminator_loss(s.adversarial, real_logits, fake_logits)
        losses = {"d_adversarial": loss}
        if s.r1_weight > 0:
            penalty = adversarial.r1_penalty(lambda x: discriminate(d_params, x, ages), images)
            losses["d_r1"] = penalty
            loss = loss + 0.5 * s.r1_weight * penalty
        return loss, losses

    (g_total, (g_losses, fake, estimated_age)), g_grads = jax.value_and_grad(generator_loss, has_aux=True)(
        state.g_params
    )
    fake = jax.lax.stop_gradient(fake)
    (d_total, d_losses), d_grads = jax.value_and_grad(discriminator_loss, has_aux=True)(state.d_params, fake)

    g_updates, g_opt_state = g_tx.update(g_grads, state.g_opt_state, state.g_params)
    g_params = optax.apply_updates(state.g_params, g_updates)
    d_updates, d_opt_state = d_tx.update(d_grads, state.d_opt_state, state.d_params)
    d_params = optax.apply_updates(state.d_params, d_updates)
    new_state = state.replace(
        step=state.step + 1,
        g_params=g_params,
        d_params=d_params,
        ema_params=common.ema_update(state.ema_params, g_params, s.ema_decay),
        g_opt_state=g_opt_state,
        d_opt_state=d_opt_state,
    )
    metrics = {
        "g_total": g_total,
        "d_total": d_total,
        **g_losses,
        **d_losses,
        "train_age_mae": jnp.mean(jnp.abs(estimated_age - ages)),
        "g_grad_norm": common.tree_norm(g_grads),
        "d_grad_norm": common.tree_norm(d_grads),
        "g_param_norm": common.tree_norm(g_params),
        "d_param_norm": common.tree_norm(d_params),
    }
    return new_state, metrics


# ---- Evaluation functions (EMA generator) --------------------------------------------------------


def make_eval_fns(model: AgingGenerator, mesh):
    """Jitted estimate_age(params, images) and age_faces(params, images, targets, currents)."""

    # Replicated outputs: every process can read all rows (the batch is split over processes).
    @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
    def estimate(params, images):
        _, embedding = model.apply({"params": params}, images, method=model.encode)
        logits = model.apply({"params": params}, embedding, method=model.estimate)
        return age_embedding.expected_age(logits)

    @functools.partial(jax.jit, static_argnames="use_current", out_shardings=sharding.replicated(mesh))
    def age(params, images, target_ages, current_ages, use_current: bool):
        out = model.apply({"params": params}, images, target_ages, current_ages if use_current else None)
        return out["images"]

    def put(*arrays):
        return sharding.put_replicated_batch(arrays, mesh)

    return estimate, age, put


def pick_sample_faces(eval_set: dict[str, np.ndarray], count: int) -> np.ndarray:
    """Indices of `count` held-out faces, one per identity when identities are known: alternately a young
    and an old rendering of it (the test ages' 25th and 85th percentiles), so that every progression grid
    shows aging and rejuvenation."""
    identity = eval_set["identity"]
    if np.all(identity < 0):
        return np.arange(min(count, len(identity)))
    picks = []
    for row, ident in enumerate(np.unique(identity)[:count]):
        members = np.flatnonzero(identity == ident)
        order = np.argsort(eval_set["age"][members], kind="stable")
        quantile = 0.25 if row % 2 == 0 else 0.85
        picks.append(members[order[int(quantile * (len(order) - 1) + 0.5)]])
    return np.asarray(picks)


class AgingEvaluator:
    """In-loop metrics and progression pictures from the EMA generator."""

    def __init__(self, config, model, mesh, eval_set, batch_size: int):
        self.config = config
        self.eval_set = eval_set
        self.batch_size = batch_size
        self.use_label = config.aging.current_age == "label"
        self._estimate, self._age, self._put = make_eval_fns(model, mesh)

    def age_faces(self, params, images, targets, currents):
        """One fixed-size batch aged: (B, H, W, 3), (B,) target and current ages (the current ages are
        used only with aging.current_age = "label") -> (B, H, W, 3)."""
        return self._age(params, *self._put(images, targets, currents), self.use_label)

    def metrics(self, params) -> dict[str, float]:
        def estimate_age(images):
            return self._estimate(params, *self._put(images))

        def age_faces(images, targets, currents):
            return self._age(params, *self._put(images, targets, currents), self.use_label)

        return aging_in_loop.evaluate(
            self.eval_set,
            estimate_age=estimate_age,
            age_faces=age_faces,
            batch_size=self.batch_size,
            use_label_as_current_age=self.use_label,
            ground_truth=self.config.data.name == "synthetic_faces",
        )

    def progression(self, params) -> np.ndarray:
        """uint8 grid: rows = held-out faces, columns = input then config.log.sample_ages."""
        picks = pick_sample_faces(self.eval_set, self.config.log.sample_faces)
        inputs, ages = self.eval_set["image"][picks], self.eval_set["age"][picks]
        columns = []
        for target in self.config.log.sample_ages:
            targets = np.full(len(picks), target, np.float32)
            columns.append(
                batching.batched(
                    lambda x, t, c: self._age(params, *self._put(x, t, c), self.use_label),
                    (inputs, targets, ages),
                    self.batch_size,
                )
            )
        outputs = np.stack(columns, axis=1)
        return visualize.progression_grid(inputs, outputs, self.config.log.sample_ages, ages)


# ---- Train and evaluate ------------------------------------------------------------------------


def _setup(config, workdir: str):
    """Shared by train and evaluate: mesh, models, abstract state and its sharding."""
    validate_config(config)
    workdir = common.check_workdir_writable(workdir)
    mesh = sharding.make_mesh(config.mesh.axes)
    common.check_batch_divisible(
        config.train.batch_size, sharding.data_parallel_size(mesh), jax.process_count()
    )
    model, disc = build_models(config)
    g_tx, d_tx = build_optimizers(config)
    init = state_initializer(config, model, disc, g_tx, d_tx)
    state_sharding = sharding.state_shardings(jax.eval_shape(init, jax.random.key(0)), mesh, config.mesh)
    return workdir, mesh, model, disc, g_tx, d_tx, init, state_sharding


def _make_evaluator(config, model, mesh) -> AgingEvaluator:
    # Synthetic test faces are all kept: every (identity, age) pair has a ground truth.
    synthetic = config.data.name == "synthetic_faces"
    max_examples = None if synthetic else config.data.eval_examples
    eval_set = pipeline.load_eval_set(config.data, "test", max_examples)
    batch_size = max(config.train.batch_size, sharding.data_parallel_size(mesh))
    return AgingEvaluator(config, model, mesh, eval_set, batch_size)


def train(config, workdir: str) -> AgingState:
    """Trains (or resumes) the aging model; returns the final state."""
    # ---- Setup: mesh, models, writers ------------------------------------------------------------
    workdir, mesh, model, disc, g_tx, d_tx, init, state_sharding = _setup(config, workdir)
    writer = common.create_writer(workdir)
    writer.write_hparams(common.flatten_config(config))
    common.save_run_config(workdir, config)
    is_main = jax.process_index() == 0

    # ---- Data --------------------------------------------------------------------------------------
    train_iter = pipeline.make_train_iterator(
        config.data,
        global_batch_size=config.train.batch_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    evaluator = _make_evaluator(config, model, mesh)

    # ---- State: fresh, then restored from the workdir if a checkpoint exists ------------------
    state = jax.jit(init, out_shardings=state_sharding)(jax.random.key(config.seed))
    parameter_overview.log_parameter_overview(state.g_params, msg="generator")
    parameter_overview.log_parameter_overview(state.d_params, msg="discriminator")
    ckpt = loop.open_checkpointer(config, workdir)
    state, _ = loop.restore_latest(ckpt, state, train_iter)

    # ---- Compiled step -------------------------------------------------------------------------
    settings = StepSettings.from_config(config)
    step_fn = jax.jit(
        functools.partial(train_step, model=model, disc=disc, g_tx=g_tx, d_tx=d_tx, settings=settings),
        in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=0,
    )

    def write_samples(state, step):
        grid = evaluator.progression(state.ema_params)
        writer.write_images(step, {"age_progression": grid[None]})
        if is_main:
            visualize.save_png(grid, os.path.join(workdir, "samples", f"progression_{step:07d}.png"))

    return loop.train_loop(
        config,
        state=state,
        step_fn=step_fn,
        train_iter=train_iter,
        mesh=mesh,
        ckpt=ckpt,
        writer=writer,
        evaluate=lambda state: evaluator.metrics(state.ema_params),
        write_samples=write_samples,
    )


def evaluate(config, workdir: str) -> dict[str, float]:
    """--mode eval (ganjax/evaluation/offline.py): the checkpoint(s) that config.eval.step / watch name,
    EMA and raw generators, in-loop metrics plus age accuracy and identity (aging_offline); writes
    WORKDIR/eval/<step>.json, eval/results.md and an EMA progression grid. Returns the EMA metrics."""
    workdir, mesh, model, disc, g_tx, d_tx, init, state_sharding = _setup(config, workdir)
    abstract = loop.abstract_state(init, jax.random.key(0), state_sharding)
    evaluator = _make_evaluator(config, model, mesh)
    extras = aging_offline.AgingExtras(config, evaluator.eval_set, evaluator.batch_size)

    def evaluate_step(step: int) -> offline.StepResult:
        state = offline.restore_step(config, workdir, abstract, step)
        result = offline.StepResult(metrics={}, notes=list(extras.notes))
        for name, params in (("ema", state.ema_params), ("raw", state.g_params)):
            metrics, rows = extras.metrics(functools.partial(evaluator.age_faces, params))
            result.metrics[name] = {**evaluator.metrics(params), **metrics}
            if rows:
                result.per_target[name] = rows
        grid = evaluator.progression(state.ema_params)  # every process: the generator runs on the mesh
        if jax.process_index() == 0:
            visualize.save_png(grid, os.path.join(workdir, "samples", f"eval_{step:07d}.png"))
        return result

    return offline.run(config, workdir, evaluate_step, primary="ema")
