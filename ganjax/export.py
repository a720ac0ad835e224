"""Export a run's generator as one self-contained StableHLO file (`jax.export`), and load it back.

  python -m ganjax.export --workdir runs/h2z --output h2z.jax [--direction AtoB|BtoA] [--size N|HxW] \
      [--step N] [--platforms cpu,cuda,tpu]

Writes OUTPUT, the `jax.export` serialization of the network, and OUTPUT.json, a sidecar that describes
it (inputs and outputs with shapes, dtypes and value ranges; source workdir, step, trainer, direction,
model settings; platforms; jax version). The exported functions:

  translation runs (pix2pix, CycleGAN and their distilled students; `ganjax.translate.GENERATOR_FIELDS`):
      images float32 (b, H, W, 3) in [-1, 1] -> float32 (b, H, W, 3) in [-1, 1]
      with the run's test-time semantics (config.eval.train_mode, as `ganjax.translate`; one dropout mask
      for every image, so an output depends only on its input)
  aging runs (the EMA generator, which the trainer evaluates):
      (images float32 (b, H, W, 3) in [-1, 1], target_ages float32 (b,) in years, [0, num_ages - 1])
      -> aged images float32 (b, H, W, 3) in [-1, 1]; the current age is the model's own estimate.

The batch dimension b is symbolic: one file serves any batch size. H and W are fixed: --size, default
the run's training size (config.data.crop_size, or config.data.size for aging); they must be multiples
of 2 ** the network's number of halvings. The parameters are baked in as constants: the file alone is
the model (no parameter files, no ganjax or Flax code, no config), at the cost of a file the size of the
float32 parameters and of re-exporting to change weights. It is lowered for every platform in
--platforms (default cpu, cuda and tpu), so a CPU machine can export for accelerators.

Loading needs only jax and numpy; `load_exported` and `ExportedModel` (this file down to the export
section) can be copied out as they are:

  model = load_exported("h2z.jax")          # reads h2z.jax.json too, when present
  outputs = model(images)                   # checks shapes, dtypes and value ranges first
  # or with jax alone: jax.export.deserialize(open("h2z.jax", "rb").read()).call(images)
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

# ---- Loading (standalone: json, os, numpy, jax only) --------------------------------------------

_RANGE_TOLERANCE = 1e-3  # float noise at the ends of [-1, 1] is not an error


class ExportedModel:
    """A deserialized `jax.Exported` with input checks. Call it with arrays as the sidecar's "inputs"
    describe; returns the exported function's outputs (jax.Array).

    exported: the `jax.export.Exported`; metadata: the sidecar dict ({} when there was none, then only
    shapes and dtypes are checked); check_range: also check values against the sidecar's ranges.
    """

    def __init__(self, exported, metadata: dict | None = None, *, check_range: bool = True):
        self.exported = exported
        self.metadata = metadata or {}
        self.check_range = check_range
        specs = self.metadata.get("inputs") or [{} for _ in exported.in_avals]
        self.inputs = [
            {"name": spec.get("name", f"argument {i}"), "range": spec.get("range")}
            for i, spec in enumerate(specs)
        ]

    def __call__(self, *args):
        avals = self.exported.in_avals
        names = ", ".join(spec["name"] for spec in self.inputs)
        if len(args) != len(avals):
            raise ValueError(f"The exported model takes {len(avals)} inputs ({names}); got {len(args)}.")
        sizes: dict[str, tuple[int, str]] = {}  # symbolic dimension -> (size, the input that set it)
        checked = [
            self._check(x, aval, spec, sizes) for x, aval, spec in zip(args, avals, self.inputs, strict=True)
        ]
        return self.exported.call(*checked)

    def _check(self, x, aval, spec: dict, sizes: dict):
        name, expected = spec["name"], _shape_text(aval.shape)
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            x = np.asarray(x)
        dtype = np.dtype(x.dtype)
        if spec["range"] == [-1.0, 1.0] and dtype.kind in "uib":
            raise ValueError(
                f"{name} has dtype {dtype}; the model takes float32 in [-1, 1] (for uint8 pictures: "
                f"x.astype(np.float32) / 127.5 - 1)."
            )
        if dtype.kind not in "uif":
            raise ValueError(f"{name} has dtype {dtype}; the model takes float32 {expected}.")
        if len(x.shape) != len(aval.shape):
            hint = " (add a batch axis: x[None])" if len(x.shape) == len(aval.shape) - 1 else ""
            raise ValueError(f"{name} has shape {tuple(x.shape)}; the model takes {expected}{hint}.")
        for axis, (got, want) in enumerate(zip(x.shape, aval.shape, strict=True)):
            if isinstance(want, int):
                if got != want:
                    raise ValueError(
                        f"{name} has shape {tuple(x.shape)}; the model takes {expected} (axis {axis} must be "
                        f"{want}: resize the images, or export again with --size)."
                    )
                continue
            if got < 1:
                raise ValueError(f"{name} has shape {tuple(x.shape)}: an empty batch.")
            size, first = sizes.setdefault(str(want), (got, name))
            if got != size:
                raise ValueError(
                    f"{name} has {got} along {want!s} but {first} has {size}; they must be equal."
                )
        if dtype != np.float32:
            x = x.astype(np.float32)
        if self.check_range and spec["range"] is not None:
            low, high = spec["range"]
            lo, hi = float(x.min()), float(x.max())
            # Written so that NaN fails too.
            if not (lo >= low - _RANGE_TOLERANCE and hi <= high + _RANGE_TOLERANCE):
                hint = " (images: x / 127.5 - 1 for 0..255 pictures)" if [low, high] == [-1.0, 1.0] else ""
                raise ValueError(
                    f"{name} has values in [{lo:g}, {hi:g}]; the model takes values in [{low:g}, {high:g}]"
                    f"{hint}."
                )
        return x


def _shape_text(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def load_exported(path: str, *, check_range: bool = True) -> ExportedModel:
    """The model exported to `path` (and its sidecar `path`.json, when present) as a checked callable."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: export a run first (python -m ganjax.export).")
    with open(path, "rb") as f:
        blob = f.read()
    try:
        exported = jax.export.deserialize(bytearray(blob))
    except Exception as e:  # flatbuffers raise assorted errors on foreign bytes
        raise ValueError(f"{path} is not a jax.export file ({type(e).__name__}: {e}).") from e
    metadata = {}
    if os.path.isfile(path + ".json"):
        with open(path + ".json") as f:
            metadata = json.load(f)
    return ExportedModel(exported, metadata, check_range=check_range)


