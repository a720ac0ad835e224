"""Reliability (issue 9): stop signals, crashes mid-save, bit-exact resumption for every trainer, bad
settings and non-finite runs.

Compiling a trainer's step is what costs here, so the module shares a persistent compilation cache (its
subprocesses too): each trainer's step compiles once, in its uninterrupted reference run.
"""

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import (
    aging_utkface,
    cyclegan_horse2zebra,
    distill_cyclegan_horse2zebra,
    distill_pix2pix_cityscapes,
    pix2pix_cityscapes,
)
from ganjax import checkpoint, main, sharding
from ganjax.trainers import common, cyclegan, loop, pix2pix
from ganjax.trainers import translation_common as tc
from ganjax.trainers.common import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {
    "aging": aging_utkface,
    "pix2pix": pix2pix_cityscapes,
    "cyclegan": cyclegan_horse2zebra,
    "distill_pix2pix": distill_pix2pix_cityscapes,
    "distill_cyclegan": distill_cyclegan_horse2zebra,
}
KINDS = tuple(CONFIGS)
# Networks whose gradient and parameter norms every logged step must carry.
NETWORKS = {
    "aging": ("g", "d"),
    "pix2pix": ("g", "d"),
    "cyclegan": ("g", "d", "G_A", "G_B", "D_A", "D_B"),
    "distill_pix2pix": ("g", "d"),
    "distill_cyclegan": ("g", "d", "G_A", "G_B", "D_A", "D_B"),
}
PROGRESS_KEYS = ("steps_per_sec", "uptime")  # clu's ReportProgress: wall-clock, differs run to run


# ---- Shared runs -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teachers(data_dir, tmp_path_factory):
    """{"pix2pix": workdir, "cyclegan": workdir}: a saved teacher state each, random numbers of the right
    shapes (what a student reads does not depend on how the teacher trained; nothing to compile)."""
    paths = {}
    rng = np.random.default_rng(7)
    for kind, trainer in (("pix2pix", pix2pix), ("cyclegan", cyclegan)):
        config = CONFIGS[kind].get_config("smoke")
        config.data.data_dir = data_dir
        workdir = str(tmp_path_factory.mktemp(f"{kind}_teacher"))
        _, _, _, _, _, _, init, state_sharding = trainer._setup(config, workdir)

        def fill(path, leaf, leaf_sharding):
            if "var" in jax.tree_util.keystr(path):  # batch-norm variances
                value = np.ones(leaf.shape, leaf.dtype)
            elif np.issubdtype(leaf.dtype, np.floating):
                value = rng.normal(0.0, 0.1, leaf.shape).astype(leaf.dtype)
            else:
                value = np.zeros(leaf.shape, leaf.dtype)
            return jax.device_put(value, leaf_sharding)

        abstract = jax.eval_shape(init, tc.init_key(0))
        ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
        ckpt.save(1, jax.tree_util.tree_map_with_path(fill, abstract, state_sharding), {})
        ckpt.close()
        paths[kind] = workdir
    return paths


def one_device(axes):
    """A mesh of one device. With several CPU devices a cross-device mean can round differently from
    run to run (seen once in a few hundred steps), which a bit-for-bit comparison would catch."""
    return tuple((name, 1) for name, _ in axes)


def make_config(kind, data_dir, teachers=None, *, single_device=True, **overrides):
    """The kind's :smoke config: 4 steps, every step logged, checkpoints at 2 and 4, one device."""
    config = CONFIGS[kind].get_config("smoke")
    if single_device:
        config.mesh.axes = one_device(config.mesh.axes)
    config.data.data_dir = data_dir
    config.train.num_steps = 4
    config.log.every_steps = 1
    config.checkpoint.every_steps = 2
    if kind == "pix2pix":
        # A constant rate compiles the same step for any num_steps: the subprocess runs below reuse it.
        config.train.decay_steps = 0
    if kind.startswith("distill_"):
        config.teacher.checkpoint = teachers[kind.removeprefix("distill_")]
    for key, value in overrides.items():
        section, name = key.split("__")
        config[section][name] = value
    return config


