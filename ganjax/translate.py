"""Translate a folder of images with the generator of a pix2pix or CycleGAN run (teacher or student).

  python -m ganjax.translate --workdir runs/h2z --input photos/ --output out/ \
      [--direction AtoB|BtoA] [--size crop|native|N|HxW] [--batch_size 8] [--step N]

The network is rebuilt from WORKDIR/config.json (`translation_common.make_generator`) and only its
parameters (and batch-norm statistics) are read from the latest complete checkpoint, or from --step.

Directions are named in the dataset's folder terms (trainA/trainB, or the A|B halves of aligned images):
the run's config.data.direction is the direction it was trained in (its "forward" generator); the
opposite one is its "backward" generator, which only CycleGAN-style runs have (G_B). Default: forward.

Images: every readable file under --input (recursively; hidden files skipped) is converted to RGB
(EXIF orientation applied), resized with PIL bicubic to the network size that --size gives, scaled to
float32 [-1, 1] and translated; the output (uint8 PNG of the network size) goes to the same relative
path under --output with the extension replaced by .png. --size:
  crop    (default) every image to the run's data.crop_size square, as the trainers' test images;
  native  each image keeps its size, rounded to the nearest multiple the architecture needs (ResNets: 4,
          unet_128: 128, unet_256: 256), so only a few pixels of resampling at most for ResNets;
  N, HxW  every image to that size (it must be such a multiple).
Images are batched per network size (one compilation per size; the last batch is padded).

Test-time semantics follow the run's config.eval.train_mode, as the trainers' evaluation does
(`translation_in_loop.make_translate_fn`): True = the pix2pix reference protocol (batch norm on each
image's own statistics, dropout on), False = running statistics, no dropout. Every image gets the same
dropout mask, so an output depends only on its input image, not on the batch or the file order.

Files that cannot be read as images are skipped, counted and named at the end.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from PIL import Image, ImageOps

from ganjax import visualize
from ganjax.checkpoint import CheckpointShapeError
from ganjax.evaluation import batching, translation_in_loop
from ganjax.trainers import common
from ganjax.trainers import translation_common as tc


class UsageError(ValueError):
    """A command-line value that cannot work; the message says which option and what to change."""


# ---- Where each trainer keeps its generators -----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GeneratorFields:
    """Key paths of one generator's parameters and batch-norm statistics in a checkpointed train state."""

    params: tuple[str, ...]
    batch_stats: tuple[str, ...]


FORWARD, BACKWARD = "forward", "backward"  # config.data.direction, and its opposite

_SINGLE = {FORWARD: GeneratorFields(("g_params",), ("g_batch_stats",))}
# cyclegan.GENERATORS: G_A maps the run's input domain to its output domain, G_B back.
_PAIR = {
    FORWARD: GeneratorFields(("g_params", "G_A"), ("g_batch_stats", "G_A")),
    BACKWARD: GeneratorFields(("g_params", "G_B"), ("g_batch_stats", "G_B")),
}
# config.trainer -> {FORWARD / BACKWARD: fields}. A new trainer whose state keeps a generator built by
# `translation_common.make_generator(config)` becomes translatable and exportable by adding a line here.
# The distillation trainers keep their student generators in the teachers' fields.
GENERATOR_FIELDS: Mapping[str, Mapping[str, GeneratorFields]] = {
    "pix2pix": _SINGLE,
    "cyclegan": _PAIR,
    "distill_pix2pix": _SINGLE,
    "distill_cyclegan": _PAIR,
}
DIRECTIONS = ("AtoB", "BtoA")


def opposite(direction: str) -> str:
    return "BtoA" if direction == "AtoB" else "AtoB"


def resolve_direction(config, direction: str | None) -> tuple[str, str]:
    """(direction, FORWARD | BACKWARD) for --direction (None = the run's config.data.direction)."""
    trained = config.data.direction
    direction = direction or trained
    if direction not in DIRECTIONS:
        raise UsageError(f"--direction {direction!r} is not one of {DIRECTIONS}.")
    role = FORWARD if direction == trained else BACKWARD
    if role not in GENERATOR_FIELDS[config.trainer]:
        raise UsageError(
            f"--direction {direction}: this {config.trainer} run has one generator, trained {trained} "
            f"(config.data.direction); it cannot translate {direction}. Leave --direction out."
        )
    return direction, role


# ---- Finding the run -----------------------------------------------------------------------------