# ---- Exporting (needs ganjax; everything below is imported lazily) -------------------------------

DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
SIDECAR_FORMAT = "ganjax.export/1"


def _export_size(size, default: int, factor: int, arch: str) -> tuple[int, int]:
    from ganjax import translate

    spec = (default, default) if size in (None, "", "crop") else translate.parse_size(size)
    if not isinstance(spec, tuple):
        raise translate.UsageError(f"--size {size!r}: an export needs a fixed size, N or HxW.")
    return translate.check_size(spec, factor, arch)


def _translation(workdir: str, direction, size, step):
    """(function, argument specs, sidecar entries) for a pix2pix / CycleGAN (student) generator."""
    from ganjax import translate

    gen = translate.load_generator(workdir, direction, step)
    h, w = _export_size(size, gen.crop_size, gen.factor, gen.config.model.generator)
    (b,) = jax.export.symbolic_shape("b")
    fields = translate.GENERATOR_FIELDS[gen.config.trainer][gen.role]
    image = {"dtype": "float32", "range": [-1.0, 1.0]}
    meta = {
        "function": "translate",
        "inputs": [{"name": "images", "shape": ["b", h, w, 3], **image}],
        "outputs": [{"name": "images", "shape": ["b", h, w, 3], **image}],
        "arch": gen.config.model.generator,
        "source": {
            "workdir": gen.workdir,
            "step": gen.step,
            "trainer": gen.config.trainer,
            "direction": gen.direction,
            "generator": "/".join(fields.params),
        },
        "test_time": {
            "train_mode": gen.train_mode,
            "meaning": "batch norm on each image's own statistics, dropout on with one fixed mask"
            if gen.train_mode
            else "batch norm running statistics, no dropout",
        },
        "model": gen.config.model.to_dict(),
        "num_parameters": _count(gen.variables["params"]),
    }
    spec = jax.ShapeDtypeStruct((b, h, w, 3), np.float32)
    return gen.make_apply(), (spec,), meta


