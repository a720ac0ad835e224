"""Pieces shared by the image-to-image trainers (pix2pix, CycleGAN): config checks, networks, optimizer,
the training run after the data (state, frozen teacher, compiled step, loop), test sets and sample grids.

Config blocks read here (documented knob by knob in configs/pix2pix_cityscapes.py and
configs/cyclegan_horse2zebra.py):
  data.*        the translation data keys of `ganjax.data.image_folders.make_translation_builder`
  dtype         compute dtype of both networks ("float32" | "bfloat16"; parameters stay float32)
  model.*       generator, ngf, norm, dropout, conv_impl
  disc.*        features, num_layers, norm
  train.*       num_steps, decay_steps, batch_size, learning_rate, b1, b2
  init_from.*   generator, discriminator: paths of runs to start the networks from ("" = fresh)
  log.*, eval.*, checkpoint.*, mesh.axes
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import numpy as np
import optax
from absl import logging
from clu import parameter_overview

from ganjax import sharding
from ganjax.data import translation_pipeline
from ganjax.data.image_folders import TRANSLATION_DATASETS
from ganjax.evaluation.translation_in_loop import TestSet
from ganjax.models.discriminators import PatchDiscriminator
from ganjax.models.generators import GENERATOR_ARCHS, build_generator
from ganjax.models.layers import CONV_IMPLS, NORMS
from ganjax.trainers import common, distillation, loop
from ganjax.trainers.common import check_choice, check_positive, require

# How many times a generator halves the image: the crop size must be a multiple of 2**this.
GENERATOR_DOWNSAMPLING = {"resnet_9blocks": 2, "resnet_6blocks": 2, "unet_256": 8, "unet_128": 7}


# ---- Config validation ---------------------------------------------------------------------------


def check_data(data, *, paired: bool) -> None:
    """data.* of a translation config; `paired` for trainers that need (input, target) pairs."""
    check_choice("data.name", data.name, TRANSLATION_DATASETS)
    check_choice("data.direction", data.direction, translation_pipeline.DIRECTIONS)
    require(
        not (paired and data.name == "unaligned_folders"),
        "config.data.name = 'unaligned_folders' (trainA/trainB) has no pairs for a paired trainer; use "
        "'aligned_folders' (side-by-side AB images) or 'synthetic_scenes', or train CycleGAN instead.",
    )
    check_positive("data.crop_size", data.crop_size)
    require(
        data.crop_size <= data.load_size,
        f"config.data.crop_size = {data.crop_size} must be <= data.load_size = {data.load_size} "
        "(train images are resized to load_size, then randomly cropped).",
    )
    check_positive("data.num_workers", data.num_workers, allow_zero=True)
    if data.name == "synthetic_scenes":
        s = data.synthetic
        for key in ("domain_a", "domain_b"):
            check_choice(f"data.synthetic.{key}", s[key], translation_pipeline.SYNTHETIC_DOMAINS)
        require(
            s.domain_a != s.domain_b,
            f"config.data.synthetic.domain_a and domain_b are both {s.domain_a!r}; pick two different ones.",
        )
        require(s.size >= 16, f"config.data.synthetic.size = {s.size} must be >= 16.")
        require(s.num_train >= 2, f"config.data.synthetic.num_train = {s.num_train} must be >= 2.")
        check_positive("data.synthetic.num_test", s.num_test)
    else:
        require(
            bool(data.dataset),
            "config.data.dataset is empty; name the image folder, e.g. 'horse2zebra' or 'cityscapes'.",
        )


def check_networks(config) -> None:
    """model.* and disc.*, and that data.crop_size suits both networks."""
    model, disc, crop = config.model, config.disc, config.data.crop_size
    check_choice("model.generator", model.generator, GENERATOR_ARCHS)
    check_choice("model.norm", model.norm, NORMS)
    check_choice("model.conv_impl", model.conv_impl, CONV_IMPLS)
    common.compute_dtype(config)  # config.dtype is one of common.COMPUTE_DTYPES
    check_choice("disc.norm", disc.norm, NORMS)
    check_positive("model.ngf", model.ngf)
    check_positive("disc.features", disc.features)
    check_positive("disc.num_layers", disc.num_layers)
    factor = 2 ** GENERATOR_DOWNSAMPLING[model.generator]
    require(
        crop % factor == 0,
        f"config.data.crop_size = {crop} must be a multiple of {factor} for model.generator = "
        f"{model.generator!r}" + ("; use a resnet generator for small images." if factor > 4 else "."),
    )
    # PatchGAN: num_layers stride-2 convs, then two 4x4 stride-1 convs that each trim one pixel.
    disc_factor = 2**disc.num_layers
    require(
        crop % disc_factor == 0 and crop // disc_factor >= 3,
        f"config.data.crop_size = {crop} must be a multiple of {disc_factor} and >= {3 * disc_factor} for "
        f"disc.num_layers = {disc.num_layers}; lower disc.num_layers for small images.",
    )


def check_training(config) -> None:
    """train.*, the periodic actions, init_from."""
    train = config.train
    for key in ("num_steps", "batch_size", "learning_rate"):
        check_positive(f"train.{key}", train[key])
    require(
        0 <= train.decay_steps <= train.num_steps,
        f"config.train.decay_steps = {train.decay_steps} must be in [0, train.num_steps = {train.num_steps}] "
        "(the last decay_steps steps decay the learning rate linearly).",
    )
    for key in ("b1", "b2"):
        require(0 <= train[key] < 1, f"config.train.{key} = {train[key]} not in [0, 1).")
    for key in ("log.every_steps", "log.sample_every_steps", "log.sample_images", "eval.every_steps"):
        section, name = key.split(".")
        check_positive(key, config[section][name])
    check_positive("eval.num_examples", config.eval.num_examples)
    check_positive("eval.batch_size", config.eval.batch_size)
    check_positive("checkpoint.every_steps", config.checkpoint.every_steps)
    check_positive("checkpoint.keep", config.checkpoint.keep)
    for key in ("generator", "discriminator"):
        require(
            isinstance(config.init_from[key], str),
            f"config.init_from.{key} = {config.init_from[key]!r} must be a path string ('' = fresh).",
        )


# ---- Networks and optimizer ------------------------------------------------------------------------


def make_generator(config) -> nn.Module:
    """(B, S, S, 3) in [-1, 1] -> (B, S, S, 3) in [-1, 1]; variables "params" (+ "batch_stats")."""
    m = config.model
    return build_generator(
        m.generator,
        m.ngf,
        norm=m.norm,
        use_dropout=m.dropout,
        conv_impl=m.conv_impl,
        output_nc=3,
        dtype=common.compute_dtype(config),
    )


def make_discriminator(config) -> PatchDiscriminator:
    d = config.disc
    return PatchDiscriminator(
        ndf=d.features,
        num_layers=d.num_layers,
        norm=d.norm,
        dtype=common.compute_dtype(config),
        conv_impl=config.model.conv_impl,  # one setting for G and D
    )


def init_key(seed: int) -> jax.Array:
    """The key that parameter initialisation draws from: an "rbg" key (XLA's RngBitGenerator).

    With the default threefry key, XLA:CPU spends 4-12 s compiling the ~100 random initialisers of a
    translation state; rbg compiles 2.5-4x faster. Only the initial values depend on it (deterministic
    for a seed and backend; replicated, so the same on any mesh); the steps keep threefry keys.
    """
    return jax.random.key(seed, impl="rbg")


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Adam with the reference's constant-then-linear-decay rate; one per network group (G, D)."""
    t = config.train
    schedule = common.linear_decay_schedule(t.learning_rate, t.num_steps, t.decay_steps)
    return optax.adam(schedule, b1=t.b1, b2=t.b2), schedule


# ---- init_from ---------------------------------------------------------------------------------


def apply_init_from(config, state):
    """Replaces the generator(s) and/or discriminator(s) of a fresh state (parameters and batch-norm
    statistics: the fields g_params, g_batch_stats, d_params, d_batch_stats) with another run's of the
    same trainer. config.init_from.generator / .discriminator: its workdir, checkpoints/ folder or one
    step folder ("" = keep the fresh networks). Everything else (optimizer states, pools) stays fresh."""
    for key, fields in (
        ("generator", ("g_params", "g_batch_stats")),
        ("discriminator", ("d_params", "d_batch_stats")),
    ):
        path = config.init_from[key]
        if path:
            targets = {field: getattr(state, field) for field in fields}
            state = state.replace(**common.restore_subtrees(path, targets, f"init_from.{key}"))
            logging.info("Initialised the %s from %s.", key, path)
    return state


# ---- Training, after the data ---------------------------------------------------------------


def train_translation(
    config,
    workdir: str,
    *,
    mesh,
    init: Callable,
    state_sharding,
    writer,
    train_iter,
    train_step: Callable,
    step_kwargs: dict,
    teacher_generators: tuple[str, ...] | None,
    evaluate: Callable,
    write_samples: Callable,
):
    """The part of pix2pix and CycleGAN training that follows the data: builds the state (workdir checkpoint
    > init_from > the teacher's discriminators when distilling > fresh), loads the frozen teacher when
    distilling (`teacher_generators`: its generator names, None for pix2pix's single one), compiles
    `train_step(state, batch, teacher_variables, **step_kwargs, teacher=...)` and runs the loop.

    The teacher's variables are an input of the jitted step: not differentiated, not donated, never
    checkpointed. Returns the final state.
    """
    state = jax.jit(init, out_shardings=state_sharding)(init_key(config.seed))
    parameter_overview.log_parameter_overview(state.g_params, msg="generator(s)")
    parameter_overview.log_parameter_overview(state.d_params, msg="discriminator(s)")
    teacher, teacher_variables = None, {}
    if distillation.is_distillation(config):
        teacher = distillation.make_teacher(config)
        teacher_variables = distillation.load_teacher(config, mesh, teacher_generators)
        distillation.log_model_costs(writer, config, teacher_variables, state.g_params)
    ckpt = loop.open_checkpointer(config, workdir)
    state, resumed = loop.restore_latest(ckpt, state, train_iter)
    if not resumed:
        state = apply_init_from(config, distillation.init_discriminators_from_teacher(config, state))

    step_fn = jax.jit(
        functools.partial(train_step, teacher=teacher, **step_kwargs),
        in_shardings=(state_sharding, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    return loop.train_loop(
        config,
        state=state,
        step_fn=lambda state, batch: step_fn(state, batch, teacher_variables),
        train_iter=train_iter,
        mesh=mesh,
        ckpt=ckpt,
        writer=writer,
        evaluate=evaluate,
        write_samples=write_samples,
    )


# ---- Test sets, batching -----------------------------------------------------------------------


def opposite_style(data) -> str | None:
    """The synthetic-scenes style of the generator's input domain (the B -> A generator's output)."""
    flipped = copy.deepcopy(data)
    with flipped.unlocked():
        flipped.direction = "AtoB" if data.direction == "BtoA" else "BtoA"
    return translation_pipeline.target_style(flipped)


def load_test_sets(config, *, both_directions: bool) -> list[TestSet]:
    """A -> B (and B -> A) test sets: the first max(eval.num_examples, log.sample_images) test images
    (log.sample_images without ground truth).

    Ground truth (targets, layouts) only on the synthetic scenes; real folders give inputs only (their
    grids show input, output (, reconstruction / target where the data is paired)).
    """
    data = config.data
    # Real folders are only drawn from: no need to hold eval.num_examples full-size images.
    count = config.log.sample_images
    if has_ground_truth(config):
        count = max(config.eval.num_examples, count)
    raw = translation_pipeline.load_test_set(data, max_examples=count)
    synthetic = data.name == "synthetic_scenes"
    paired = data.name != "unaligned_folders"
    labels = raw.get("labels") if synthetic else None
    sets = [
        TestSet(
            "AtoB",
            raw["a"],
            targets=raw["b"] if paired else None,
            labels=labels,
            style=translation_pipeline.target_style(data),
        )
    ]
    if both_directions:
        targets = raw["a"] if paired else None
        sets.append(TestSet("BtoA", raw["b"], targets=targets, labels=labels, style=opposite_style(data)))
    return sets


def eval_batch_size(config, mesh) -> int:
    """eval.batch_size rounded up to a multiple of the data axis (every device gets whole images)."""
    dp = sharding.data_parallel_size(mesh)
    return -(-config.eval.batch_size // dp) * dp


def has_ground_truth(config) -> bool:
    """Metrics (gt_l1, label accuracy) only on the synthetic scenes; real folders get sample grids."""
    return config.data.name == "synthetic_scenes"


def sample_rows(test: TestSet, count: int) -> np.ndarray:
    """Indices of the test images shown in sample grids: the first `count`."""
    return np.arange(min(count, len(test.inputs)))