def load_config(workdir: str):
    """(absolute workdir, its saved ConfigDict); FileNotFoundError that says what is missing."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"--workdir {workdir} does not exist.")
    return workdir, common.load_run_config(workdir)


def find_checkpoint(workdir: str, step: int | None = None) -> tuple[int, str]:
    """(step, WORKDIR/checkpoints/<step>) of the latest complete checkpoint, or of `step`."""
    directory = os.path.join(workdir, "checkpoints")
    steps = []
    if os.path.isdir(directory):
        # Complete steps only: orbax writes "<step>.orbax-checkpoint-tmp-*" and renames it when done.
        steps = sorted(
            int(d) for d in os.listdir(directory) if d.isdigit() and os.path.isdir(os.path.join(directory, d))
        )
        steps = [s for s in steps if os.path.isdir(os.path.join(directory, str(s), "state"))]
    if not steps:
        raise FileNotFoundError(
            f"{workdir} has no checkpoint ({directory} holds no complete <step>/state folder): train the run "
            f"first (python -m ganjax.main --config ... --workdir {workdir})."
        )
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(f"--step {step}: {directory} has no checkpoint at that step; it has {steps}.")
    return step, os.path.join(directory, str(step))


def abstract_on_one_device(tree):
    """ShapeDtypeStructs on the default device: restore targets for tools that run on one device."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)


def restore_fields(step_dir: str, fields: Mapping[tuple[str, ...], Any]) -> dict[tuple[str, ...], Any]:
    """Reads only the subtrees at the given key paths of a checkpointed state (`common.restore_subtrees`).

    fields: key path -> abstract pytree (ShapeDtypeStructs with shardings). Returns path -> arrays.
    """
    targets: dict[str, Any] = {}
    for path, tree in fields.items():
        node = targets
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = tree
    try:
        restored = common.restore_subtrees(step_dir, targets, "workdir")
    except CheckpointShapeError as e:
        # restore_subtrees names a config key; here the mismatch is between config.json and the checkpoint.
        raise CheckpointShapeError(
            f"the checkpoint does not match the run's config.json: {str(e).split(': ', 1)[-1]}"
        ) from None

    def at(path):
        node = restored
        for key in path:
            node = node[key]
        return node

    return {path: at(path) for path in fields}


# ---- The generator of a run ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunGenerator:
    """One generator of a run, restored: `module.apply(variables, images, train=...)`.

    direction: "AtoB" / "BtoA" in the dataset's folder terms; role: FORWARD / BACKWARD; factor: input
    heights and widths must be multiples of it; crop_size: the run's training size.
    """

    workdir: str
    config: Any
    step: int
    direction: str
    role: str
    module: nn.Module
    variables: dict
    factor: int
    crop_size: int

    @property
    def train_mode(self) -> bool:
        # Absent in a config = the reference's default test protocol.
        return bool(self.config.eval.get("train_mode", True))

    def make_apply(self) -> Callable[[jax.Array], jax.Array]:
        """images float32 (B, H, W, 3) in [-1, 1] -> float32 (B, H, W, 3) in [-1, 1] (jit-able, pure)."""
        translate = translation_in_loop.make_translate_fn(
            self.module, train_mode=self.train_mode, seed=self.config.seed
        )
        variables = self.variables

        def apply(images):
            # Index 0 for every image: one dropout mask, so an output depends only on its input.
            return translate(variables, images, jnp.zeros((images.shape[0],), jnp.int32))

        return apply


def downsampling_factor(config) -> int:
    """Input sizes must be multiples of this (2 ** the generator's number of halvings)."""
    # translation_common's table is the one its config check uses: keep one source of truth.
    return 2 ** tc.GENERATOR_DOWNSAMPLING[config.model.generator]


def load_generator(workdir: str, direction: str | None = None, step: int | None = None) -> RunGenerator:
    """The generator of a pix2pix / CycleGAN (or distilled student) run for `direction` (see module doc)."""
    workdir, config = load_config(workdir)
    if config.trainer not in GENERATOR_FIELDS:
        hint = ""
        if config.trainer == "aging":
            hint = " (aging runs: python -m ganjax.export, python -m ganjax.age)"
        raise UsageError(
            f"{workdir} is a {config.trainer!r} run; translation handles the trainers "
            f"{tuple(GENERATOR_FIELDS)}{hint}."
        )
    direction, role = resolve_direction(config, direction)
    step, step_dir = find_checkpoint(workdir, step)
    module = tc.make_generator(config)
    crop = int(config.data.crop_size)
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, crop, crop, 3), jnp.float32))
    fields = GENERATOR_FIELDS[config.trainer][role]
    restored = restore_fields(
        step_dir,
        {
            fields.params: abstract_on_one_device(shapes["params"]),
            fields.batch_stats: abstract_on_one_device(shapes.get("batch_stats", {})),
        },
    )
    variables = {"params": restored[fields.params], "batch_stats": restored[fields.batch_stats]}
    logging.info("Restored %s (%s) of %s at step %d.", "/".join(fields.params), direction, workdir, step)
    return RunGenerator(
        workdir, config, step, direction, role, module, variables, downsampling_factor(config), crop
    )