def logged(values):
    return {k: v for k, v in values.items() if k not in PROGRESS_KEYS}


@pytest.fixture(scope="module")
def straight(data_dir, request, tmp_path_factory):
    """kind -> (workdir, final state on the host) of an uninterrupted 4-step run, made on first use."""
    runs = {}

    def get(kind):
        if kind not in runs:
            teachers = request.getfixturevalue("teachers") if kind.startswith("distill_") else None
            workdir = str(tmp_path_factory.mktemp(f"straight_{kind}") / "run")
            state = main.run(make_config(kind, data_dir, teachers), workdir)
            runs[kind] = (workdir, jax.device_get(state), teachers)
        return runs[kind]

    return get


def start_from_step_2(reference_workdir, workdir):
    """A workdir holding the reference run's step-2 checkpoint only: what a run stopped there leaves."""
    src = os.path.join(reference_workdir, "checkpoints", "2")
    shutil.copytree(src, os.path.join(workdir, "checkpoints", "2"))


# ---- Exact resumption, norms and non-finite stops for every trainer ---------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_resumed_run_is_bit_identical_to_the_uninterrupted_run(kind, straight, data_dir, tmp_path):
    reference, final, teachers = straight(kind)
    workdir = str(tmp_path / "resumed")
    start_from_step_2(reference, workdir)
    state = main.run(make_config(kind, data_dir, teachers), workdir)  # the same command again

    straight_logs, resumed_logs = read_metrics(reference), read_metrics(workdir)
    assert sorted(s for s, v in resumed_logs.items() if "g_total" in v) == [3, 4]
    for step in (3, 4):  # losses, norms, learning rate, step-4 eval scores: all equal, bit for bit
        assert logged(resumed_logs[step]) == logged(straight_logs[step]), step
    # Every network, optimizer state, EMA, batch statistics and image pool.
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), final)

    # Gradient and parameter norms of every network are logged at every step.
    for step in (1, 2, 3, 4):
        for net in NETWORKS[kind]:
            for what in ("grad", "param"):
                assert np.isfinite(straight_logs[step][f"{net}_{what}_norm"]), (step, net, what)


@pytest.mark.parametrize("kind", KINDS)
def test_non_finite_losses_stop_every_trainer_and_keep_the_last_checkpoint(
    kind, straight, data_dir, tmp_path, monkeypatch
):
    reference, _, teachers = straight(kind)
    workdir = str(tmp_path / "nan")
    start_from_step_2(reference, workdir)
    state_dir = os.path.join(workdir, "checkpoints", "2")
    before = _file_bytes(state_dir)
    real = sharding.shard_batch

    def diverged(batch, mesh):  # NaN inputs: every loss of the (already compiled) step becomes NaN
        return real({k: v * np.nan if v.dtype.kind == "f" else v for k, v in batch.items()}, mesh)

    monkeypatch.setattr(sharding, "shard_batch", diverged)
    with pytest.raises(common.NonFiniteError) as err:
        main.run(make_config(kind, data_dir, teachers), workdir)
    name = re.match(r"(\S+) became NaN/Inf at step 3; stopping without writing a checkpoint", str(err.value))
    assert name and name.group(1) in read_metrics(reference)[3], str(err.value)
    assert "Last good checkpoint: step 2" in str(err.value)
    assert checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).all_steps() == [2]
    assert _file_bytes(state_dir) == before


def _file_bytes(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(os.path.join(root, name), folder)] = f.read()
    return out


# ---- SIGTERM, then SIGKILL in the middle of a save, then resume (real processes) ----------------------

