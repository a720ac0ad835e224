"""launch/*.sh: up-front validation and the commands their --dry-run prints.

gcloud and srun are replaced by stubs that record any call: a dry run must not need them. The real
run of launch/local.sh is in tests/test_multihost.py.
"""

import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_ARGS = ["--config", "configs/pix2pix_cityscapes.py", "--workdir", "/shared/runs/it's here"]


@pytest.fixture
def launch(tmp_path):
    """run(script, *args, **env) -> CompletedProcess, with failing gcloud / srun / scontrol stubs."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    called = tmp_path / "called"
    for tool in ("gcloud", "srun", "scontrol"):
        (stubs / tool).write_text(f"#!/bin/sh\necho {tool} >> {called}\nexit 99\n")
        (stubs / tool).chmod(0o755)

    def run(script, *args, **env):
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU_", "XLA_"))}
        full_env = {**clean, "PATH": f"{stubs}:{os.environ['PATH']}", **env}
        result = subprocess.run(
            ["bash", f"launch/{script}", *args], cwd=ROOT, env=full_env, capture_output=True, text=True
        )
        assert not called.exists(), f"{script} called {called.read_text()}"
        return result

    return run


def lines(result):
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if line and not line.startswith("#")]


# ---- local.sh ------------------------------------------------------------------------------------


def test_local_dry_run_prints_one_command_per_process(launch):
    result = launch(
        "local.sh", "--dry-run", "-n", "3", "-d", "2", "-p", "23456", "--", *TRAIN_ARGS,
        XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_cpu_enable_fast_math=false",
    )  # fmt: skip
    mkdir, *commands = lines(result)
    assert mkdir == "mkdir -p /shared/runs/it\\'s\\ here/logs"
    assert len(commands) == 3
    for i, command in enumerate(commands):
        assert f"JAX_PROCESS_ID={i} " in command and "JAX_NUM_PROCESSES=3 " in command
        assert "JAX_COORDINATOR_ADDRESS=localhost:23456 " in command and "JAX_PLATFORMS=cpu " in command
        # The caller's other XLA flags are kept; the device count is the script's.
        assert re.search(
            r"XLA_FLAGS=--xla_cpu_enable_fast_math=false\\ --xla_force_host_platform_device_count=2 ", command
        )
        assert "device_count=8" not in command
        assert command.endswith(f"--distributed=on > /shared/runs/it\\'s\\ here/logs/process_{i}.log 2>&1")
        assert " -m ganjax.main --config configs/pix2pix_cityscapes.py --workdir " in command


@pytest.mark.parametrize(
    "args, message",
    [
        (["--", "--config", "c"], "pass --workdir"),
        (["--", "--workdir", "w"], "pass --config"),
        (["-n", "0", "--", *TRAIN_ARGS], "NUM_PROCESSES must be a positive integer"),
        (["-d", "x", "--", *TRAIN_ARGS], "DEVICES_PER_PROCESS must be a positive integer"),
        (["-p", "80", "--", *TRAIN_ARGS], r"COORDINATOR_PORT must be in \[1024, 65535\]"),
        (["--workers", "2"], "unknown option --workers"),
    ],
)
def test_local_validates_up_front(launch, args, message):
    result = launch("local.sh", "--dry-run", *args)
    assert result.returncode == 2 and re.search(message, result.stderr), result.stderr


# ---- gpu_slurm.sh --------------------------------------------------------------------------------

SLURM = {"SLURM_JOB_ID": "4321", "SLURM_JOB_NODELIST": "gpu[07-08,11],cpu1", "SLURM_JOB_NUM_NODES": "3"}


def test_slurm_dry_run_one_process_per_node(launch):
    (command,) = lines(launch("gpu_slurm.sh", "--dry-run", "--", *TRAIN_ARGS, **SLURM))
    assert command.startswith("srun --nodes=3 --ntasks=3 --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '")
    # Port from the job id; the first host of the node list; id and count from each task's SLURM env.
    assert "export JAX_COORDINATOR_ADDRESS=gpu07:24321 " in command
    assert "JAX_NUM_PROCESSES=$SLURM_NTASKS JAX_PROCESS_ID=$SLURM_PROCID;" in command
    assert "JAX_LOCAL_DEVICE_IDS" not in command
    assert command.endswith(
        "exec python3 -m ganjax.main --config configs/pix2pix_cityscapes.py "
        "--workdir /shared/runs/it\\'\\''s\\ here --distributed=on'"
    )


def test_slurm_dry_run_one_process_per_gpu(launch):
    env = {**SLURM, "SLURM_GPUS_ON_NODE": "8", "COORDINATOR_PORT": "31000", "PYTHON": "/venv/bin/python"}
    (command,) = lines(launch("gpu_slurm.sh", "--dry-run", "--per-gpu", "--", *TRAIN_ARGS, **env))
    assert command.startswith("srun --nodes=3 --ntasks=24 --ntasks-per-node=8 ")
    assert "JAX_COORDINATOR_ADDRESS=gpu07:31000 " in command
    assert "JAX_LOCAL_DEVICE_IDS=$SLURM_LOCALID; exec /venv/bin/python -m ganjax.main " in command


@pytest.mark.parametrize(
    "drop, extra, args, message",
    [
        ("SLURM_JOB_ID", {}, [], "SLURM_JOB_ID is not set: run inside a SLURM allocation"),
        ("SLURM_JOB_NODELIST", {}, [], "SLURM_JOB_NODELIST is not set"),
        (None, {}, ["--per-gpu"], "--per-gpu needs GPUS_PER_NODE"),
        (None, {"COORDINATOR_PORT": "99999"}, [], "COORDINATOR_PORT must be in"),
    ],
)
def test_slurm_validates_up_front(launch, drop, extra, args, message):
    env = {k: v for k, v in SLURM.items() if k != drop}
    result = launch("gpu_slurm.sh", "--dry-run", *args, "--", *TRAIN_ARGS, **env, **extra)
    assert result.returncode == 2 and message in result.stderr, result.stderr


# ---- tpu_vm.sh -----------------------------------------------------------------------------------

TPU = {"TPU_NAME": "ganjax-pod", "ZONE": "us-central2-b", "ACCELERATOR_TYPE": "v4-32", "PROJECT": "proj"}
WHERE = "ganjax-pod --zone=us-central2-b --project=proj"


def test_tpu_dry_run_creates_stops_copies_installs_and_runs_on_all_workers(launch):
    commands = lines(launch("tpu_vm.sh", "--dry-run", "--", *TRAIN_ARGS, **TPU))
    create, stop, copy, setup, train = commands[:5]
    assert create == (
        f"gcloud compute tpus tpu-vm create {WHERE} --accelerator-type=v4-32 --version=tpu-ubuntu2204-base"
    )
    assert stop.startswith(f"gcloud compute tpus tpu-vm ssh {WHERE} --worker=all --command='")
    assert 'kill -- -"$(cat ~/ganjax_train.pid)"' in stop and "lsof -t /dev/accel*" in stop
    assert copy.startswith("gcloud compute tpus tpu-vm scp /tmp/ganjax-src-ganjax-pod.tgz ganjax-pod:")
    assert copy.endswith("--worker=all")
    assert "--worker=all" in setup and "pip install -q -e ~/ganjax'\\''[tpu]'\\''" in setup
    assert "--worker=all" in train and "setsid nohup ~/ganjax-venv/bin/python -m ganjax.main " in train
    assert "--workdir /shared/runs/it\\'\\''s\\ here --distributed=on" in train


def test_tpu_dry_run_variants(launch):
    # Reuse the VM and the installed code: stop, then start again.
    stop, train = lines(launch("tpu_vm.sh", "--dry-run", "--skip-create", "--skip-setup", "--", *TRAIN_ARGS,
                               TPU_NAME="t", ZONE="z"))  # fmt: skip
    assert "lsof" in stop and "ganjax.main" in train
    # Clone a repository at a ref instead of copying this checkout; mount a bucket.
    env = {**TPU, "REPO_URL": "https://github.com/me/ganjax.git", "REPO_REF": "v1", "GCS_BUCKET": "my-bucket"}
    commands = lines(launch("tpu_vm.sh", "--dry-run", "--", *TRAIN_ARGS, **env))
    assert not any(" scp " in c for c in commands)
    setup = next(c for c in commands if "pip install" in c)
    assert "git clone -q https://github.com/me/ganjax.git ~/ganjax && git -C ~/ganjax checkout -q v1" in setup
    assert "gcsfuse --implicit-dirs --rename-dir-limit=200000 my-bucket /mnt/gcs" in setup
    # Only stop.
    (stop,) = lines(launch("tpu_vm.sh", "--dry-run", "--stop", TPU_NAME="t", ZONE="z"))
    assert "lsof" in stop


@pytest.mark.parametrize(
    "env, args, message",
    [
        ({"ZONE": "z", "ACCELERATOR_TYPE": "v4-8"}, TRAIN_ARGS, "TPU_NAME is not set"),
        ({"TPU_NAME": "t", "ACCELERATOR_TYPE": "v4-8"}, TRAIN_ARGS, "ZONE is not set"),
        ({"TPU_NAME": "t", "ZONE": "z"}, TRAIN_ARGS, "ACCELERATOR_TYPE is not set"),
        ({**TPU}, ["--config", "c"], "pass --workdir"),
        ({**TPU, "REPO_REF": "v1"}, TRAIN_ARGS, "REPO_REF needs REPO_URL"),
    ],
)
def test_tpu_validates_up_front(launch, env, args, message):
    result = launch("tpu_vm.sh", "--dry-run", "--", *args, **env)
    assert result.returncode == 2 and message in result.stderr, result.stderr
