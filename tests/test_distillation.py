"""SRPKD distillation end to end on the :smoke configs: pix2pix and CycleGAN students of saved teachers.

Teachers are real trainer checkpoints (the pix2pix / CycleGAN state layout, written by orbax) of freshly
initialised teacher networks: what the distillation trainer reads does not depend on how long the
teacher trained, and skipping the teacher's training keeps this module fast.
"""

import dataclasses
import functools
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import (
    cyclegan_horse2zebra,
    distill_cyclegan_horse2zebra,
    distill_pix2pix_cityscapes,
    pix2pix_cityscapes,
)
from ganjax import checkpoint, main, sharding
from ganjax.models import costs
from ganjax.trainers import common, cyclegan, distillation, pix2pix
from ganjax.trainers import translation_common as tc
from ganjax.trainers.common import read_metrics

DISTILL_CONFIGS = {"pix2pix": distill_pix2pix_cityscapes, "cyclegan": distill_cyclegan_horse2zebra}
TEACHER_CONFIGS = {"pix2pix": pix2pix_cityscapes, "cyclegan": cyclegan_horse2zebra}
TRAINERS = {"pix2pix": pix2pix, "cyclegan": cyclegan}


def fresh_state(kind, config, workdir, seed=0):
    """A freshly initialised state of the config's trainer (only the init is compiled)."""
    _, _, _, _, _, _, init, state_sharding = TRAINERS[kind]._setup(config, workdir)
    return jax.jit(init, out_shardings=state_sharding)(tc.init_key(seed))


@pytest.fixture(scope="module")
def teachers(data_dir, tmp_path_factory):
    """{"pix2pix": workdir, "cyclegan": workdir} holding a step-1 checkpoint of a teacher state."""
    paths = {}
    for kind, module in TEACHER_CONFIGS.items():
        config = module.get_config("smoke")
        config.data.data_dir = data_dir
        workdir = str(tmp_path_factory.mktemp(f"{kind}_teacher"))
        state = fresh_state(kind, config, workdir, seed=7)
        ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
        ckpt.save(1, state, {})
        ckpt.close()
        paths[kind] = workdir
    return paths


def distill_config(kind, data_dir, teachers, **overrides):
    config = DISTILL_CONFIGS[kind].get_config("smoke")
    config.data.data_dir = data_dir
    config.teacher.checkpoint = teachers[kind]
    for key, value in overrides.items():
        section, name = key.split("__")
        config[section][name] = value
    return config


@pytest.fixture(scope="module")
def pix2pix_run(data_dir, teachers, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("distill_pix2pix") / "run")
    main.run(distill_config("pix2pix", data_dir, teachers), workdir)
    return workdir


def test_pix2pix_student_trains_with_both_distillation_terms(pix2pix_run, teachers, data_dir):
    metrics = read_metrics(pix2pix_run)
    for step in (1, 2, 3, 4):
        for key in ("g_total", "g_l1", "kd_l1", "kd_relation", "d_total", "g_grad_norm"):
            assert np.isfinite(metrics[step][key]), (step, key)
        assert metrics[step]["kd_l1"] > 0 and metrics[step]["kd_relation"] > 0
    # Sizes and MACs of both generators, at step 0 (teacher ngf 4, student ngf 2 at 32 px).
    config = distill_config("pix2pix", data_dir, teachers)
    size = (1, 32, 32, 3)
    for role, module in (
        ("teacher", distillation.make_teacher(config)),
        ("student", tc.make_generator(config)),
    ):
        variables = jax.eval_shape(module.init, jax.random.key(0), jax.ShapeDtypeStruct(size, np.float32))
        assert metrics[0][f"model/{role}_params"] == costs.count_params(variables["params"])
        np.testing.assert_allclose(
            metrics[0][f"model/{role}_gmacs"], costs.count_macs(module, variables, size) / 1e9
        )
    assert 0.6 < metrics[0]["model/param_reduction"] < 0.8  # half the width: about a quarter of the weights

    # The student's checkpoint holds exactly a pix2pix state's fields (no teacher inside).
    state_dir = common.resolve_checkpoint_step(pix2pix_run, "test")
    saved = ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata.tree
    assert set(saved) == {field.name for field in dataclasses.fields(pix2pix.Pix2PixState)}
    assert state_dir.endswith(os.path.join("4", "state"))


def test_pix2pix_distillation_on_one_device_equals_eight(pix2pix_run, data_dir, teachers, tmp_path):
    config = distill_config("pix2pix", data_dir, teachers)
    config.mesh.axes = (("data", 1),)
    workdir = str(tmp_path / "one")
    main.run(config, workdir)
    one, eight = read_metrics(workdir), read_metrics(pix2pix_run)
    for step in (1, 2, 3, 4):
        for key in ("g_total", "kd_l1", "kd_relation", "d_total"):
            np.testing.assert_allclose(one[step][key], eight[step][key], rtol=2e-4, atol=1e-6, err_msg=key)