def _aging(workdir: str, direction, size, step):
    """(function, argument specs, sidecar entries) for the EMA generator of an aging run."""
    from ganjax import age, translate

    if direction is not None:
        raise translate.UsageError("--direction: an aging run has no directions; leave it out.")
    run = age.load_aging_generator(workdir, step)
    h, w = _export_size(size, run.size, run.factor, "the aging generator")
    apply, config, model = run.make_apply(), run.config, run.model

    def aged(images, target_ages):
        return apply(images, target_ages)["images"]

    (b,) = jax.export.symbolic_shape("b")
    image = {"dtype": "float32", "range": [-1.0, 1.0]}
    meta = {
        "function": "age",
        "inputs": [
            {"name": "images", "shape": ["b", h, w, 3], **image},
            {
                "name": "target_ages",
                "shape": ["b"],
                "dtype": "float32",
                "range": [0.0, float(model.num_ages - 1)],
                "unit": "years (fractional allowed)",
            },
        ],
        "outputs": [{"name": "images", "shape": ["b", h, w, 3], **image}],
        "arch": "AgingGenerator",
        "source": {
            "workdir": run.workdir,
            "step": run.step,
            "trainer": config.trainer,
            "generator": "/".join(age.AGING_FIELDS[config.trainer]),
        },
        "current_age": "the model's own estimate (the expected age of its estimator)",
        "model": {**config.model.to_dict(), "aging": config.aging.to_dict()},
        "num_parameters": _count(run.params),
    }
    specs = (jax.ShapeDtypeStruct((b, h, w, 3), np.float32), jax.ShapeDtypeStruct((b,), np.float32))
    return aged, specs, meta


def _count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def export_run(
    workdir: str,
    output: str,
    *,
    direction: str | None = None,
    size: str | int | None = None,
    step: int | None = None,
    platforms: tuple[str, ...] = DEFAULT_PLATFORMS,
) -> dict:
    """Writes `output` and `output`.json for the run in `workdir` (see the module docstring); returns the
    sidecar dict."""
    from ganjax import age, translate

    workdir, config = translate.load_config(workdir)
    if config.trainer in age.AGING_FIELDS:
        fn, specs, meta = _aging(workdir, direction, size, step)
    elif config.trainer in translate.GENERATOR_FIELDS:
        fn, specs, meta = _translation(workdir, direction, size, step)
    else:
        raise translate.UsageError(
            f"{workdir} is a {config.trainer!r} run; export handles the trainers "
            f"{tuple(translate.GENERATOR_FIELDS) + tuple(age.AGING_FIELDS)}."
        )
    platforms = tuple(platforms)
    exported = jax.export.export(jax.jit(fn), platforms=platforms)(*specs)
    meta = {
        "format": SIDECAR_FORMAT,
        "file": os.path.basename(output),
        **meta,
        "batch": "symbolic: any batch size b >= 1",
        "parameters": "baked into the file as constants",
        "platforms": list(exported.platforms),
        "jax_version": jax.__version__,
        "load": "ganjax.export.load_exported(path), or jax.export.deserialize(bytes).call(*inputs)",
    }
    output = os.path.abspath(os.path.expanduser(output))
    os.makedirs(os.path.dirname(output), exist_ok=True)
    _write_atomically(output, bytes(exported.serialize()))
    _write_atomically(output + ".json", (json.dumps(meta, indent=2) + "\n").encode())
    return meta


def _write_atomically(path: str, data: bytes) -> None:
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)  # never a half-written model next to a complete sidecar


# ---- Command line --------------------------------------------------------------------------------


def _cli() -> None:
    # Flags are defined here, not at import: importing the loader must not need absl, and ganjax.main
    # and ganjax.translate define --workdir too.
    from absl import app, flags, logging

    from ganjax.checkpoint import CheckpointShapeError
    from ganjax.translate import DIRECTIONS, UsageError

    workdir = flags.DEFINE_string("workdir", None, "Workdir of a pix2pix / CycleGAN / distill / aging run.")
    output = flags.DEFINE_string("output", None, "The exported file, e.g. model.jax (+ model.jax.json).")
    direction = flags.DEFINE_enum(
        "direction", None, DIRECTIONS, "Translation runs, folder terms; default: config.data.direction."
    )
    size = flags.DEFINE_string("size", None, "N or HxW; default: the run's training size.")
    step = flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")
    platforms = flags.DEFINE_list("platforms", list(DEFAULT_PLATFORMS), "Platforms to lower for.")
    flags.mark_flags_as_required(["workdir", "output"])

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
        logging.set_verbosity(logging.INFO)
        try:
            meta = export_run(
                workdir.value,
                output.value,
                direction=direction.value,
                size=size.value,
                step=step.value,
                platforms=tuple(platforms.value),
            )
        except (FileNotFoundError, UsageError, CheckpointShapeError) as e:
            raise SystemExit(f"ganjax.export: {e}") from None
        shapes = ", ".join(f"{i['name']} {tuple(i['shape'])}" for i in meta["inputs"])
        print(
            f"Exported {meta['arch']} of {meta['source']['workdir']} (step {meta['source']['step']}) to "
            f"{os.path.abspath(output.value)}: inputs {shapes}; platforms {', '.join(meta['platforms'])}."
        )

    app.run(main)


if __name__ == "__main__":
    _cli()