# ---- Sizes ---------------------------------------------------------------------------------------


def parse_size(text: str | int) -> str | tuple[int, int]:
    """--size: "crop", "native", "N" or "HxW" -> "crop" | "native" | (H, W)."""
    text = str(text).strip().lower()
    if text in ("crop", "native"):
        return text
    parts = text.split("x")
    if len(parts) in (1, 2) and all(p.isdigit() and int(p) > 0 for p in parts):
        h, w = int(parts[0]), int(parts[-1])
        return h, w
    raise UsageError(f"--size {text!r} is not 'crop', 'native', a size N or HxW (e.g. 256 or 256x512).")


def check_size(size: tuple[int, int], factor: int, arch: str) -> tuple[int, int]:
    """`size` if both sides are multiples of `factor`, else UsageError with the nearest valid sizes."""
    if all(s % factor == 0 for s in size):
        return size
    nearest = "x".join(str(_nearest_multiple(s, factor)) for s in size)
    raise UsageError(
        f"--size {size[0]}x{size[1]}: {arch} needs heights and widths that are multiples of {factor}; "
        f"the nearest is {nearest}."
    )


def _nearest_multiple(n: int, factor: int) -> int:
    return max(factor, int(round(n / factor)) * factor)


def network_size(spec, image_hw: tuple[int, int], crop: int, factor: int) -> tuple[int, int]:
    """(H, W) the network gets for an image of size image_hw under the parsed --size `spec`."""
    if spec == "crop":
        return crop, crop
    if spec == "native":
        return tuple(_nearest_multiple(s, factor) for s in image_hw)
    return spec


# ---- Reading and writing images ------------------------------------------------------------------


@dataclasses.dataclass
class Summary:
    """What `translate_folder` did: written output paths, and (input path, reason) of skipped files."""

    written: list[str] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def message(self, output_dir: str) -> str:
        text = f"Wrote {len(self.written)} images to {output_dir}."
        if self.skipped:
            names = ", ".join(f"{os.path.basename(p)} ({why})" for p, why in self.skipped[:10])
            more = f" and {len(self.skipped) - 10} more" if len(self.skipped) > 10 else ""
            text += f" Skipped {len(self.skipped)} files that are not readable images: {names}{more}."
        return text


_EXIF_ORIENTATION, _TRANSPOSING = 0x0112, (5, 6, 7, 8)  # orientations that swap width and height


def image_size(path: str) -> tuple[int, int]:
    """(H, W) of the image at `path` as displayed (EXIF orientation applied); reads the header only."""
    with Image.open(path) as image:
        w, h = image.size
        if image.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSING:
            w, h = h, w
    return h, w