# Runs ganjax.main with orbax's final rename of every step after $HOLD_AFTER_STEP held back (the save
# stays in its temporary folder, as when the process dies half-way through an asynchronous write) and
# the held folder's path written to $HELD_MARKER.
_HOLD_SAVES = """
import asyncio, os, re, sys
from orbax.checkpoint._src.path import atomicity
real = atomicity.AtomicRenameTemporaryPath.finalize
async def finalize(self):
    name = self._final_path.name
    if name.isdigit() and int(name) > int(os.environ["HOLD_AFTER_STEP"]):
        with open(os.environ["HELD_MARKER"], "w") as f:
            f.write(str(self._tmp_path))
        await asyncio.sleep(3600)
    await real(self)
atomicity.AtomicRenameTemporaryPath.finalize = finalize
from absl import app
from ganjax import main
app.run(main.main, flags_parser=main.parse_flags)
"""


def _wait_for(predicate, timeout, what, proc):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the process exited ({proc.returncode}) before {what}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"timed out waiting for {what}")


def _trained_steps(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [r["step"] for r in map(json.loads, f.read().splitlines()[:-1] or []) if "g_total" in r]


def test_sigterm_saves_and_exits_0_and_a_sigkill_mid_save_resumes(
    straight, data_dir, compile_cache, tmp_path, caplog
):
    straight("pix2pix")  # builds the data and puts the compiled step into the shared cache
    workdir = str(tmp_path / "run")
    flags = [
        "--config=configs/pix2pix_cityscapes.py:smoke",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        "--config.train.decay_steps=0",
        f"--config.mesh.axes={one_device(pix2pix_cityscapes.get_config('smoke').mesh.axes)}",
        "--config.log.every_steps=1",
        "--config.eval.every_steps=1000",
        "--config.log.sample_every_steps=1000",
    ]
    env = {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": compile_cache,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }

    def start(argv, name):
        with open(tmp_path / f"{name}.log", "w") as log:
            return subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

    # 1. SIGTERM once it is stepping: the step finishes, a checkpoint is written, exit status 0.
    proc = start(
        [sys.executable, "-m", "ganjax.main", *flags, "--config.train.num_steps=200",
         "--config.checkpoint.every_steps=1000"],
        "sigterm",
    )  # fmt: skip
    _wait_for(lambda: len(_trained_steps(workdir)) >= 1, 600, "the first logged step", proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, (tmp_path / "sigterm.log").read_text()[-3000:]
    output = (tmp_path / "sigterm.log").read_text()
    assert "SIGTERM received" in output and "Run the same command to resume" in output
    stopped = max(step for step in read_metrics(workdir) if step > 0)
    assert 1 <= stopped < 200
    ckpt_dir = os.path.join(workdir, "checkpoints")
    assert checkpoint.Checkpointer(ckpt_dir).all_steps() == [stopped]

    # 2. The same command resumes from there; SIGKILL while its next save is being written.
    marker = tmp_path / "held"
    env.update(HOLD_AFTER_STEP=str(stopped), HELD_MARKER=str(marker))
    proc = start(
        [sys.executable, "-c", _HOLD_SAVES, *flags, f"--config.train.num_steps={stopped + 2}",
         "--config.checkpoint.every_steps=1"],
        "sigkill",
    )  # fmt: skip
    _wait_for(marker.exists, 600, "a save to be under way", proc)
    proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert f"Resumed from {ckpt_dir}/{stopped}." in (tmp_path / "sigkill.log").read_text()
    held = marker.read_text()
    assert os.path.basename(held).startswith(f"{stopped + 1}.orbax-checkpoint-tmp")
    assert checkpoint.Checkpointer(ckpt_dir).all_steps() == [stopped]
    # A step folder without its state (as a copy cut short would leave) is ignored too.
    os.makedirs(os.path.join(ckpt_dir, str(stopped + 2), "data"))

    # 3. Again: the last complete checkpoint is used, the incomplete ones are named, the run finishes,
    # and the steps that the killed process had already logged come out the same, bit for bit.
    overrides = dict(checkpoint__every_steps=1000, eval__every_steps=1000)
    config = make_config("pix2pix", data_dir, train__num_steps=stopped + 2, **overrides)
    with caplog.at_level(logging.WARNING):
        main.run(config, workdir)
    warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert f"Ignoring incomplete checkpoint {held}: an unfinished save" in warnings
    assert f"Ignoring incomplete checkpoint {ckpt_dir}/{stopped + 2}: it has no state/_METADATA" in warnings
    assert os.path.isdir(os.path.join(ckpt_dir, f"{stopped + 2}.incomplete"))
    assert checkpoint.Checkpointer(ckpt_dir).all_steps() == [stopped, stopped + 2]
    by_step = {}
    for record in read_metrics(workdir, merge=False):
        if "g_total" in record:
            by_step.setdefault(record["step"], []).append(logged(record))
    killed_and_final = by_step[stopped + 1]
    assert len(killed_and_final) == 2 and killed_and_final[0] == killed_and_final[1]
    assert sorted(by_step)[-1] == stopped + 2


# ---- The loop's stop, preemption and NaN rules, on a toy trainer (nothing big to compile) --------------


@flax.struct.dataclass
class ToyState:
    step: jax.Array
    w: jax.Array


class ToyIterator:
    """Batches {"x": (8, 1) filled with the batch number}; its position is its checkpointed state."""

    def __init__(self):
        self.position, self.closed = 0, False

    def __next__(self):
        self.position += 1
        return {"x": np.full((8, 1), self.position, np.float32)}

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = state["position"]

    def close(self):
        self.closed = True


@jax.jit
def _toy_step(state, batch):
    w = state.w * 0.5 + jnp.mean(batch["x"])
    return state.replace(step=state.step + 1, w=w), {"loss": w, "d_grad_norm": jnp.abs(w)}


def toy_state(mesh):
    return jax.device_put(ToyState(jnp.zeros((), jnp.int32), jnp.zeros(())), sharding.replicated(mesh))


def run_toy(workdir, num_steps, on_step=lambda step, metrics: metrics, keep=5):
    """A train_loop run (checkpoints every 2 steps, logs every step); `on_step(step, metrics)` runs
    inside each step (step = the one being completed) and returns the metrics to report."""
    config = ml_collections.ConfigDict(
        {
            "train": {"num_steps": num_steps},
            "log": {"every_steps": 1, "sample_every_steps": 1000},
            "eval": {"every_steps": 1000},
            "checkpoint": {"every_steps": 2, "keep": keep},
        }
    )
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=keep)
    train_iter = ToyIterator()
    mesh = sharding.make_mesh((("data", -1),))
    state, _ = loop.restore_latest(ckpt, toy_state(mesh), train_iter)

    def step_fn(state, batch):
        new_state, metrics = _toy_step(state, batch)
        return new_state, on_step(int(state.step) + 1, metrics)

    state = loop.train_loop(
        config,
        state=state,
        step_fn=step_fn,
        train_iter=train_iter,
        mesh=mesh,
        ckpt=ckpt,
        writer=common.JsonlWriter(os.path.join(workdir, "metrics.jsonl")),
        evaluate=lambda state: {},
        write_samples=lambda state, step: None,
    )
    return state, train_iter


@pytest.fixture(scope="module")
def toy_reference(tmp_path_factory):
    """(state, metrics) of an uninterrupted 6-step toy run."""
    workdir = str(tmp_path_factory.mktemp("toy"))
    state, _ = run_toy(workdir, 6)
    return jax.device_get(state), {s: logged(v) for s, v in read_metrics(workdir).items()}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_finishes_the_step_saves_it_and_resumes(signum, toy_reference, tmp_path):
    previous = signal.getsignal(signum)
    during = []

    def on_step(step, metrics):
        during.append(signal.getsignal(signum))
        if step == 3:
            os.kill(os.getpid(), signum)  # arrives while step 3 runs
        return metrics

    workdir = str(tmp_path)
    state, train_iter = run_toy(workdir, 6, on_step)
    assert int(state.step) == 3 and train_iter.closed
    assert checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).all_steps() == [2, 3]
    assert sorted(s for s, v in read_metrics(workdir).items() if "loss" in v) == [1, 2, 3]
    # The handler is installed only while the loop runs.
    assert during[0] is not previous and signal.getsignal(signum) is previous

    state, _ = run_toy(workdir, 6)  # the same command again
    reference_state, reference_metrics = toy_reference
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), reference_state)
    assert {s: logged(v) for s, v in read_metrics(workdir).items()} == reference_metrics


