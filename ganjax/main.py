"""The only entry point with flags: picks the trainer named by `config.trainer` and runs a mode.

python -m ganjax.main --config configs/aging_utkface.py:synthetic --workdir runs/demo
python -m ganjax.main --config configs/aging_utkface.py --workdir runs/utk --mode eval
"""

from absl import app, flags, logging
from ml_collections import config_flags

from ganjax.trainers import aging, cyclegan, pix2pix

# config.trainer -> module with validate_config(config), train(config, workdir),
# evaluate(config, workdir). An explicit dict: no import-side-effect registry.
TRAINERS = {
    "aging": aging,
    "pix2pix": pix2pix,
    "cyclegan": cyclegan,
    # SRPKD distillation: the teacher's trainer with a frozen teacher (ganjax/trainers/distillation.py)
    "distill_pix2pix": pix2pix,
    "distill_cyclegan": cyclegan,
}
MODES = ("train", "eval")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/aging_utkface.py:synthetic", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
_MODE = flags.DEFINE_enum("mode", "train", MODES, "train (or resume) | eval (latest checkpoint).")
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
    trainer.validate_config(config)
    if mode == "train":
        return trainer.train(config, workdir)
    if mode == "eval":
        return trainer.evaluate(config, workdir)
    raise ValueError(f"--mode {mode!r} is not one of {MODES}.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    run(_CONFIG.value, _WORKDIR.value, _MODE.value)


if __name__ == "__main__":
    app.run(main)