def read_image(path: str, size: tuple[int, int]) -> np.ndarray:
    """float32 (H, W, 3) in [-1, 1]: RGB, EXIF-oriented, PIL-bicubic resized to `size` = (H, W)."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
    if image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.Resampling.BICUBIC)
    return np.asarray(image, np.float32) / 127.5 - 1.0


def list_inputs(input_dir: str, exclude: str | None = None) -> list[str]:
    """Relative paths of the non-hidden files under input_dir (recursively, sorted); `exclude`: a folder
    not to descend into (the output folder when it lies inside the input folder)."""
    found = []
    for root, dirs, files in os.walk(input_dir):
        dirs[:] = sorted(
            d for d in dirs if not d.startswith(".") and os.path.join(root, d) != (exclude or "")
        )
        found += [os.path.relpath(os.path.join(root, f), input_dir) for f in files if not f.startswith(".")]
    return sorted(found)


def output_names(relative_paths: Sequence[str]) -> dict[str, str]:
    """input relative path -> output relative path: the extension replaced by .png; inputs that would
    collide (a.jpg, a.png) keep their extension in the name (a_jpg.png, a_png.png)."""
    stems: dict[str, list[str]] = {}
    for rel in relative_paths:
        stems.setdefault(os.path.splitext(rel)[0], []).append(rel)
    names = {}
    for stem, rels in stems.items():
        for rel in rels:
            ext = os.path.splitext(rel)[1].lstrip(".").lower()
            names[rel] = f"{stem}_{ext}.png" if len(rels) > 1 and ext else f"{stem}.png"
    return names


# ---- Translating a folder ------------------------------------------------------------------------


def translate_folder(
    generator: RunGenerator,
    input_dir: str,
    output_dir: str,
    *,
    size: str | tuple[int, int] = "crop",
    batch_size: int = 8,
    log_every_seconds: float = 10.0,
) -> Summary:
    """Translates every image under input_dir into output_dir (see the module docstring)."""
    input_dir = os.path.abspath(os.path.expanduser(input_dir))
    output_dir = os.path.abspath(os.path.expanduser(output_dir))
    if not os.path.isdir(input_dir):
        raise FileNotFoundError(f"--input {input_dir} is not a folder.")
    if os.path.realpath(input_dir) == os.path.realpath(output_dir):
        raise UsageError(f"--output {output_dir} is the input folder; outputs would overwrite inputs.")
    if batch_size < 1:
        raise UsageError(f"--batch_size {batch_size} must be >= 1.")
    spec = size if isinstance(size, tuple) else parse_size(size)
    arch = generator.config.model.generator
    if isinstance(spec, tuple):
        check_size(spec, generator.factor, arch)

    relative = list_inputs(input_dir, exclude=output_dir)
    if not relative:
        raise FileNotFoundError(f"--input {input_dir} holds no files to translate.")
    names = output_names(relative)
    summary = Summary()
    groups: dict[tuple[int, int], list[str]] = {}
    for rel in relative:
        try:
            hw = image_size(os.path.join(input_dir, rel))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            summary.skipped.append((rel, skip_reason(e)))
            continue
        groups.setdefault(network_size(spec, hw, generator.crop_size, generator.factor), []).append(rel)
    readable = sum(len(g) for g in groups.values())
    logging.info(
        "Translating %d images (%s) with %s of %s at step %d; network sizes %s.",
        readable,
        generator.direction,
        arch,
        generator.workdir,
        generator.step,
        sorted(groups),
    )

    apply = jax.jit(generator.make_apply())
    done, last_log, start = 0, time.monotonic(), time.monotonic()
    for hw, rels in sorted(groups.items()):
        batch = min(batch_size, len(rels))  # one compiled shape per size, padded at the end
        for begin in range(0, len(rels), batch):
            images, kept = [], []
            for rel in rels[begin : begin + batch]:
                try:
                    images.append(read_image(os.path.join(input_dir, rel), hw))
                    kept.append(rel)
                except (OSError, ValueError, Image.DecompressionBombError) as e:
                    summary.skipped.append((rel, skip_reason(e)))
            if images:
                outputs = batching.batched(apply, (np.stack(images),), batch)
                for rel, output in zip(kept, outputs, strict=True):
                    path = os.path.join(output_dir, names[rel])
                    summary.written.append(visualize.save_png(visualize.to_uint8(output), path))
            done += len(rels[begin : begin + batch])
            if time.monotonic() - last_log >= log_every_seconds:
                rate = done / (time.monotonic() - start)
                logging.info("%d/%d images (%.1f images/s).", done, readable, rate)
                last_log = time.monotonic()
    logging.info(summary.message(output_dir))
    return summary


def skip_reason(error: Exception) -> str:
    """Why a file was skipped, for the final message."""
    if isinstance(error, Image.UnidentifiedImageError):
        return "not an image"
    return "unreadable: " + (str(error).split("\n")[0] or type(error).__name__)


# ---- Command line --------------------------------------------------------------------------------


def run_command(
    workdir: str,
    input_dir: str,
    output_dir: str,
    *,
    direction: str | None = None,
    size: str = "crop",
    batch_size: int = 8,
    step: int | None = None,
) -> Summary:
    """The command line's work: errors a user can fix exit with their message and no traceback."""
    try:
        generator = load_generator(workdir, direction, step)
        summary = translate_folder(generator, input_dir, output_dir, size=size, batch_size=batch_size)
    except (FileNotFoundError, UsageError, CheckpointShapeError) as e:
        raise SystemExit(f"ganjax.translate: {e}") from None
    print(summary.message(os.path.abspath(output_dir)))
    return summary


def _cli() -> None:
    # Flags are defined here, not at import: ganjax.main and ganjax.export define --workdir too.
    from absl import app, flags

    workdir = flags.DEFINE_string("workdir", None, "Workdir of a pix2pix / CycleGAN (or distill) run.")
    input_dir = flags.DEFINE_string("input", None, "Folder of input images (searched recursively).")
    output_dir = flags.DEFINE_string("output", None, "Folder for the translated PNGs (mirrors --input).")
    direction = flags.DEFINE_enum(
        "direction", None, DIRECTIONS, "Folder terms; default: the run's config.data.direction."
    )
    size = flags.DEFINE_string(
        "size", "crop", "crop (run's crop_size), native, N or HxW; see the module doc."
    )
    batch_size = flags.DEFINE_integer("batch_size", 8, "Images per generator call.")
    step = flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")
    flags.mark_flags_as_required(["workdir", "input", "output"])

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
        logging.set_verbosity(logging.INFO)
        run_command(
            workdir.value,
            input_dir.value,
            output_dir.value,
            direction=direction.value,
            size=size.value,
            batch_size=batch_size.value,
            step=step.value,
        )

    app.run(main)


if __name__ == "__main__":
    _cli()