def test_a_second_sigint_stops_at_once(tmp_path):
    previous = signal.getsignal(signal.SIGINT)

    def on_step(step, metrics):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return metrics

    with pytest.raises(KeyboardInterrupt):
        run_toy(str(tmp_path), 6, on_step)
    assert signal.getsignal(signal.SIGINT) is previous
    assert checkpoint.Checkpointer(os.path.join(tmp_path, "checkpoints")).all_steps() == [2]


def test_multi_process_runs_stop_at_the_preemption_sync_step(tmp_path, monkeypatch):
    # Several processes: SIGTERM stays with JAX's preemption notifier and every process stops at the
    # step orbax's reached_preemption names, so all of them save the same step.
    monkeypatch.setattr(loop, "_single_process", lambda: False)
    monkeypatch.setattr(loop, "_jax_preemption_service_running", lambda: True)
    asked = []

    def reached_preemption(self, step):
        asked.append(step)
        return step == 3

    monkeypatch.setattr(checkpoint.Checkpointer, "reached_preemption", reached_preemption)
    sigterm = signal.getsignal(signal.SIGTERM)
    during = []

    def on_step(step, metrics):
        during.append((signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)))
        return metrics

    state, _ = run_toy(str(tmp_path), 6, on_step)
    assert int(state.step) == 3 and asked == [1, 2, 3]
    assert checkpoint.Checkpointer(os.path.join(tmp_path, "checkpoints")).all_steps() == [2, 3]
    assert during[0][0] is sigterm and during[0][1] is not signal.default_int_handler


