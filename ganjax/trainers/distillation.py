"""SRPKD distillation (ECCV 2020, PAPERS.md §B): the frozen teacher and the student's extra losses.

A distillation run is a pix2pix or CycleGAN run whose generator(s) also learn from a frozen teacher:
config.trainer "distill_pix2pix" runs ganjax/trainers/pix2pix.py and "distill_cyclegan" runs
ganjax/trainers/cyclegan.py, whose steps then add, for each student generator G_S with teacher G_T,

  lambda_kd * |G_S(x) - G_T(x)|_1  +  lambda_sp * sum over config.distill.relation_layers of
  relation_loss(F_T(x), F_S(x))      (ganjax/losses/relation.py; F = the features tapped at a layer)

to the usual GAN + task losses. The student is `config.model` (the teacher's architecture at width
`model.ngf`); the teacher is `config.model` with `config.teacher.ngf / norm / dropout`, read from
`config.teacher.checkpoint` (the workdir of a pix2pix / CycleGAN run of the same data, or a converted
PyTorch checkpoint). Its variables are an input of the jitted step, never differentiated (its outputs
are computed outside the differentiated function, under stop_gradient) and never part of the student's
checkpoint. The student's discriminator(s) start from the teacher's (`teacher.init_discriminator`).

Feature taps use the generators' `return_features` (ganjax/models/generators.py): the parameter trees
are those of plain generators, so students load anywhere a generator does (translate, export).
"""

from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging

from ganjax import sharding
from ganjax.losses import relation
from ganjax.losses.aging import l1
from ganjax.models import costs
from ganjax.models.generators import build_generator
from ganjax.trainers import common
from ganjax.trainers.common import ConfigError, check_choice, check_positive, require

DISTILL_TRAINERS = {"distill_pix2pix": "pix2pix", "distill_cyclegan": "cyclegan"}  # -> teacher trainer


def is_distillation(config) -> bool:
    return config.trainer in DISTILL_TRAINERS


@dataclasses.dataclass(frozen=True)
class DistillSettings:
    """The plain (hashable) distillation values a step needs."""

    lambda_kd: float
    lambda_sp: float
    relation_layers: tuple[str, ...]
    relation_norm: str
    relation_method: str
    teacher_train_mode: bool

    @classmethod
    def from_config(cls, config) -> DistillSettings | None:
        """None for a plain (teacher) run."""
        if not is_distillation(config):
            return None
        d = config.distill
        return cls(
            lambda_kd=float(d.lambda_kd),
            lambda_sp=float(d.lambda_sp),
            relation_layers=tuple(d.relation_layers),
            relation_norm=d.relation_norm,
            relation_method=d.relation_method,
            teacher_train_mode=bool(config.teacher.train_mode),
        )

    @property
    def feature_names(self) -> tuple[str, ...]:
        """The taps the step needs from both generators (none when the relation term is off)."""
        return self.relation_layers if self.lambda_sp > 0 else ()


# ---- Networks ------------------------------------------------------------------------------------


def make_teacher(config) -> nn.Module:
    """The teacher generator: config.model's architecture with config.teacher's width and norm, computing
    in config.dtype like the student."""
    m, t = config.model, config.teacher
    return build_generator(
        m.generator,
        t.ngf,
        norm=t.norm,
        use_dropout=t.dropout,
        conv_impl=m.conv_impl,
        output_nc=3,
        dtype=common.compute_dtype(config),
    )


def teacher_forward(teacher: nn.Module, variables, images, settings: DistillSettings, rng):
    """The frozen teacher on `images` (B, H, W, 3): (output (B, H, W, 3), {layer: (B, h, w, C_T)}),
    both under stop_gradient. Eval mode (running statistics, no dropout) unless teacher.train_mode."""
    variables = jax.lax.stop_gradient(variables)
    out = teacher.apply(
        variables,
        images,
        train=settings.teacher_train_mode,
        return_features=settings.feature_names,
        rngs={"dropout": rng},
        mutable=False,
    )
    output, features = out if settings.feature_names else (out, {})
    return jax.lax.stop_gradient(output), jax.lax.stop_gradient(features)