def compiled_step(kind, config, workdir, teacher):
    """(jitted train step of the config, its mesh, init, state sharding)."""
    trainer = TRAINERS[kind]
    _, mesh, gen, disc, tx, schedule, init, state_sharding = trainer._setup(config, workdir)
    step = jax.jit(
        functools.partial(
            trainer.train_step,
            gen=gen,
            disc=disc,
            teacher=teacher,
            g_tx=tx,
            d_tx=tx,
            schedule=schedule,
            settings=trainer.StepSettings.from_config(config),
        ),
        in_shardings=(state_sharding, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
        donate_argnums=0,
    )
    return step, mesh, init, state_sharding


def random_batch(mesh, size=32):
    rng = np.random.default_rng(0)
    batch = {k: rng.uniform(-1, 1, (8, size, size, 3)).astype(np.float32) for k in ("a", "b")}
    return sharding.shard_batch(batch, mesh)


def test_cyclegan_students_step_leaves_the_teachers_unchanged(data_dir, teachers, tmp_path):
    """Both directions are distilled; the teacher variables go in, are not differentiated or donated, and
    come out bit-identical after steps."""
    config = distill_config("cyclegan", data_dir, teachers)
    step, mesh, init, state_sharding = compiled_step(
        "cyclegan", config, str(tmp_path), distillation.make_teacher(config)
    )
    teacher_vars = distillation.load_teacher(config, mesh, cyclegan.GENERATORS)
    before = jax.tree.map(np.array, teacher_vars)
    batch = random_batch(mesh)
    state = jax.jit(init, out_shardings=state_sharding)(tc.init_key(0))
    for _ in range(2):
        state, metrics = step(state, batch, teacher_vars)
    for key in ("kd_l1_a", "kd_l1_b", "kd_relation_a", "kd_relation_b"):
        assert float(metrics[key]) > 0, key
    assert np.isfinite(float(metrics["g_total"]))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, teacher_vars), before)


def test_zero_distillation_weights_give_the_plain_pix2pix_step(data_dir, teachers, tmp_path):
    off = distill_config("pix2pix", data_dir, teachers, distill__lambda_kd=0.0, distill__lambda_sp=0.0)
    plain = pix2pix_cityscapes.get_config("smoke")
    plain.data.data_dir = data_dir
    plain.model.ngf = off.model.ngf  # the student's width
    results = []
    for config, teacher in ((off, distillation.make_teacher(off)), (plain, None)):
        step, mesh, init, state_sharding = compiled_step("pix2pix", config, str(tmp_path), teacher)
        teacher_vars = distillation.load_teacher(config, mesh, None) if teacher else {}
        state = jax.jit(init, out_shardings=state_sharding)(tc.init_key(0))
        results.append(step(state, random_batch(mesh), teacher_vars))
    (off_state, off_metrics), (plain_state, plain_metrics) = results
    assert not {"kd_l1", "kd_relation"} & set(off_metrics)  # zero-weight terms are not even computed
    for key, value in plain_metrics.items():
        np.testing.assert_allclose(off_metrics[key], value, rtol=1e-6, err_msg=key)
    jax.tree.map(np.testing.assert_array_equal, off_state.g_params, plain_state.g_params)


def zero_state(kind, config, workdir):
    """A state of the config's structure, shapes and shardings, all zeros (nothing to compile)."""
    _, _, _, _, _, _, init, state_sharding = TRAINERS[kind]._setup(config, workdir)
    abstract = jax.eval_shape(init, tc.init_key(0))
    return jax.tree.map(lambda a, s: jax.device_put(np.zeros(a.shape, a.dtype), s), abstract, state_sharding)


def test_student_discriminators_start_from_the_teachers(data_dir, teachers, tmp_path):
    for kind in ("pix2pix", "cyclegan"):
        config = distill_config(kind, data_dir, teachers)
        fresh = zero_state(kind, config, str(tmp_path / kind))
        state = distillation.init_discriminators_from_teacher(config, fresh)
        teacher_config = TEACHER_CONFIGS[kind].get_config("smoke")
        teacher_config.data.data_dir = data_dir
        saved = checkpoint.Checkpointer(os.path.join(teachers[kind], "checkpoints"))
        teacher_state, _ = saved.restore(1, zero_state(kind, teacher_config, str(tmp_path / "t" / kind)))
        saved.close()
        assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(state.d_params))
        jax.tree.map(np.testing.assert_array_equal, state.d_params, teacher_state.d_params)
        jax.tree.map(np.testing.assert_array_equal, state.g_params, fresh.g_params)  # the student stays


def test_a_missing_teacher_fails_before_compiling(data_dir, teachers, tmp_path):
    config = distill_config("pix2pix", data_dir, teachers, teacher__checkpoint=str(tmp_path / "nowhere"))
    with pytest.raises(common.ConfigError, match="does not exist. Train the teacher first"):
        main.run(config, str(tmp_path / "run"))
    config.teacher.checkpoint = ""
    with pytest.raises(common.ConfigError, match="teacher.checkpoint is empty"):
        main.run(config, str(tmp_path / "run"))