def test_a_non_finite_gradient_norm_stops_without_touching_the_last_checkpoint(toy_reference, tmp_path):
    def on_step(step, metrics):
        return {**metrics, "d_grad_norm": jnp.inf} if step == 3 else metrics

    workdir = str(tmp_path)
    with pytest.raises(common.NonFiniteError, match=r"d_grad_norm became NaN/Inf at step 3.*step 2 in"):
        run_toy(workdir, 6, on_step)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    assert ckpt.all_steps() == [2]
    restored, data = ckpt.restore(2, toy_state(sharding.make_mesh((("data", -1),))))
    assert int(restored.step) == 2 and data == {"position": 2}
    assert sorted(s for s, v in read_metrics(workdir).items() if "loss" in v) == [1, 2]  # nor logged


def test_incomplete_checkpoints_are_ignored_named_and_set_aside(toy_reference, tmp_path, caplog):
    workdir = str(tmp_path)
    run_toy(workdir, 4)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    os.remove(os.path.join(ckpt_dir, "4", "state", "_METADATA"))  # 4: state never completely written
    shutil.copytree(os.path.join(ckpt_dir, "2"), os.path.join(ckpt_dir, "6.orbax-checkpoint-tmp-1700000000"))
    os.makedirs(os.path.join(ckpt_dir, "8", "state"))  # 8: nothing but an empty state folder

    ckpt = checkpoint.Checkpointer(ckpt_dir)
    assert ckpt.all_steps() == [2] and ckpt.latest_step() == 2
    names = [os.path.basename(path) for path, _ in ckpt.incomplete()]
    assert names == ["4", "6.orbax-checkpoint-tmp-1700000000", "8"]
    ckpt.close()

    with caplog.at_level(logging.WARNING):
        state, _ = run_toy(workdir, 8)
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Ignoring")]
    assert len(warnings) == 3
    assert f"{ckpt_dir}/4: it has no state/_METADATA" in warnings[0] and "moved to" in warnings[0]
    assert "6.orbax-checkpoint-tmp-1700000000: an unfinished save" in warnings[1]
    # Resumed from step 2, so steps 3..8 ran again, and steps 4 and 8 could be saved anew.
    assert int(state.step) == 8
    assert checkpoint.Checkpointer(ckpt_dir).all_steps() == [2, 4, 6, 8]
    assert sorted(d for d in os.listdir(ckpt_dir) if "incomplete" in d) == ["4.incomplete", "8.incomplete"]


