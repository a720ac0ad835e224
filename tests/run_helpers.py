"""Helpers shared by the trainer tests: smoke configs with overrides, and the losses a run logged."""

from ganjax.trainers.common import read_metrics


def smoke_config(config_module, data_dir: str, variant: str = "smoke", **overrides):
    """`config_module.get_config(variant)` reading and building its data under `data_dir`; overrides are
    given as section__key=value (e.g. train__num_steps=4)."""
    config = config_module.get_config(variant)
    config.data.data_dir = data_dir
    for key, value in overrides.items():
        section, name = key.split("__")
        config[section][name] = value
    return config


def losses_by_step(workdir: str, keys) -> dict[int, list[float]]:
    """{step: [value of each key]} for the logged training steps (those that have keys[0])."""
    return {
        step: [values[k] for k in keys] for step, values in read_metrics(workdir).items() if keys[0] in values
    }
