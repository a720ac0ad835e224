"""Trainer: CycleGAN (Zhu et al. 2017), the unpaired image-to-image teacher of PAPERS.md §B.

One jitted step does what the reference's `CycleGANModel.optimize_parameters` does, in its order:

  fake_b = G_A(a), rec_a = G_B(fake_b), fake_a = G_B(b), rec_b = G_A(fake_a), idt_a = G_A(b), idt_b = G_B(a)
  G step (D frozen):  GAN(D_A(fake_b), 1) + GAN(D_B(fake_a), 1) + lambda_A |rec_a - a| + lambda_B |rec_b - b|
                      + lambda_idt (lambda_B |idt_a - b| + lambda_A |idt_b - a|)
  D step:  D_A: 0.5 [GAN(D_A(b), 1) + GAN(D_A(pool_b(fake_b)), 0)],  D_B likewise on a and pool_a(fake_a)

G_A maps A -> B and D_A judges domain B (the reference's names). One Adam over (G_A, G_B) and one over
(D_A, D_B), as the reference's chained optimizers (Adam is elementwise, so this equals one per net).

Image pools (the reference's ImagePool, size 50): the D step sees, for each generated image, with the pool
not yet full the image itself (which is stored); once full, with probability 1/2 the image itself and
otherwise a random stored image, which the new one replaces. Here a pool is a fixed-size buffer plus a
count inside the train state, updated functionally in the jitted step with the step's RNG, so it is
checkpointed and a resumed run continues exactly (`query_pool`).

With config.trainer = "distill_cyclegan" this is the SRPKD students' trainer (ganjax/trainers/
distillation.py), bidirectional as in the paper: G_A and G_B each also learn from their frozen teacher
(output L1 and relation matrices on the real input of their direction: G_A on a, G_B on b), and the
discriminators start from the teacher's.

Loop (ganjax/trainers/loop.py): mesh -> data -> state -> restore -> jit steps -> loop with periodic log /
eval / samples / checkpoint. Resume order: latest checkpoint in workdir > config.init_from (generators
and/or discriminators of another run) > the teacher's discriminators (distillation) > fresh init.
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
from ganjax.trainers.common import check_choice, check_positive, require

GENERATORS = ("G_A", "G_B")  # G_A: A -> B, G_B: B -> A
DISCRIMINATORS = ("D_A", "D_B")  # D_A judges domain B (G_A's outputs), D_B judges domain A


# ---- Image pool ----------------------------------------------------------------------------------


@flax.struct.dataclass
class ImagePool:
    """The reference's ImagePool as data: `images` float32 (max(size, 1), H, W, C) and `count` int32, the
    number of slots filled so far (slots >= count hold zeros)."""

    images: jax.Array
    count: jax.Array

    @classmethod
    def create(cls, size: int, image_shape: tuple[int, ...]) -> ImagePool:
        # One slot even for size 0 (then unused): checkpoints never hold zero-size arrays.
        return cls(jnp.zeros((max(size, 1), *image_shape), jnp.float32), jnp.zeros((), jnp.int32))


def query_pool(pool: ImagePool, images: jax.Array, rng: jax.Array, size: int) -> tuple[ImagePool, jax.Array]:
    """The reference's `ImagePool.query` for a batch (B, H, W, C): returns (new pool, images for D).

    Images are handled one after another, as the reference's loop: while count < size the image is
    stored in slot `count` and returned; afterwards, with probability 1/2 (a uniform draw > 0.5) a
    uniformly chosen stored image is returned and replaced by the new one, else the new image is returned
    and the pool is unchanged. size 0 returns `images` and the pool untouched. Pure: the same rng gives
    the same result.
    """
    if size == 0:
        return pool, images
    keys = jax.random.split(rng, images.shape[0])

    def one(carry, inputs):
        buffer, count = carry
        image, key = inputs
        draw_key, slot_key = jax.random.split(key)
        filling = count < size
        swap = jax.random.uniform(draw_key) > 0.5
        slot = jnp.where(filling, count, jax.random.randint(slot_key, (), 0, size))
        stored = buffer[slot]
        returned = jnp.where(filling | ~swap, image, stored)
        buffer = buffer.at[slot].set(jnp.where(filling | swap, image, stored))
        return (buffer, count + filling.astype(jnp.int32)), returned

    (buffer, count), returned = jax.lax.scan(
        one, (pool.images, pool.count), (images.astype(pool.images.dtype), keys)
    )
    return ImagePool(buffer, count), returned.astype(images.dtype)


# ---- State and settings ----------------------------------------------------------------------------


@flax.struct.dataclass
class CycleGANState:
    """Everything a step reads and writes; checkpointed whole."""

    step: jax.Array  # int32 scalar: number of completed steps
    g_params: Any  # {"G_A": ..., "G_B": ...}
    g_batch_stats: Any  # their batch-norm running statistics ({"G_A": {}, ...} with instance norm)
    d_params: Any  # {"D_A": ..., "D_B": ...}
    d_batch_stats: Any
    g_opt_state: Any  # one Adam over both generators
    d_opt_state: Any  # one Adam over both discriminators
    fake_a_pool: ImagePool  # G_B's outputs, fed to D_B
    fake_b_pool: ImagePool  # G_A's outputs, fed to D_A


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """The plain (hashable) values a step needs, read once from the config."""

    seed: int
    adversarial: str
    cycle_a_weight: float
    cycle_b_weight: float
    identity_weight: float
    pool_size: int
    distill: distillation.DistillSettings | None = None  # None: a plain CycleGAN run

    @classmethod
    def from_config(cls, config) -> StepSettings:
        loss = config.loss
        return cls(
            seed=config.seed,
            adversarial=loss.adversarial,
            cycle_a_weight=loss.cycle_a_weight,
            cycle_b_weight=loss.cycle_b_weight,
            identity_weight=loss.identity_weight,
            pool_size=config.train.pool_size,
            distill=distillation.DistillSettings.from_config(config),
        )


# ---- Config validation ---------------------------------------------------------------------------


def validate_config(config) -> None:
    """Checks everything that can be checked without devices or data; raises ConfigError."""
    tc.check_data(config.data, paired=False)
    tc.check_networks(config)
    tc.check_training(config)
    check_choice("loss.adversarial", config.loss.adversarial, adversarial.ADVERSARIAL_LOSSES)
    for key in ("cycle_a_weight", "cycle_b_weight", "identity_weight"):
        check_positive(f"loss.{key}", config.loss[key], allow_zero=True)
    check_positive("train.pool_size", config.train.pool_size, allow_zero=True)
    require(
        config.loss.cycle_a_weight + config.loss.cycle_b_weight > 0 or config.loss.identity_weight == 0,
        "config.loss.identity_weight scales the cycle weights (the reference's lambda_identity), so it "
        "has no effect with both cycle weights 0; set it to 0 too.",
    )
    distillation.validate_config(config)


# ---- Models, optimizers, state -------------------------------------------------------------------


def init_state(rng, *, gen, disc, g_tx, d_tx, image_size: int, pool_size: int) -> CycleGANState:
    """Fresh parameters and empty pools; pure, so it can be jitted straight into its sharding."""
    keys = dict(zip(GENERATORS + DISCRIMINATORS, jax.random.split(rng, 4), strict=True))
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    g_vars = {name: gen.init(keys[name], images) for name in GENERATORS}
    d_vars = {name: disc.init(keys[name], images) for name in DISCRIMINATORS}
    g_params = {name: v["params"] for name, v in g_vars.items()}
    d_params = {name: v["params"] for name, v in d_vars.items()}
    image_shape = (image_size, image_size, 3)
    return CycleGANState(
        step=jnp.zeros((), jnp.int32),
        g_params=g_params,
        g_batch_stats={name: v.get("batch_stats", {}) for name, v in g_vars.items()},
        d_params=d_params,
        d_batch_stats={name: v.get("batch_stats", {}) for name, v in d_vars.items()},
        g_opt_state=g_tx.init(g_params),
        d_opt_state=d_tx.init(d_params),
        fake_a_pool=ImagePool.create(pool_size, image_shape),
        fake_b_pool=ImagePool.create(pool_size, image_shape),
    )


# ---- The step ------------------------------------------------------------------------------------


def train_step(
    state: CycleGANState,
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
    """One update of both generators, then one of both discriminators (the reference's order).

    batch: a and b, float32 (B, H, W, 3) in [-1, 1], unpaired. teacher_variables / teacher: the frozen
    teachers {"G_A": variables, "G_B": variables} and their module when distilling (settings.distill),
    else {} / None. Returns (new state, metrics of float32 scalars).
    """
    s = settings
    real_a, real_b = batch["a"], batch["b"]
    rng = jax.random.fold_in(jax.random.key(s.seed), state.step)
    dropout_rng, pool_a_rng, pool_b_rng = jax.random.split(rng, 3)
    feature_names = s.distill.feature_names if s.distill else ()
    if s.distill:
        teacher_a = distillation.teacher_forward(
            teacher, teacher_variables["G_A"], real_a, s.distill, jax.random.fold_in(rng, 100)
        )
        teacher_b = distillation.teacher_forward(
            teacher, teacher_variables["G_B"], real_b, s.distill, jax.random.fold_in(rng, 101)
        )

    def run(module, params, stats, name, x, call, features=()):
        """Applies network `name` in train mode; returns (output, its updated batch statistics), the
        output being (image, {layer: feature}) when `features` names taps."""
        out, new_vars = module.apply(
            {"params": params[name], "batch_stats": stats[name]},
            x,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.fold_in(dropout_rng, call)},
            **({"return_features": features} if features else {}),
        )
        return out, {**stats, name: new_vars["batch_stats"]}

    def generator_loss(g_params):
        g_stats, d_stats = state.g_batch_stats, state.d_batch_stats
        # The reference's forward(), then backward_G()'s identity passes, in its order.
        fake_b, g_stats = run(gen, g_params, g_stats, "G_A", real_a, 0, feature_names)
        if feature_names:
            fake_b, features_a = fake_b
        rec_a, g_stats = run(gen, g_params, g_stats, "G_B", fake_b, 1)
        fake_a, g_stats = run(gen, g_params, g_stats, "G_B", real_b, 2, feature_names)
        if feature_names:
            fake_a, features_b = fake_a
        rec_b, g_stats = run(gen, g_params, g_stats, "G_A", fake_a, 3)
        losses, weights = {}, {}
        if s.identity_weight > 0:
            idt_a, g_stats = run(gen, g_params, g_stats, "G_A", real_b, 4)
            idt_b, g_stats = run(gen, g_params, g_stats, "G_B", real_a, 5)
            losses["idt_a"], weights["idt_a"] = l1(idt_a, real_b), s.identity_weight * s.cycle_b_weight
            losses["idt_b"], weights["idt_b"] = l1(idt_b, real_a), s.identity_weight * s.cycle_a_weight
        logits_b, d_stats = run(disc, state.d_params, d_stats, "D_A", fake_b, 6)
        logits_a, d_stats = run(disc, state.d_params, d_stats, "D_B", fake_a, 7)
        losses["g_a"], weights["g_a"] = adversarial.generator_loss(s.adversarial, logits_b), 1.0
        losses["g_b"], weights["g_b"] = adversarial.generator_loss(s.adversarial, logits_a), 1.0
        losses["cycle_a"], weights["cycle_a"] = l1(rec_a, real_a), s.cycle_a_weight
        losses["cycle_b"], weights["cycle_b"] = l1(rec_b, real_b), s.cycle_b_weight
        if s.distill:  # G_A against its teacher on a, G_B against its teacher on b
            for student_out, student_features, (teacher_out, teacher_features), suffix in (
                (fake_b, features_a if feature_names else {}, teacher_a, "_a"),
                (fake_a, features_b if feature_names else {}, teacher_b, "_b"),
            ):
                kd, kd_weights = distillation.student_losses(
                    s.distill, student_out, student_features, teacher_out, teacher_features, suffix
                )
                losses.update(kd)
                weights.update(kd_weights)
        total = sum(weights[k] * losses[k] for k in losses)
        return total, (losses, fake_a, fake_b, g_stats, d_stats)

    (g_total, (g_losses, fake_a, fake_b, g_batch_stats, d_batch_stats)), g_grads = jax.value_and_grad(
        generator_loss, has_aux=True
    )(state.g_params)
    g_updates, g_opt_state = g_tx.update(g_grads, state.g_opt_state, state.g_params)
    g_params = optax.apply_updates(state.g_params, g_updates)

    # D step on pooled fakes (the generators' outputs of this step's forward pass, before their update).
    fake_b = jax.lax.stop_gradient(fake_b)
    fake_a = jax.lax.stop_gradient(fake_a)
    fake_b_pool, pooled_b = query_pool(state.fake_b_pool, fake_b, pool_b_rng, s.pool_size)
    fake_a_pool, pooled_a = query_pool(state.fake_a_pool, fake_a, pool_a_rng, s.pool_size)

    def discriminator_loss(d_params):
        stats, losses = d_batch_stats, {}
        for name, real, fake, call in (("D_A", real_b, pooled_b, 8), ("D_B", real_a, pooled_a, 10)):
            real_logits, stats = run(disc, d_params, stats, name, real, call)
            fake_logits, stats = run(disc, d_params, stats, name, fake, call + 1)
            losses[name.lower()] = adversarial.discriminator_loss(s.adversarial, real_logits, fake_logits)
        return losses["d_a"] + losses["d_b"], (losses, stats)

    (d_total, (d_losses, d_batch_stats)), d_grads = jax.value_and_grad(discriminator_loss, has_aux=True)(
        state.d_params
    )
    d_updates, d_opt_state = d_tx.update(d_grads, state.d_opt_state, state.d_params)
    d_params = optax.apply_updates(state.d_params, d_updates)

    new_state = state.replace(
        step=state.step + 1,
        g_params=g_params,
        g_batch_stats=g_batch_stats,
        d_params=d_params,
        d_batch_stats=d_batch_stats,
        g_opt_state=g_opt_state,
        d_opt_state=d_opt_state,
        fake_a_pool=fake_a_pool,
        fake_b_pool=fake_b_pool,
    )
    metrics = {
        "g_total": g_total,
        "d_total": d_total,
        **g_losses,
        **d_losses,
        "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
        "g_grad_norm": common.tree_norm(g_grads),
        "d_grad_norm": common.tree_norm(d_grads),
        "g_param_norm": common.tree_norm(g_params),
        "d_param_norm": common.tree_norm(d_params),
    }
    # Per network too: one diverging direction hides in the pair's total.
    for grads, params in ((g_grads, g_params), (d_grads, d_params)):
        for name in grads:  # G_A, G_B / D_A, D_B
            metrics[f"{name}_grad_norm"] = common.tree_norm(grads[name])
            metrics[f"{name}_param_norm"] = common.tree_norm(params[name])
    return new_state, metrics


# ---- Evaluation ----------------------------------------------------------------------------------


class CycleGANEvaluator:
    """Both directions: ground-truth metrics (synthetic scenes) and grids of input, output,
    reconstruction (and the true translation where the test set is paired)."""

    def __init__(self, config, gen, mesh):
        self.config = config
        self.tests = tc.load_test_sets(config, both_directions=True)  # AtoB (G_A), BtoA (G_B)
        self.batch_size = tc.eval_batch_size(config, mesh)
        self._translate = translation_in_loop.make_translate_fn(
            gen, train_mode=config.eval.train_mode, seed=config.seed
        )
        self._mesh = mesh

    def _run(self, state: CycleGANState, name: str, inputs: np.ndarray) -> np.ndarray:
        variables = {"params": state.g_params[name], "batch_stats": state.g_batch_stats[name]}

        def translate(images, indices):
            batch = sharding.put_replicated_batch((images, indices), self._mesh)
            return sharding.to_host(self._translate(variables, *batch))  # rows of all processes

        test = translation_in_loop.TestSet(name, inputs)
        return translation_in_loop.translate_all(translate, test, self.batch_size)

    def metrics(self, state: CycleGANState) -> dict[str, float]:
        """{"AtoB/gt_l1", ..., "BtoA/pixel_accuracy", ...}; {} without ground truth."""
        if not tc.has_ground_truth(self.config):
            return {}
        out = {}
        n = self.config.eval.num_examples
        for test, name in zip(self.tests, GENERATORS, strict=True):
            test = dataclasses.replace(
                test,
                inputs=test.inputs[:n],
                targets=test.targets[:n],
                labels=None if test.labels is None else test.labels[:n],
            )
            scores = translation_in_loop.scores(self._run(state, name, test.inputs), test)
            out.update({f"{test.name}/{k}": v for k, v in scores.items()})
        return out

    def grids(self, state: CycleGANState) -> dict[str, np.ndarray]:
        """{"AtoB": uint8 picture, "BtoA": ...}: rows = the first log.sample_images test images."""
        grids = {}
        for test, (forward, backward) in zip(self.tests, (GENERATORS, GENERATORS[::-1]), strict=True):
            rows = tc.sample_rows(test, self.config.log.sample_images)
            inputs = test.inputs[rows]
            outputs = self._run(state, forward, inputs)
            cycled = self._run(state, backward, outputs)
            columns, names = [inputs, outputs, cycled], ["input", "output", "cycle"]
            if test.targets is not None:
                columns.append(test.targets[rows])
                names.append("target")
            grids[test.name] = translation_in_loop.translation_grid(columns, names)
        return grids


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
        init_state,
        gen=gen,
        disc=disc,
        g_tx=tx,
        d_tx=tx,
        image_size=config.data.crop_size,
        pool_size=config.train.pool_size,
    )
    state_sharding = sharding.state_shardings(jax.eval_shape(init, tc.init_key(0)), mesh, config.mesh)
    return workdir, mesh, gen, disc, tx, schedule, init, state_sharding


def _write_samples(writer, evaluator: CycleGANEvaluator, state, step: int, workdir: str, prefix: str) -> None:
    grids = evaluator.grids(state)
    writer.write_images(step, {f"samples/{name}": grid[None] for name, grid in grids.items()})
    if jax.process_index() == 0:
        for name, grid in grids.items():
            visualize.save_png(grid, os.path.join(workdir, "samples", f"{prefix}_{name}_{step:07d}.png"))


def train(config, workdir: str) -> CycleGANState:
    """Trains (or resumes) CycleGAN, or distils both CycleGAN students; returns the final state."""
    # ---- Setup: mesh, models, writers ------------------------------------------------------------
    workdir, mesh, gen, disc, tx, schedule, init, state_sharding = _setup(config, workdir)
    writer = common.create_writer(workdir)
    writer.write_hparams(common.flatten_config(config))
    common.save_run_config(workdir, config)

    # ---- Data --------------------------------------------------------------------------------------
    train_iter = translation_pipeline.make_unpaired_iterator(
        config.data,
        global_batch_size=config.train.batch_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    evaluator = CycleGANEvaluator(config, gen, mesh)

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
        teacher_generators=GENERATORS,
        evaluate=evaluator.metrics,
        write_samples=lambda state, step: _write_samples(
            writer, evaluator, state, step, workdir, "translation"
        ),
    )


def evaluate(config, workdir: str) -> dict[str, float]:
    """--mode eval (ganjax/evaluation/offline.py): the checkpoint(s) that config.eval.step / watch name,
    in-loop metrics plus FID/KID and a user segmenter's FCN-score per direction (translation_offline); writes
    WORKDIR/eval/ and sample grids. Returns the metrics (raw weights: CycleGAN keeps no EMA)."""
    workdir, mesh, gen, disc, tx, schedule, init, state_sharding = _setup(config, workdir)
    abstract = loop.abstract_state(init, tc.init_key(0), state_sharding)
    evaluator = CycleGANEvaluator(config, gen, mesh)
    extras = translation_offline.TranslationExtras(config, mesh, evaluator.batch_size, ("AtoB", "BtoA"))
    generator_of = {"AtoB": GENERATORS[0], "BtoA": GENERATORS[1]}
    writer = common.create_writer(workdir)

    def evaluate_step(step: int) -> offline.StepResult:
        state = offline.restore_step(config, workdir, abstract, step)
        metrics = evaluator.metrics(state)
        per_direction = extras.metrics(
            lambda test: evaluator._run(state, generator_of[test.name], test.inputs)
        )
        metrics.update({f"{d}/{k}": v for d, scores in per_direction.items() for k, v in scores.items()})
        _write_samples(writer, evaluator, state, step, workdir, "eval")
        return offline.StepResult(metrics={"raw": metrics}, notes=list(extras.notes))

    try:
        return offline.run(config, workdir, evaluate_step, primary="raw")
    finally:
        writer.close()
