"""Multi-process training on one machine: two real JAX processes joined over localhost (gloo CPU
collectives), each with 4 fake CPU devices, against one process with 8.

One module fixture runs three 2-step pix2pix :smoke trainings side by side, as subprocesses (a process
can hold one JAX runtime only; the XLA optimisation level 0 they share halves the compile time):
  two      launch/local.sh: 2 processes x 4 devices, mesh data=2 x fsdp=4 (parameters sharded)
  one      tests/multihost_run.py: 1 process x 8 devices, mesh data=8 (replicated), reading both
           processes' data shards so that its global batches equal the two-process run's
  one_fsdp the same single process with the two-process run's mesh data=2 x fsdp=4
Then: two == one (multi-process), one_fsdp == one (FSDP), the two-process checkpoint restores in this
(single) process and equals the single-process one, and only process 0 wrote logs, pictures and
metrics. The data pipeline's per-process sharding is checked directly, without JAX runtimes.
"""

import glob
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import pix2pix_cityscapes
from ganjax import checkpoint, sharding
from ganjax.data import prepare, translation_pipeline
from ganjax.trainers import common, loop, pix2pix
from ganjax.trainers import translation_common as tc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSS_KEYS = ("g_total", "d_total", "g_adversarial", "g_l1", "d_real_logit", "d_fake_logit", "g_grad_norm")
FSDP_MESH = "--config.mesh.axes=(('data', 2), ('fsdp', 4))"
TIMEOUT_S = 600


def smoke_config(data_dir):
    config = pix2pix_cityscapes.get_config("smoke")
    config.data.data_dir = data_dir
    return config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def read_metrics(workdir):
    """[(step, record)] of metrics.jsonl in file order (duplicates kept)."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [(r.pop("step"), r) for r in map(json.loads, f)]


def losses(workdir, keys=LOSS_KEYS):
    return {step: [r[k] for k in keys] for step, r in read_metrics(workdir) if "g_total" in r}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The smoke scenes, built once here: the runs below only read them."""
    path = str(tmp_path_factory.mktemp("tfds"))
    prepare.prepare(smoke_config(path).data)
    return path


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """{"two", "one", "one_fsdp"} -> workdir, after all three finished (they run concurrently)."""
    base = tmp_path_factory.mktemp("multihost")
    workdirs = {name: str(base / name) for name in ("two", "one", "one_fsdp")}
    flags = [
        "--config",
        "configs/pix2pix_cityscapes.py:smoke",
        f"--config.data.data_dir={data_dir}",
        "--config.train.num_steps=2",  # one checkpoint (smoke: every 2 steps), eval and samples at 2
        "--config.train.decay_steps=1",
        "--config.mesh.min_shard_size=0",  # the smoke networks are tiny: shard every divisible array
    ]
    env = {
        **os.environ,
        "PYTHONPATH": ROOT,
        "OPENBLAS_NUM_THREADS": "1",
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_backend_optimization_level=0",  # local.sh adds the device count
    }
    single_env = {**env, "XLA_FLAGS": env["XLA_FLAGS"] + " --xla_force_host_platform_device_count=8"}
    one = [sys.executable, "tests/multihost_run.py", "--as_processes=2", "--distributed=off", *flags]
    commands = {
        "two": (
            ["bash", "launch/local.sh", "-n", "2", "-d", "4", "-p", str(free_port()), "--"]
            + [*flags, FSDP_MESH, "--workdir", workdirs["two"]],
            {**env, "PYTHON": sys.executable},
        ),
        "one": ([*one, "--config.mesh.axes=(('data', -1),)", "--workdir", workdirs["one"]], single_env),
        "one_fsdp": ([*one, FSDP_MESH, "--workdir", workdirs["one_fsdp"]], single_env),
    }
    procs = {}
    try:
        for name, (command, run_env) in commands.items():
            log = open(base / f"{name}.out", "w")  # noqa: SIM115 - closed with the process below
            procs[name] = (
                subprocess.Popen(
                    command,
                    cwd=ROOT,
                    env=run_env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                ),
                log,
            )
        for name, (proc, log) in procs.items():
            status = proc.wait(timeout=TIMEOUT_S)
            log.close()
            if status:
                with open(base / f"{name}.out") as f:
                    tail = f.read()[-6000:]
                logs = glob.glob(os.path.join(workdirs[name], "logs", "process_*.log"))
                for path in sorted(logs):
                    with open(path) as f:
                        tail += f"\n---- {path}\n" + f.read()[-4000:]
                pytest.fail(f"run {name!r} exited with status {status}:\n{tail}")
    finally:
        for proc, log in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, 9)  # the process group this fixture started
                proc.wait()
            log.close()
    return workdirs


def assert_same_losses(a, b, what):
    la, lb = losses(a), losses(b)
    assert la.keys() == lb.keys() == {1, 2}, (la.keys(), lb.keys())
    for step in la:
        np.testing.assert_allclose(la[step], lb[step], rtol=1e-5, atol=1e-6, err_msg=f"{what}, step {step}")


