"""Trainer: the independent age regressor that judges aged faces (ganjax/models/age_regressor.py).

PAPERS.md §A evaluates aging by the age an *independent* estimator reads off the generated faces. This
trainer fits that estimator on the real train faces of the aging data (same TFDS builder, same split):

  logits = R(x) (dropout on);  loss = w_ce CE(logits, two_hot(age)) + w_l1 |sum_k k softmax(logits)_k - age|

with AdamW (linear warm-up, then cosine decay to 0). The in-loop evaluation is the MAE of the expected age
on the test split (and cs5, the share within 5 years); `--mode eval` writes the same for a checkpoint to
WORKDIR/eval/ (ganjax/evaluation/offline.py). The aging run's evaluation loads the result through
config.eval.regressor (ganjax/evaluation/age_accuracy.py).

Loop (ganjax/trainers/loop.py): mesh -> data -> state -> restore -> jit step -> loop with periodic log /
eval / checkpoint (no sample pictures). Resume order: latest checkpoint in workdir > fresh init.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import parameter_overview

from ganjax import sharding
from ganjax.data import pipeline
from ganjax.evaluation import offline
from ganjax.evaluation.batching import batched
from ganjax.losses import aging as aging_losses
from ganjax.models.age_regressor import AgeRegressor, build_regressor, predict_age
from ganjax.trainers import common, loop
from ganjax.trainers.common import check_choice, check_positive, require

DATASETS = ("synthetic_faces", "utkface")
CS_YEARS = 5.0  # cumulative score threshold: the share of faces estimated within this many years


@flax.struct.dataclass
class RegressorState:
    """Everything a step reads and writes; checkpointed whole."""

    step: jax.Array  # int32 scalar: number of completed steps
    params: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class StepSettings:
    seed: int
    cross_entropy_weight: float
    l1_weight: float


# ---- Config validation ---------------------------------------------------------------------------


def validate_config(config) -> None:
    """Checks everything that can be checked without devices or data; raises ConfigError."""
    data, model, train = config.data, config.model, config.train
    check_choice("data.name", data.name, DATASETS)
    require(model.num_ages >= 2, f"config.model.num_ages = {model.num_ages} must be >= 2.")
    require(len(model.features) >= 1, "config.model.features must name at least one stage width.")
    for width in model.features:
        check_positive("model.features[*]", width)
    check_positive("model.convs_per_stage", model.convs_per_stage)
    require(0 <= model.dropout < 1, f"config.model.dropout = {model.dropout} not in [0, 1).")
    factor = 2 ** (len(model.features) - 1)
    require(
        data.size % factor == 0,
        f"config.data.size = {data.size} must be a multiple of {factor} (2 ** (stages - 1) max-pools).",
    )
    for key in ("cross_entropy_weight", "l1_weight"):
        check_positive(f"loss.{key}", config.loss[key], allow_zero=True)
    require(
        config.loss.cross_entropy_weight + config.loss.l1_weight > 0,
        "config.loss: cross_entropy_weight and l1_weight are both 0; nothing would be trained.",
    )
    for key in ("num_steps", "batch_size", "learning_rate"):
        check_positive(f"train.{key}", train[key])
    check_positive("train.weight_decay", train.weight_decay, allow_zero=True)
    require(
        0 <= train.warmup_steps < train.num_steps,
        f"config.train.warmup_steps = {train.warmup_steps} must be in [0, train.num_steps).",
    )
    for key in ("log.every_steps", "log.sample_every_steps", "eval.every_steps", "eval.batch_size"):
        section, name = key.split(".")
        check_positive(key, config[section][name])
    check_positive("data.eval_examples", data.eval_examples)
    check_positive("checkpoint.every_steps", config.checkpoint.every_steps)
    check_positive("checkpoint.keep", config.checkpoint.keep)


# ---- Model, optimizer, state -------------------------------------------------------------------


def build_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    train = config.train
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, train.learning_rate, train.warmup_steps, train.num_steps, end_value=0.0
    )
    return optax.adamw(schedule, weight_decay=train.weight_decay), schedule


def init_state(rng, *, model: AgeRegressor, tx, image_size: int) -> RegressorState:
    """Fresh parameters; pure, so it can be jitted straight into its sharding."""
    params = model.init(rng, jnp.zeros((1, image_size, image_size, 3), jnp.float32))["params"]
    return RegressorState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


# ---- The step ------------------------------------------------------------------------------------


def train_step(state: RegressorState, batch, *, model, tx, schedule, settings: StepSettings):
    """batch: image float32 (B, S, S, 3) in [-1, 1], age float32 (B,). Returns (new state, metrics)."""
    images, ages = batch["image"], batch["age"]
    dropout_rng = jax.random.fold_in(jax.random.key(settings.seed), state.step)

    def loss_fn(params):
        logits = model.apply({"params": params}, images, train=True, rngs={"dropout": dropout_rng})
        predicted = predict_age(logits)
        cross_entropy = aging_losses.age_cross_entropy(logits, ages)
        l1 = jnp.mean(jnp.abs(predicted - ages))
        total = settings.cross_entropy_weight * cross_entropy + settings.l1_weight * l1
        return total, {"cross_entropy": cross_entropy, "l1": l1}

    (total, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": total,
        **losses,
        "train_mae": losses["l1"],  # the batch MAE of the expected age, before the update
        "grad_norm": common.tree_norm(grads),
        "param_norm": common.tree_norm(params),
        "learning_rate": schedule(state.step),
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


# ---- Evaluation ------------------------------------------------------------------------------------


def age_errors(predicted: np.ndarray, ages: np.ndarray) -> dict[str, float]:
    """mae (years), mean_error (estimate - label: the bias), cs5 (share with |error| <= 5 years)."""
    error = np.asarray(predicted, np.float64) - np.asarray(ages, np.float64)
    return {
        "mae": float(np.mean(np.abs(error))),
        "mean_error": float(np.mean(error)),
        "cs5": float(np.mean(np.abs(error) <= CS_YEARS)),
    }


class RegressorEvaluator:
    """Age errors on the first data.eval_examples faces of the test split."""

    def __init__(self, config, model: AgeRegressor, mesh):
        self.eval_set = pipeline.load_eval_set(config.data, "test", config.data.eval_examples)
        dp = sharding.data_parallel_size(mesh)
        self.batch_size = -(-config.eval.batch_size // dp) * dp
        self._mesh = mesh
        # Replicated output: every process reads all rows (the batch is split over processes).
        self._predict = jax.jit(
            lambda params, images: predict_age(model.apply({"params": params}, images)),
            out_shardings=sharding.replicated(mesh),
        )

    def predict(self, params, images: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) float [-1, 1] -> float32 (N,) expected ages, batch-parallel on the mesh."""

        def one(x):
            return self._predict(params, sharding.put_replicated_batch(x, self._mesh))

        return batched(one, (images,), self.batch_size)

    def metrics(self, params) -> dict[str, float]:
        return age_errors(self.predict(params, self.eval_set["image"]), self.eval_set["age"])


