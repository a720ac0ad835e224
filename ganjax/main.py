"""The only entry point with flags: picks the trainer named by `config.trainer` and runs a mode.

python -m ganjax.main --config configs/aging_utkface.py:synthetic --workdir runs/demo
python -m ganjax.main --config configs/aging_utkface.py --workdir runs/utk --mode eval

Multi-process jobs (TPU pods, several GPU hosts; launch/*.sh) run this same command in every process:
--distributed=auto (the default, or $GANJAX_DISTRIBUTED) joins them on TPU VMs, under SLURM / Open MPI
and when JAX_COORDINATOR_ADDRESS is set; see ganjax/sharding.py and docs/scale.md.
"""

import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from ganjax import host_allocator, sharding
from ganjax.data import prepare
from ganjax.trainers import age_regressor, aging, common, cyclegan, pix2pix

# config.trainer -> module with validate_config(config), train(config, workdir),
# evaluate(config, workdir). An explicit dict: no import-side-effect registry.
TRAINERS = {
    "aging": aging,
    "pix2pix": pix2pix,
    "cyclegan": cyclegan,
    # SRPKD distillation: the teacher's trainer with a frozen teacher (ganjax/trainers/distillation.py)
    "distill_pix2pix": pix2pix,
    "distill_cyclegan": cyclegan,
    # the independent age estimator that judges aged faces (config.eval.regressor of aging runs)
    "age_regressor": age_regressor,
}
MODES = ("train", "eval")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/aging_utkface.py:synthetic", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
_MODE = flags.DEFINE_enum(
    "mode", "train", MODES, "train (or resume) | eval (config.eval.step / watch; writes WORKDIR/eval/)."
)
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed",
    os.environ.get("GANJAX_DISTRIBUTED", "auto"),
    sharding.DISTRIBUTED_MODES,
    "Join a multi-process job with jax.distributed.initialize: auto (TPU VMs, SLURM, Open MPI, "
    "JAX_COORDINATOR_ADDRESS), on, off. Default: $GANJAX_DISTRIBUTED or auto.",
)
flags.mark_flags_as_required(["config", "workdir"])


def get_trainer(config):
    if config.trainer not in TRAINERS:
        raise ValueError(
            f"config.trainer = {config.trainer!r} is not one of {tuple(TRAINERS)} (ganjax.main.TRAINERS)."
        )
    return TRAINERS[config.trainer]


def run(config, workdir: str, mode: str = "train"):
    """Programmatic entry point (tests and notebooks): validate, then train or evaluate."""
    trainer = get_trainer(config)
    common.check_config_keys(config)  # typos and wrong types in configs built in Python
    trainer.validate_config(config)
    if mode == "train":
        return trainer.train(config, workdir)
    if mode == "eval":
        return trainer.evaluate(config, workdir)
    raise ValueError(f"--mode {mode!r} is not one of {MODES}.")


def prepare_data_once(config) -> None:
    """Builds the config's dataset on process 0 while the others wait (a multi-process job).

    TFDS builds into a temporary folder and renames it, but two simultaneous builds into a shared
    data_dir would race. Processes whose data_dir is not shared with process 0 build their own copy
    when the trainer opens it.
    """
    if jax.process_count() == 1 or config.data.get("name") not in prepare.DATASETS:
        return
    if jax.process_index() == 0:
        prepare.prepare(config.data)
    sharding.sync("ganjax: data prepared")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    host_allocator.configure()  # before jax's threads start: XLA:CPU temporaries stay mapped
    logging.set_verbosity(logging.INFO)
    sharding.initialize_distributed(_DISTRIBUTED.value)
    if jax.process_index() != 0:
        logging.set_verbosity(logging.WARNING)  # one copy of the progress log, from process 0
    prepare_data_once(_CONFIG.value)
    run(_CONFIG.value, _WORKDIR.value, _MODE.value)


def parse_flags(argv):
    """absl's flag parsing, with a one-line error for a --config.KEY override that the config does not
    have (ml_collections raises AttributeError there, which absl would print as a traceback)."""
    try:
        return app.parse_flags_with_usage(argv)
    except AttributeError as e:
        cause = e.args[0] if e.args else e  # ml_collections wraps a KeyError: "'key'\nDid you mean ..."
        detail = str(cause.args[0] if isinstance(cause, KeyError) and cause.args else cause)
        lines = detail.split("\n")
        key, hint = lines[0].strip("'\""), " ".join(lines[1:])  # hint: 'Did you mean "x" instead of "y"?'
        named = [a.split("=")[0] for a in argv if a.startswith("--config.") and key in a.split("=")[0]]
        flag = named[0] if named else "--config.*"
        sys.exit(f"FATAL Flags parsing error: {flag}: the config has no key {key!r}. {hint}".rstrip())


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