# ---- Bad settings: clear errors before anything compiles -----------------------------------------------


def test_an_unknown_config_key_on_the_command_line_is_one_clear_line(tmp_path):
    argv = [sys.executable, "-m", "ganjax.main", "--config=configs/pix2pix_cityscapes.py:smoke",
            f"--workdir={tmp_path}", "--config.train.num_stepz=3"]  # fmt: skip
    out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    assert (
        "FATAL Flags parsing error: --config.train.num_stepz: the config has no key 'num_stepz'. "
        'Did you mean "num_steps" instead of "num_stepz"?'
    ) in out.stderr
    assert "Traceback" not in out.stderr


def _with(config, key, value):
    """Sets a possibly new key on an unlocked copy, bypassing ml_collections' type check."""
    config = ml_collections.ConfigDict(config.to_dict())
    *sections, name = key.split(".")
    node = config
    for section in sections:
        node = node[section]
    with config.ignore_type():
        node[name] = value
    return config


@pytest.mark.parametrize(
    "kind, key, value, message",
    [
        ("pix2pix", "train.num_stepz", 10, "train.num_stepz is not a setting .* config.train.num_steps"),
        ("aging", "loss.cycle_wieght", 1.0, "config.loss.cycle_wieght is not a setting"),
        ("cyclegan", "train.num_steps", "10", "config.train.num_steps = '10' is a str; .* has a int"),
        ("pix2pix", "data.flip", 1, "config.data.flip = 1 is a int; .* has a bool"),
        ("cyclegan", "train.learning_rate", -2e-4, "config.train.learning_rate = -0.0002 must be > 0"),
        ("distill_pix2pix", "train.learning_rate", 0.0, "config.train.learning_rate = 0.0 must be > 0"),
        ("distill_cyclegan", "distill.lambda_kd", -1.0, "config.distill.lambda_kd = -1.0 must be >= 0"),
        ("cyclegan", "data.crop_size", 30, "config.data.crop_size = 30 must be a multiple of 4"),
        ("aging", "data.size", 12, "config.data.size = 12 must be a multiple of 4 .* at least 16"),
        ("cyclegan", "train.batch_size", 6, "batch_size = 6 is not divisible by the mesh's data axis"),
        ("distill_cyclegan", "train.batch_size", 12, "batch_size = 12 is not divisible by the mesh's data"),
    ],
)
def test_bad_settings_fail_before_anything_compiles(kind, key, value, message, data_dir, teachers, tmp_path):
    config = _with(make_config(kind, data_dir, teachers, single_device=False), key, value)
    with pytest.raises(common.ConfigError, match=message):
        main.run(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_an_unwritable_workdir_is_reported(data_dir, tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(common.ConfigError, match="--workdir .*a_file/run is not writable"):
        main.run(make_config("cyclegan", data_dir, single_device=False), str(tmp_path / "a_file" / "run"))


def test_a_checkpoint_of_another_shape_names_the_first_parameter(straight, data_dir, tmp_path):
    reference, _, _ = straight("pix2pix")
    wider = make_config("pix2pix", data_dir, model__ngf=8)
    _, _, _, _, _, _, init, state_sharding = pix2pix._setup(wider, str(tmp_path))
    abstract = loop.abstract_state(init, tc.init_key(0), state_sharding)
    ckpt = checkpoint.Checkpointer(os.path.join(reference, "checkpoints"))
    first = r"2: 'g_params/[\w/]+' has shape \(.*\) but the config builds"
    with pytest.raises(checkpoint.CheckpointShapeError, match=first):
        ckpt.restore(2, abstract)
    ckpt.close()


def test_shipped_configs_pass_the_key_check():
    for module in CONFIGS.values():
        for variant in getattr(module, "VARIANTS", ("",)) + ("smoke",):
            common.check_config_keys(module.get_config(variant))