# ---- Train and evaluate ------------------------------------------------------------------------


def _setup(config, workdir: str):
    """Shared by train and evaluate: mesh, model, optimizer, init and the state's sharding."""
    validate_config(config)
    workdir = common.check_workdir_writable(workdir)
    mesh = sharding.make_mesh(config.mesh.axes)
    common.check_batch_divisible(
        config.train.batch_size, sharding.data_parallel_size(mesh), jax.process_count()
    )
    model = build_regressor(config.model)
    tx, schedule = build_optimizer(config)
    init = functools.partial(init_state, model=model, tx=tx, image_size=config.data.size)
    state_sharding = sharding.state_shardings(jax.eval_shape(init, jax.random.key(0)), mesh, config.mesh)
    return workdir, mesh, model, tx, schedule, init, state_sharding


def train(config, workdir: str) -> RegressorState:
    """Trains (or resumes) the age regressor; returns the final state."""
    # ---- Setup: mesh, model, writers ---------------------------------------------------------------
    workdir, mesh, model, tx, schedule, init, state_sharding = _setup(config, workdir)
    writer = common.create_writer(workdir)
    writer.write_hparams(common.flatten_config(config))
    common.save_run_config(workdir, config)  # config.eval.regressor users rebuild the network from it

    # ---- Data --------------------------------------------------------------------------------------
    train_iter = pipeline.make_train_iterator(
        config.data,
        global_batch_size=config.train.batch_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    evaluator = RegressorEvaluator(config, model, mesh)

    # ---- State: fresh, then restored from the workdir if a checkpoint exists ------------------
    state = jax.jit(init, out_shardings=state_sharding)(jax.random.key(config.seed))
    parameter_overview.log_parameter_overview(state.params, msg="age regressor")
    ckpt = loop.open_checkpointer(config, workdir)
    state, _ = loop.restore_latest(ckpt, state, train_iter)

    # ---- Compiled step -------------------------------------------------------------------------
    settings = StepSettings(config.seed, config.loss.cross_entropy_weight, config.loss.l1_weight)
    step_fn = jax.jit(
        functools.partial(train_step, model=model, tx=tx, schedule=schedule, settings=settings),
        in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=0,
    )

    return loop.train_loop(
        config,
        state=state,
        step_fn=step_fn,
        train_iter=train_iter,
        mesh=mesh,
        ckpt=ckpt,
        writer=writer,
        evaluate=lambda state: evaluator.metrics(state.params),
        write_samples=lambda state, step: None,  # a regressor has no pictures to show
    )


def evaluate(config, workdir: str) -> dict[str, float]:
    """--mode eval (ganjax/evaluation/offline.py): test-split age errors of the checkpoint(s) config.eval
    names, written to WORKDIR/eval/; returns those of the last one."""
    workdir, mesh, model, tx, schedule, init, state_sharding = _setup(config, workdir)
    abstract = loop.abstract_state(init, jax.random.key(0), state_sharding)
    evaluator = RegressorEvaluator(config, model, mesh)

    def evaluate_step(step: int) -> offline.StepResult:
        state = offline.restore_step(config, workdir, abstract, step)
        return offline.StepResult(metrics={"raw": evaluator.metrics(state.params)})

    return offline.run(config, workdir, evaluate_step, primary="raw")
