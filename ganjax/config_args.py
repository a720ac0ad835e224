"""The argument after a config file's colon: `configs/distill_pix2pix_cityscapes.py:arch=unet,student=16`.

Comma-separated items: at most one bare word (the variant: "", "synthetic", "smoke") and key=value
pairs from a fixed set of keys. Errors list what is allowed, since a typo here would otherwise silently
train the wrong model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def parse_config_arg(
    arg: str | None, *, config_name: str, variants: Sequence[str], choices: Mapping[str, Sequence[str]]
) -> tuple[str, dict[str, str]]:
    """Returns (variant, {key: value} for the keys given). Raises ValueError naming the bad item and the
    allowed ones."""
    variant, values = "", {}
    for item in (arg or "").split(","):
        item = item.strip()
        if not item:
            continue
        if "=" in item:
            key, value = (part.strip() for part in item.split("=", 1))
            if key not in choices:
                raise ValueError(f"Unknown key {key!r} in {config_name}:{arg}; keys: {sorted(choices)}.")
            if value not in choices[key]:
                raise ValueError(
                    f"{config_name}: {key}={value!r} is not one of {tuple(choices[key])} (from {arg!r})."
                )
            values[key] = value
        elif item in variants and not variant:
            variant = item
        else:
            named = tuple(v for v in variants if v)
            raise ValueError(
                f"Unexpected {item!r} in {config_name}:{arg}; one variant of {named} and key=value pairs "
                f"with keys {sorted(choices)}."
            )
    return variant, values