def student_losses(
    settings: DistillSettings, student_output, student_features, teacher_output, teacher_features, suffix=""
) -> tuple[dict, dict]:
    """({name: loss}, {name: weight}) of the distillation terms for one student; `suffix` tells the
    directions of a CycleGAN apart ("_a": G_A's)."""
    losses, weights = {}, {}
    if settings.lambda_kd > 0:
        losses[f"kd_l1{suffix}"] = l1(student_output, teacher_output)
        weights[f"kd_l1{suffix}"] = settings.lambda_kd
    if settings.lambda_sp > 0:
        losses[f"kd_relation{suffix}"] = sum(
            relation.relation_loss(
                teacher_features[name],
                student_features[name],
                normalize=settings.relation_norm,
                method=settings.relation_method,
            )
            for name in settings.relation_layers
        )
        weights[f"kd_relation{suffix}"] = settings.lambda_sp
    return losses, weights


# ---- Config validation ---------------------------------------------------------------------------


def validate_config(config) -> None:
    """teacher.* and distill.*; a no-op for teacher runs. Needs config.model checked first."""
    if not is_distillation(config):
        return
    t, d = config.teacher, config.distill
    check_positive("teacher.ngf", t.ngf)
    check_choice("teacher.norm", t.norm, ("instance", "batch"))
    check_positive("distill.lambda_kd", d.lambda_kd, allow_zero=True)
    check_positive("distill.lambda_sp", d.lambda_sp, allow_zero=True)
    check_choice("distill.relation_norm", d.relation_norm, relation.RELATION_NORMS)
    check_choice("distill.relation_method", d.relation_method, relation.RELATION_METHODS)
    require(
        isinstance(t.checkpoint, str) and t.checkpoint,
        "config.teacher.checkpoint is empty: set it to the --workdir of a trained "
        f"{DISTILL_TRAINERS[config.trainer]} run on the same data (or a converted PyTorch checkpoint, see "
        "ganjax.interop.convert).",
    )
    path = os.path.abspath(os.path.expanduser(t.checkpoint))
    if not os.path.isdir(path):
        raise ConfigError(
            f"config.teacher.checkpoint = {path!r} does not exist. Train the teacher first (e.g. "
            f"python -m ganjax.main --config configs/{_teacher_config_hint(config)} "
            f"--workdir {t.checkpoint}) "
            "or convert PyTorch weights into that folder with python -m ganjax.interop.convert."
        )
    if d.lambda_sp > 0:
        require(
            len(d.relation_layers) > 0,
            "config.distill.relation_layers is empty but distill.lambda_sp > 0; name at least one layer "
            "(e.g. 'bottleneck') or set lambda_sp = 0.",
        )
        _check_relation_layers(config)


def _teacher_config_hint(config) -> str:
    name = "pix2pix_cityscapes.py" if config.trainer == "distill_pix2pix" else "cyclegan_horse2zebra.py"
    return name + (":synthetic" if config.data.name == "synthetic_scenes" else "")


def _check_relation_layers(config) -> None:
    """The layers exist in both generators, match spatially and have more than one position (with one,
    both normalised relation matrices are [[1]] and the loss is constant)."""
    from ganjax.trainers.translation_common import make_generator  # avoids an import cycle

    size = config.data.crop_size
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    shapes = {}
    for role, module in (("teacher", make_teacher(config)), ("student", make_generator(config))):
        try:
            _, feats = jax.eval_shape(
                lambda x, m=module: m.init_with_output(
                    jax.random.key(0), x, return_features=tuple(config.distill.relation_layers)
                )[0],
                x,
            )
        except ValueError as e:
            raise ConfigError(f"config.distill.relation_layers: {e} (in the {role} generator)") from None
        shapes[role] = {name: f.shape for name, f in feats.items()}
    for name in config.distill.relation_layers:
        t_shape, s_shape = shapes["teacher"][name], shapes["student"][name]
        require(
            t_shape[1:3] == s_shape[1:3],
            f"config.distill.relation_layers: {name!r} is {t_shape[1:3]} in the teacher but {s_shape[1:3]} "
            "in the student; the relation matrices need the same positions.",
        )
        require(
            t_shape[1] * t_shape[2] > 1,
            f"config.distill.relation_layers: {name!r} is {t_shape[1]}x{t_shape[2]} at data.crop_size = "
            f"{size}: a single position makes the relation loss constant. Pick a larger layer (e.g. "
            "'down_3' of a U-Net, 'bottleneck' of a ResNet).",
        )


