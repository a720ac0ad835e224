"""Trainer: pix2pix (Isola et al. 2017), the paired image-to-image teacher of PAPERS.md §B.

One jitted step does what the reference's `Pix2PixModel.optimize_parameters` does, in its order:

  fake = G(a)                                          (train mode: batch statistics, dropout)
  D step:  0.5 * [BCE(D(a, fake), 0) + BCE(D(a, b), 1)]  (conditional PatchGAN on concat(input, image))
  G step:  BCE(D'(a, fake), 1) + l1_weight * |fake - b|_1, with D' = the discriminator just updated

G is run forward once; its gradient is pulled back through that one forward pass (`jax.vjp`) after the D
update, exactly as PyTorch reuses the graph of `forward()`. Batch-norm running statistics of G and D
are part of the state (D's are updated by each of its three forward passes, as in the reference).
Adam (2e-4, beta1 0.5) for both networks, constant then linearly decaying learning rate.

With config.trainer = "distill_pix2pix" this is the SRPKD student's trainer (ganjax/trainers/
distillation.py): the G step also pulls the generator towards a frozen teacher's output and relation
matrices, and the discriminator starts from the teacher's.

Loop (ganjax/trainers/loop.py): mesh -> data -> state -> restore -> jit steps -> loop with periodic log /
eval / samples / checkpoint. Resume order: latest checkpoint in workdir > config.init_from (generator
and/or discriminator of another run) > the teacher's discriminator (distillation) > fresh init.
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

from ganjax import sharding, visualize
from ganjax.data import translation_pipeline
from ganjax.evaluation import offline, translation_in_loop, translation_offline
from ganjax.losses import adversarial
from ganjax.losses.aging import l1
from ganjax.trainers import common, distillation, loop
from ganjax.trainers import translation_common as tc
from ganjax.trainers.common import check_choice, check_positive


@flax.struct.dataclass
class Pix2PixState:
    """Everything a step reads and writes; checkpointed whole."""

    step: jax.Array  # int32 scalar: number of completed steps
    g_params: Any  # generator
    g_batch_stats: Any  # its batch-norm running statistics ({} with instance norm)
    d_params: Any  # conditional PatchGAN (6 input channels)
    d_batch_stats: Any
    g_opt_state: Any
    d_opt_state: Any


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """The plain (hashable) values a step needs, read once from the config."""

    seed: int
    adversarial: str
    l1_weight: float
    distill: distillation.DistillSettings | None = None  # None: a plain pix2pix run

    @classmethod
    def from_config(cls, config) -> StepSettings:
        return cls(
            seed=config.seed,
            adversarial=config.loss.adversarial,
            l1_weight=config.loss.l1_weight,
            distill=distillation.DistillSettings.from_config(config),
        )


# ---- Config validation ---------------------------------------------------------------------------


def validate_config(config) -> None:
    """Checks everything that can be checked without devices or data; raises ConfigError."""
    tc.check_data(config.data, paired=True)
    tc.check_networks(config)
    tc.check_training(config)
    check_choice("loss.adversarial", config.loss.adversarial, adversarial.ADVERSARIAL_LOSSES)
    check_positive("loss.l1_weight", config.loss.l1_weight, allow_zero=True)
    distillation.validate_config(config)


# ---- Models, optimizers, state -------------------------------------------------------------------


def init_state(rng, *, gen, disc, g_tx, d_tx, image_size: int) -> Pix2PixState:
    """Fresh parameters; pure, so it can be jitted straight into its sharding."""
    g_rng, d_rng = jax.random.split(rng)
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    g_vars = gen.init(g_rng, images)
    d_vars = disc.init(d_rng, jnp.concatenate([images, images], axis=-1))
    return Pix2PixState(
        step=jnp.zeros((), jnp.int32),
        g_params=g_vars["params"],
        g_batch_stats=g_vars.get("batch_stats", {}),
        d_params=d_vars["params"],
        d_batch_stats=d_vars.get("batch_stats", {}),
        g_opt_state=g_tx.init(g_vars["params"]),
        d_opt_state=d_tx.init(d_vars["params"]),
    )


# ---- The step ------------------------------------------------------------------------------------


def train_step(
    state: Pix2PixState,
    batch,
    teacher_variables,
    *,
    gen,
    disc,
    teacher,
    g_tx,
    d_tx,
    schedule,
    settings: StepSettings,
):
    """One D update, then one G update against the new D (the reference's order).

    batch: a (input) and b (target), float32 (B, H, W, 3) in [-1, 1]. teacher_variables / teacher: the
    frozen teacher generator's variables and module when distilling (settings.distill), else {} / None.
    Returns (new state, metrics of float32 scalars).
    """
    s = settings
    real_a, real_b = batch["a"], batch["b"]
    rng = jax.random.fold_in(jax.random.key(s.seed), state.step)
    feature_names = s.distill.feature_names if s.distill else ()
    if s.distill:
        teacher_out, teacher_features = distillation.teacher_forward(
            teacher, teacher_variables, real_a, s.distill, jax.random.fold_in(rng, 1)
        )

    def generate(g_params):
        out, new_vars = gen.apply(
            {"params": g_params, "batch_stats": state.g_batch_stats},
            real_a,
            train=True,
            return_features=feature_names,
            mutable=["batch_stats"],
            rngs={"dropout": rng},
        )
        fake, features = out if feature_names else (out, {})
        return (fake, features), new_vars["batch_stats"]

    def discriminate(d_params, d_stats, image):
        logits, new_vars = disc.apply(
            {"params": d_params, "batch_stats": d_stats},
            jnp.concatenate([real_a, image], axis=-1),
            train=True,
            mutable=["batch_stats"],
        )
        return logits, new_vars["batch_stats"]

    (fake_b, features), g_vjp, g_batch_stats = jax.vjp(generate, state.g_params, has_aux=True)

    # D: fake pairs, then real pairs (separate forward passes, so separate batch statistics).
    def discriminator_loss(d_params):
        fake_logits, stats = discriminate(d_params, state.d_batch_stats, jax.lax.stop_gradient(fake_b))
        real_logits, stats = discriminate(d_params, stats, real_b)
        loss = adversarial.discriminator_loss(s.adversarial, real_logits, fake_logits)
        return loss, (stats, jnp.mean(real_logits), jnp.mean(fake_logits))

    (d_total, (d_batch_stats, real_logit, fake_logit)), d_grads = jax.value_and_grad(
        discriminator_loss, has_aux=True
    )(state.d_params)
    d_updates, d_opt_state = d_tx.update(d_grads, state.d_opt_state, state.d_params)
    d_params = optax.apply_updates(state.d_params, d_updates)

    # G: against the updated D, as the reference (it steps optimizer_D before backward_G).
    # The loss is a function of G's output (and tapped features), pulled back through G's one forward pass.
    def generator_loss(outputs):
        fake, features = outputs
        logits, stats = discriminate(d_params, d_batch_stats, fake)
        losses = {
            "g_adversarial": adversarial.generator_loss(s.adversarial, logits),
            "g_l1": l1(fake, real_b),
        }
        weights = {"g_adversarial": 1.0, "g_l1": s.l1_weight}
        if s.distill:
            kd, kd_weights = distillation.student_losses(
                s.distill, fake, features, teacher_out, teacher_features
            )
            losses, weights = {**losses, **kd}, {**weights, **kd_weights}
        return sum(weights[k] * losses[k] for k in losses), (losses, stats)

    (g_total, (g_losses, d_batch_stats)), outputs_grad = jax.value_and_grad(generator_loss, has_aux=True)(
        (fake_b, features)
    )
    (g_grads,) = g_vjp(outputs_grad)
    g_updates, g_opt_state = g_tx.update(g_grads, state.g_opt_state, state.g_params)
    g_params = optax.apply_updates(state.g_params, g_updates)

    new_state = state.replace(
        step=state.step + 1,
        g_params=g_params,
        g_batch_stats=g_batch_stats,
        d_params=d_params,
        d_batch_stats=d_batch_stats,
        g_opt_state=g_opt_state,
        d_opt_state=d_opt_state,
    )
    metrics = {
        "g_total": g_total,
        "d_total": d_total,
        **g_losses,
        "d_real_logit": real_logit,
        "d_fake_logit": fake_logit,
        "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
        "g_grad_norm": common.tree_norm(g_grads),
        "d_grad_norm": common.tree_norm(d_grads),
        "g_param_norm": common.tree_norm(g_params),
        "d_param_norm": common.tree_norm(d_params),
    }
    return new_state, metrics


# ---- Evaluation ----------------------------------------------------------------------------------


class Pix2PixEvaluator:
    """Ground-truth metrics (synthetic scenes) and (input, output, target) grids of the test images."""

    def __init__(self, config, gen, mesh):
        self.config = config
        (self.test,) = tc.load_test_sets(config, both_directions=False)
        self.batch_size = tc.eval_batch_size(config, mesh)
        self._translate = translation_in_loop.make_translate_fn(
            gen, train_mode=config.eval.train_mode, seed=config.seed
        )
        self._mesh = mesh

    def _outputs(self, state: Pix2PixState, test) -> np.ndarray:
        variables = {"params": state.g_params, "batch_stats": state.g_batch_stats}

        def translate(images, indices):
            batch = sharding.put_replicated_batch((images, indices), self._mesh)
            return sharding.to_host(self._translate(variables, *batch))  # rows of all processes

        return translation_in_loop.translate_all(translate, test, self.batch_size)

    def metrics(self, state: Pix2PixState) -> dict[str, float]:
        if not tc.has_ground_truth(self.config):
            return {}
        n = min(self.config.eval.num_examples, len(self.test.inputs))
        test = dataclasses.replace(
            self.test,
            inputs=self.test.inputs[:n],
            targets=self.test.targets[:n],
            labels=None if self.test.labels is None else self.test.labels[:n],
        )
        return translation_in_loop.scores(self._outputs(state, test), test)

    def grid(self, state: Pix2PixState) -> np.ndarray:
        """uint8 picture: rows = the first log.sample_images test images; columns input, output, target."""
        rows = tc.sample_rows(self.test, self.config.log.sample_images)
        test = dataclasses.replace(self.test, inputs=self.test.inputs[rows])
        outputs = self._outputs(state, test)
        return translation_in_loop.translation_grid(
            [test.inputs, outputs, self.test.targets[rows]], ["input", "output", "target"]
        )


# ---- Train and evaluate ------------------------------------------------------------------------


def _setup(config, workdir: str):
    """Shared by train and evaluate: mesh, models, abstract state and its sharding."""
    validate_config(config)
    workdir = common.check_workdir_writable(workdir)
    mesh = sharding.make_mesh(config.mesh.axes)
    common.check_batch_divisible(
        config.train.batch_size, sharding.data_parallel_size(mesh), jax.process_count()
    )
    gen, disc = tc.make_generator(config), tc.make_discriminator(config)
    tx, schedule = tc.make_optimizer(config)
    init = functools.partial(
        init_state, gen=gen, disc=disc, g_tx=tx, d_tx=tx, image_size=config.data.crop_size
    )
    state_sharding = sharding.state_shardings(jax.eval_shape(init, tc.init_key(0)), mesh, config.mesh)
    return workdir, mesh, gen, disc, tx, schedule, init, state_sharding


def _write_samples(writer, evaluator: Pix2PixEvaluator, state, step: int, workdir: str, prefix: str) -> None:
    grid = evaluator.grid(state)
    writer.write_images(step, {"samples/AtoB": grid[None]})
    if jax.process_index() == 0:
        visualize.save_png(grid, os.path.join(workdir, "samples", f"{prefix}_{step:07d}.png"))


def train(config, workdir: str) -> Pix2PixState:
    """Trains (or resumes) pix2pix, or distils a pix2pix student; returns the final state."""
    # ---- Setup: mesh, models, writers ------------------------------------------------------------
    workdir, mesh, gen, disc, tx, schedule, init, state_sharding = _setup(config, workdir)
    writer = common.create_writer(workdir)
    writer.write_hparams(common.flatten_config(config))
    common.save_run_config(workdir, config)

    # ---- Data --------------------------------------------------------------------------------------
    train_iter = translation_pipeline.make_paired_iterator(
        config.data,
        global_batch_size=config.train.batch_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    evaluator = Pix2PixEvaluator(config, gen, mesh)

    return tc.train_translation(
        config,
        workdir,
        mesh=mesh,
        init=init,
        state_sharding=state_sharding,
        writer=writer,
        train_iter=train_iter,
        train_step=train_step,
        step_kwargs=dict(
            gen=gen,
            disc=disc,
            g_tx=tx,
            d_tx=tx,
            schedule=schedule,
            settings=StepSettings.from_config(config),
        ),
        teacher_generators=None,
        evaluate=evaluator.metrics,
        write_samples=lambda state, step: _write_samples(
            writer, evaluator, state, step, workdir, "translation"
        ),
    )


def evaluate(config, workdir: str) -> dict[str, float]:
    """--mode eval (ganjax/evaluation/offline.py): the checkpoint(s) that config.eval.step / watch name,
    in-loop metrics plus FID/KID and a user segmenter's FCN-score (translation_offline); writes
    WORKDIR/eval/ and a sample grid. Returns the metrics (raw weights: pix2pix keeps no EMA)."""
    workdir, mesh, gen, disc, tx, schedule, init, state_sharding = _setup(config, workdir)
    abstract = loop.abstract_state(init, tc.init_key(0), state_sharding)
    evaluator = Pix2PixEvaluator(config, gen, mesh)
    extras = translation_offline.TranslationExtras(config, mesh, evaluator.batch_size, ("AtoB",))
    writer = common.create_writer(workdir)

    def evaluate_step(step: int) -> offline.StepResult:
        state = offline.restore_step(config, workdir, abstract, step)
        metrics = evaluator.metrics(state)
        metrics.update(extras.metrics(lambda test: evaluator._outputs(state, test)).get("AtoB", {}))
        _write_samples(writer, evaluator, state, step, workdir, "eval")
        return offline.StepResult(metrics={"raw": metrics}, notes=list(extras.notes))

    try:
        return offline.run(config, workdir, evaluate_step, primary="raw")
    finally:
        writer.close()