def test_two_processes_give_the_losses_of_one(runs):
    assert_same_losses(runs["two"], runs["one"], "2 processes x 4 devices (fsdp) vs 1 x 8 (replicated)")
    # The in-loop evaluation (the generator's outputs all-gathered from both processes) agrees too.
    final = {k: v for _, r in read_metrics(runs["two"]) for k, v in r.items() if k.startswith("eval/")}
    reference = {k: v for _, r in read_metrics(runs["one"]) for k, v in r.items() if k.startswith("eval/")}
    assert final.keys() == reference.keys() and final
    for key in final:
        np.testing.assert_allclose(final[key], reference[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_fsdp_gives_the_losses_of_replicated_parameters(runs):
    assert_same_losses(runs["one_fsdp"], runs["one"], "data=2 x fsdp=4 vs data=8, one process")


def test_only_process_zero_writes_logs_pictures_and_metrics(runs):
    workdir = runs["two"]
    steps = [step for step, r in read_metrics(workdir) if "g_total" in r]
    assert steps == [1, 2]  # one writer: no step twice
    assert len(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))) == 1
    assert os.listdir(os.path.join(workdir, "samples")) == ["translation_0000002.png"]
    assert os.path.exists(os.path.join(workdir, common.CONFIG_FILE))
    with open(os.path.join(workdir, "logs", "process_0.log")) as f:
        log0 = f.read()
    with open(os.path.join(workdir, "logs", "process_1.log")) as f:
        log1 = f.read()
    assert "Process 0 of 2: 4 local devices of 8." in log0
    assert "g_total=" in log0 and "g_total=" not in log1  # progress is logged by process 0 only
    assert "State partitioning on mesh {'data': 2, 'fsdp': 4}" in log0


def test_two_process_checkpoint_restores_in_one_process(runs, data_dir, tmp_path):
    """Written by 2 processes with fsdp-sharded arrays, read here by 1 process into replicated arrays."""
    config = smoke_config(data_dir)
    config.mesh.axes = (("data", -1),)
    _, mesh, _, _, _, _, init, state_sharding = pix2pix._setup(config, str(tmp_path))
    abstract = loop.abstract_state(init, tc.init_key(0), state_sharding)
    states = {}
    for name in ("two", "one"):
        ckpt = checkpoint.Checkpointer(os.path.join(runs[name], "checkpoints"))
        assert ckpt.all_steps() == [2]
        states[name], data_state = ckpt.restore(2, abstract)
        ckpt.close()
        assert data_state
    assert int(states["two"].step) == 2
    leaves = jax.tree_util.tree_leaves_with_path(states["two"])
    for (path, two), one in zip(leaves, jax.tree.leaves(states["one"]), strict=True):
        assert two.sharding == sharding.replicated(mesh)
        # Summation order differs (gloo vs one process): ~1e-6 on Adam's first moment after 2 steps.
        np.testing.assert_allclose(
            np.asarray(two), np.asarray(one), rtol=1e-3, atol=2e-5, err_msg=jax.tree_util.keystr(path)
        )


# ---- The data side, without JAX runtimes ---------------------------------------------------------


def _epoch(data_dir, process_index, process_count, *, flip, batches):
    config = smoke_config(data_dir)
    config.data.flip = flip
    it = translation_pipeline.make_paired_iterator(
        config.data,
        global_batch_size=8,
        seed=0,
        process_index=process_index,
        process_count=process_count,
    )
    try:
        out = np.concatenate([next(it)["b"] for _ in range(batches)])
        return out, it.get_state()
    finally:
        common.close_iterator(it)


def test_each_process_reads_its_own_shard_with_its_own_augmentation(data_dir):
    # 16 train scenes, 2 processes x 4 examples per step: one epoch of a shard is 2 batches.
    whole, _ = _epoch(data_dir, 0, 1, flip=False, batches=2)
    shards = [_epoch(data_dir, i, 2, flip=False, batches=2)[0] for i in range(2)]
    keys = [{image.tobytes() for image in shard} for shard in shards]
    assert len(keys[0]) == len(keys[1]) == 8
    assert not keys[0] & keys[1]  # disjoint shards ...
    assert keys[0] | keys[1] == {image.tobytes() for image in whole}  # ... that cover the data

    # The flips: process 1's are not process 0's pattern (they would be with a shared seed).
    flipped, states = [], []
    for i in range(2):
        plain = _epoch(data_dir, i, 2, flip=False, batches=4)[0]
        augmented, state = _epoch(data_dir, i, 2, flip=True, batches=4)
        mirrored = np.array([not np.array_equal(a, p) for a, p in zip(augmented, plain, strict=True)])
        np.testing.assert_array_equal(augmented[mirrored], plain[mirrored][:, :, ::-1])  # load = crop
        flipped.append(mirrored.tolist())
        states.append(state)
    assert 0 < sum(flipped[0]) < 16 and flipped[0] != flipped[1]
    # The iterator state is a position, the same on every process: the checkpoint stores process 0's.
    assert states[0] == states[1]


def test_batch_not_divisible_by_data_times_fsdp_is_reported(data_dir, tmp_path):
    config = smoke_config(data_dir)
    config.mesh.axes = (("data", 2), ("fsdp", 4))
    config.train.batch_size = 4
    with pytest.raises(common.ConfigError, match=r"data axis times its fsdp axis \(8 devices"):
        pix2pix._setup(config, str(tmp_path))