# ---- Teacher variables, discriminator init ------------------------------------------------------


def load_teacher(config, mesh, directions: tuple[str, ...] | None):
    """The teacher's variables, replicated on `mesh`: {"params", "batch_stats"} for one generator
    (directions None, the pix2pix layout) or {direction: {...}} for ("G_A", "G_B") (CycleGAN layout).

    Reads only the generator fields (g_params, g_batch_stats) of config.teacher.checkpoint;
    CheckpointShapeError names the first parameter whose shape differs from config.teacher's network.
    """
    teacher = make_teacher(config)
    size = config.data.crop_size
    one = jax.eval_shape(
        teacher.init, jax.random.key(0), jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    )
    params, stats = one["params"], one.get("batch_stats", {})
    if directions is not None:
        params = {name: params for name in directions}
        stats = {name: stats for name in directions}
    replicated = sharding.replicated(mesh)
    targets = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
        {"g_params": params, "g_batch_stats": stats},
    )
    restored = common.restore_subtrees(config.teacher.checkpoint, targets, "teacher.checkpoint")
    logging.info("Loaded the teacher from %s.", config.teacher.checkpoint)

    def variables(p, s):
        return {"params": p, "batch_stats": s} if jax.tree.leaves(s) else {"params": p}

    if directions is None:
        return variables(restored["g_params"], restored["g_batch_stats"])
    return {
        name: variables(restored["g_params"][name], restored["g_batch_stats"][name]) for name in directions
    }


def init_discriminators_from_teacher(config, state):
    """The student's fresh discriminator(s) replaced by the teacher run's (d_params, d_batch_stats),
    when config.teacher.init_discriminator; the teacher's D must match config.disc."""
    if not (is_distillation(config) and config.teacher.init_discriminator):
        return state
    targets = {"d_params": state.d_params, "d_batch_stats": state.d_batch_stats}
    restored = common.restore_subtrees(config.teacher.checkpoint, targets, "teacher.checkpoint")
    logging.info("Initialised the student's discriminator(s) from the teacher %s.", config.teacher.checkpoint)
    return state.replace(**restored)


# ---- Size and compute report ---------------------------------------------------------------------


def log_model_costs(writer, config, teacher_variables, student_params) -> dict[str, float]:
    """Parameters and MACs of one teacher and one student generator at data.crop_size, logged and
    written as step-0 scalars (model/teacher_params, model/student_gmacs, ...); returns them."""
    from ganjax.trainers.translation_common import make_generator  # avoids an import cycle

    size = config.data.crop_size
    shape = (1, size, size, 3)
    if "params" not in teacher_variables:  # CycleGAN: both directions are the same network
        teacher_variables = next(iter(teacher_variables.values()))
        student_params = next(iter(student_params.values()))
    student = make_generator(config)
    values = {}
    for role, module, variables in (
        ("teacher", make_teacher(config), teacher_variables),
        ("student", student, {"params": student_params, **_abstract_stats(student, shape)}),
    ):
        n, macs = costs.count_params(variables["params"]), costs.count_macs(module, variables, shape)
        values[f"model/{role}_params"] = float(n)
        values[f"model/{role}_gmacs"] = macs / 1e9
        logging.info("%s generator at %d px: %s", role, size, costs.describe(n, macs))
    values["model/param_reduction"] = 1 - values["model/student_params"] / values["model/teacher_params"]
    values["model/mac_reduction"] = 1 - values["model/student_gmacs"] / values["model/teacher_gmacs"]
    writer.write_scalars(0, values)
    return values


def _abstract_stats(module, shape) -> dict:
    """{"batch_stats": shapes} for a batch-norm generator, {} otherwise (MAC counting needs the tree)."""
    v = jax.eval_shape(module.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32))
    return {"batch_stats": v["batch_stats"]} if "batch_stats" in v else {}