def test_a_teacher_of_another_width_names_the_parameter(data_dir, teachers, tmp_path):
    config = distill_config("cyclegan", data_dir, teachers, teacher__ngf=8)
    mesh = sharding.make_mesh(config.mesh.axes)
    with pytest.raises(
        checkpoint.CheckpointShapeError, match="teacher.checkpoint: 'g_params/G_A/.*' has shape"
    ):
        distillation.load_teacher(config, mesh, cyclegan.GENERATORS)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"distill__relation_layers": ("block_42",)}, "unknown feature 'block_42'"),
        ({"distill__relation_layers": ()}, "relation_layers is empty"),
        ({"distill__relation_norm": "l1"}, "distill.relation_norm"),
        ({"distill__lambda_sp": -1.0}, "distill.lambda_sp"),
        ({"teacher__norm": "group"}, "teacher.norm"),
    ],
)
def test_bad_distillation_settings_fail_early(data_dir, teachers, overrides, message):
    config = distill_config("pix2pix", data_dir, teachers, **overrides)
    with pytest.raises(common.ConfigError, match=message):
        pix2pix.validate_config(config)


def test_a_single_position_relation_layer_is_rejected(teachers):
    # U-Net-256 at 256 px: the innermost level is 1x1, so the relation matrices are [[1]].
    config = distill_pix2pix_cityscapes.get_config("arch=unet,student=16")
    config.teacher.checkpoint = teachers["pix2pix"]
    config.distill.relation_layers = ("bottleneck",)
    with pytest.raises(common.ConfigError, match="is 1x1 at data.crop_size = 256"):
        pix2pix.validate_config(config)


@pytest.mark.parametrize(
    "arg, generator, ngf, layers",
    [
        ("", "unet_256", 16, ("down_3",)),
        ("arch=resnet,student=32", "resnet_9blocks", 32, ("bottleneck",)),
        ("arch=resnet,student=16", "resnet_9blocks", 16, ("bottleneck",)),
        ("arch=unet,student=16", "unet_256", 16, ("down_3",)),
    ],
)
def test_pix2pix_pairs(arg, generator, ngf, layers, teachers):
    config = distill_pix2pix_cityscapes.get_config(arg)
    assert (config.model.generator, config.model.ngf, config.teacher.ngf) == (generator, ngf, 64)
    assert tuple(config.distill.relation_layers) == layers
    config.teacher.checkpoint = teachers["pix2pix"]
    pix2pix.validate_config(config)  # relation layers exist and match in teacher and student


@pytest.mark.parametrize("dataset", list(distill_cyclegan_horse2zebra.DATASET_EPOCHS))
def test_cyclegan_datasets(dataset, teachers):
    config = distill_cyclegan_horse2zebra.get_config(f"dataset={dataset},student=32")
    assert (config.data.dataset, config.model.ngf, config.teacher.ngf) == (dataset, 32, 64)
    assert config.train.num_steps == 200 * distill_cyclegan_horse2zebra.DATASET_EPOCHS[dataset]
    config.teacher.checkpoint = teachers["cyclegan"]
    cyclegan.validate_config(config)


def test_config_arguments_are_checked():
    with pytest.raises(ValueError, match="Unknown key 'studnet'"):
        distill_cyclegan_horse2zebra.get_config("studnet=16")
    with pytest.raises(ValueError, match="student='12' is not one of"):
        distill_cyclegan_horse2zebra.get_config("student=12")
    with pytest.raises(ValueError, match="arch= applies to Cityscapes only"):
        distill_pix2pix_cityscapes.get_config("synthetic,arch=unet")
    assert distill_pix2pix_cityscapes.get_config("synthetic").teacher.checkpoint == "runs/demo_p2p"


def test_the_claim_experiment_builds_valid_configs(teachers):
    """benchmarks/distillation_claim.py: the three students differ only in the distillation terms."""
    from benchmarks import distillation_claim

    for kind in ("pix2pix", "cyclegan"):
        configs = {
            c: distillation_claim.make_config(kind, c, teacher=teachers[kind], student=4, steps=30, seed=1)
            for c in distillation_claim.CONDITIONS
        }
        for config in configs.values():
            TRAINERS[kind].validate_config(config)
            assert (config.model.ngf, config.seed, config.train.num_steps) == (4, 1, 30)
        assert configs["scratch"].trainer == kind
        assert configs["kd"].distill.lambda_sp == 0 < configs["kd"].distill.lambda_kd
        assert configs["kd_sp"].distill.lambda_sp > 0 and configs["kd_sp"].distill.lambda_kd > 0
    runs = {"scratch": [{"gt_l1": 0.2, "pixel_accuracy": 0.5, "mean_iou": 0.3}] * 2}
    assert "| scratch (n=2) | 0.2000 +- 0.0000 | 0.5000 +- 0.0000 | 0.3000 +- 0.0000 |" in (
        distillation_claim.summarize(runs, ("gt_l1", "pixel_accuracy", "mean_iou"))
    )
