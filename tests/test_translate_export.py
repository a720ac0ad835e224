"""ganjax.translate and ganjax.export on tiny smoke runs of pix2pix, CycleGAN and the aging trainer.

The three runs (2 steps each, checkpoints at steps 1 and 2) are shared by the module. Expected outputs
are computed from the full checkpoint read independently (orbax, whole state) and the network rebuilt
from the config: they check that the tools pick the right generator fields, sizes and semantics.
"""

import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from configs import aging_utkface, cyclegan_horse2zebra, pix2pix_cityscapes
from ganjax import export, main, translate, visualize
from ganjax.evaluation import translation_in_loop
from ganjax.trainers import aging, common
from ganjax.trainers import translation_common as tc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_HEADER = b"\x89PNG\r\n\x1a\n"


def _short_run(module, data_dir, workdir):
    """A :smoke config cut to 2 steps on one device, checkpoints at steps 1 and 2."""
    config = module.get_config("smoke")
    config.data.data_dir = data_dir
    config.mesh.axes = (("data", 1),)
    config.train.num_steps = 2
    if "decay_steps" in config.train:
        config.train.decay_steps = 1
    config.checkpoint.every_steps = 1
    config.log.every_steps = config.log.sample_every_steps = config.eval.every_steps = 2
    main.run(config, workdir)
    return workdir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    root = tmp_path_factory.mktemp("runs")
    return {
        "pix2pix": _short_run(pix2pix_cityscapes, data_dir, str(root / "pix2pix")),
        "cyclegan": _short_run(cyclegan_horse2zebra, data_dir, str(root / "cyclegan")),
        "aging": _short_run(aging_utkface, data_dir, str(root / "aging")),
    }


def saved_state(workdir, step=2):
    """The whole checkpointed state, read without any of the tools' code."""
    return ocp.PyTreeCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))


def direct_translation(workdir, name, images, step=2):
    """The generator's own output: network from config.json, variables from the full state (G_A / G_B /
    the pix2pix G), the run's test-time semantics with the dropout mask of index 0."""
    config = common.load_run_config(workdir)
    state = saved_state(workdir, step)
    params, stats = state["g_params"], state["g_batch_stats"]
    if name is not None:
        params, stats = params[name], stats[name]
    fn = translation_in_loop.make_translate_fn(
        tc.make_generator(config), train_mode=config.eval.train_mode, seed=config.seed
    )
    variables = {"params": params, "batch_stats": stats}
    return np.stack([np.asarray(fn(variables, x[None], jnp.zeros((1,), jnp.int32)))[0] for x in images])


def random_picture(rng, height, width):
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """An input folder: three pictures of three sizes (one JPEG in a subfolder), a truncated PNG, a text
    file named .png and a hidden file. Returns (folder, {relative path: uint8 picture as stored})."""
    folder = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    stored = {}
    (folder / "sub").mkdir()
    for rel, (h, w) in {"a.png": (32, 32), "b.png": (29, 21), "sub/c.jpg": (40, 48)}.items():
        Image.fromarray(random_picture(rng, h, w)).save(folder / rel)
        stored[rel] = np.asarray(Image.open(folder / rel).convert("RGB"))  # JPEG: as decoded
    whole = (folder / "a.png").read_bytes()
    (folder / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (folder / "notes.png").write_text("not a picture")
    (folder / ".DS_Store").write_bytes(b"\0")
    return str(folder), stored


def resized(picture, height, width):
    if picture.shape[:2] == (height, width):
        return picture
    return np.asarray(Image.fromarray(picture).resize((width, height), Image.Resampling.BICUBIC))


def to_model(picture):
    return picture.astype(np.float32) / 127.5 - 1.0


def read_png(path):
    return np.asarray(Image.open(path))


# ---- Translate -------------------------------------------------------------------------------


def test_pix2pix_folder_at_crop_size_equals_the_generator(runs, pictures, tmp_path):
    folder, stored = pictures
    gen = translate.load_generator(runs["pix2pix"])
    assert (gen.step, gen.direction, gen.role, gen.factor) == (2, "AtoB", translate.FORWARD, 4)
    assert gen.train_mode  # the smoke config: batch norm per image, dropout on

    summary = translate.translate_folder(gen, folder, str(tmp_path / "out"), batch_size=2)
    written = sorted(os.path.relpath(p, tmp_path / "out") for p in summary.written)
    assert written == ["a.png", "b.png", os.path.join("sub", "c.png")]
    assert sorted(p for p, _ in summary.skipped) == ["notes.png", "truncated.png"]
    assert dict(summary.skipped)["notes.png"] == "not an image"
    assert "Skipped 2 files" in summary.message("out")

    rels = sorted(stored)
    inputs = np.stack([to_model(resized(stored[r], 32, 32)) for r in rels])
    expected = visualize.to_uint8(direct_translation(runs["pix2pix"], None, inputs))
    for rel, want in zip(rels, expected, strict=True):
        got = read_png(tmp_path / "out" / (os.path.splitext(rel)[0] + ".png"))
        assert got.shape == (32, 32, 3) and got.dtype == np.uint8
        # Batched (2, padded) vs one image at a time: float noise may flip a rounding.
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1, rel


def test_cyclegan_backward_at_native_sizes_uses_g_b(runs, pictures, tmp_path):
    folder, stored = pictures
    gen = translate.load_generator(runs["cyclegan"], direction="BtoA", step=1)
    assert (gen.step, gen.role) == (1, translate.BACKWARD)
    summary = translate.translate_folder(gen, folder, str(tmp_path / "out"), size="native", batch_size=8)
    assert len(summary.written) == 3 and len(summary.skipped) == 2

    # Native: each side to the nearest multiple of 4 (29 x 21 -> 28 x 20); one batch per size.
    sizes = {"a.png": (32, 32), "b.png": (28, 20), "sub/c.jpg": (40, 48)}
    for rel, (h, w) in sizes.items():
        got = read_png(tmp_path / "out" / (os.path.splitext(rel)[0] + ".png"))
        assert got.shape == (h, w, 3), rel
        want = direct_translation(runs["cyclegan"], "G_B", to_model(resized(stored[rel], h, w))[None], step=1)
        assert np.abs(got.astype(int) - visualize.to_uint8(want[0]).astype(int)).max() <= 1

    forward = translate.load_generator(runs["cyclegan"])
    assert forward.role == translate.FORWARD
    leaf = jax.tree.leaves(forward.variables["params"])[0]
    assert np.array_equal(leaf, jax.tree.leaves(saved_state(runs["cyclegan"])["g_params"]["G_A"])[0])


def test_output_names_keep_colliding_extensions():
    names = translate.output_names(["x/a.jpg", "x/a.png", "b.jpeg", "c"])
    assert names == {"x/a.jpg": "x/a_jpg.png", "x/a.png": "x/a_png.png", "b.jpeg": "b.png", "c": "c.png"}


def test_translate_command_line(runs, pictures, tmp_path):
    folder, _ = pictures
    out = tmp_path / "cli"
    args = ["--workdir", runs["cyclegan"], "--input", folder, "--output", str(out), "--size", "24x16"]
    done = _python(["-m", "ganjax.translate", *args, "--direction", "BtoA", "--batch_size", "2"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Wrote 3 images" in done.stdout and "Skipped 2 files" in done.stdout
    assert read_png(out / "sub" / "c.png").shape == (24, 16, 3)

    # What the command does with an error a user can fix: its message, no traceback.
    with pytest.raises(SystemExit, match=r"^ganjax.translate: --workdir .*nope does not exist.$"):
        translate.run_command(str(tmp_path / "nope"), folder, str(out))


def test_translate_bad_inputs_say_what_is_wrong(runs, pictures, tmp_path):
    folder, _ = pictures
    with pytest.raises(FileNotFoundError, match="does not exist"):
        translate.load_generator(str(tmp_path / "missing"))
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        translate.load_generator(str(tmp_path / "empty_run"))
    fresh = tmp_path / "untrained"
    fresh.mkdir()
    shutil.copy(os.path.join(runs["pix2pix"], common.CONFIG_FILE), fresh)
    with pytest.raises(FileNotFoundError, match="has no checkpoint"):
        translate.load_generator(str(fresh))
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at that step; it has \[1, 2\]"):
        translate.load_generator(runs["pix2pix"], step=7)
    with pytest.raises(translate.UsageError, match="has one generator, trained AtoB"):
        translate.load_generator(runs["pix2pix"], direction="BtoA")
    with pytest.raises(translate.UsageError, match="'aging' run.*ganjax.export"):
        translate.load_generator(runs["aging"])

    gen = translate.load_generator(runs["pix2pix"])
    (tmp_path / "no_files").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no files"):
        translate.translate_folder(gen, str(tmp_path / "no_files"), str(tmp_path / "o"))
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        translate.translate_folder(gen, str(tmp_path / "nope"), str(tmp_path / "o"))
    with pytest.raises(translate.UsageError, match="would overwrite inputs"):
        translate.translate_folder(gen, folder, folder)
    with pytest.raises(translate.UsageError, match="multiples of 4; the nearest is 32x32"):
        translate.translate_folder(gen, folder, str(tmp_path / "o"), size="33")
    with pytest.raises(translate.UsageError, match="is not 'crop', 'native'"):
        translate.translate_folder(gen, folder, str(tmp_path / "o"), size="big")


# ---- Export ----------------------------------------------------------------------------------


def test_pix2pix_export_round_trip_for_batches_of_1_and_3(runs, tmp_path):
    path = str(tmp_path / "p2p.jax")
    meta = export.export_run(runs["pix2pix"], path)
    assert meta["inputs"][0]["shape"] == ["b", 32, 32, 3]
    assert meta["source"]["step"] == 2 and meta["source"]["generator"] == "g_params"
    assert meta["test_time"]["train_mode"] is True
    assert set(meta["platforms"]) == {"cpu", "cuda", "tpu"}

    model = export.load_exported(path)
    assert model.metadata == meta
    apply = jax.jit(translate.load_generator(runs["pix2pix"]).make_apply())
    images = np.random.default_rng(1).uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32)
    for batch in (1, 3):
        np.testing.assert_allclose(model(images[:batch]), apply(images[:batch]), atol=1e-5)
    # Per-image semantics: an image's output does not depend on its batch.
    np.testing.assert_allclose(model(images)[:1], model(images[:1]), atol=1e-5)


def test_cyclegan_export_of_one_direction_at_another_size(runs, tmp_path):
    path = str(tmp_path / "g_b.jax")
    meta = export.export_run(runs["cyclegan"], path, direction="BtoA", size="24x36", platforms=("cpu",))
    assert meta["source"]["generator"] == "g_params/G_B" and meta["inputs"][0]["shape"] == ["b", 24, 36, 3]
    model = export.load_exported(path)
    images = np.random.default_rng(2).uniform(-1, 1, (3, 24, 36, 3)).astype(np.float32)
    want = direct_translation(runs["cyclegan"], "G_B", images)
    for batch in (1, 3):
        np.testing.assert_allclose(model(images[:batch]), want[:batch], atol=1e-5)


def aging_reference(workdir, images, ages):
    """The EMA generator's aged images, from the full state and the config."""
    model, _ = aging.build_models(common.load_run_config(workdir))
    params = saved_state(workdir)["ema_params"]
    return np.asarray(model.apply({"params": params}, images, ages)["images"])


def test_aging_export_from_the_command_line_loads_without_ganjax(runs, tmp_path):
    path = tmp_path / "aging.jax"
    done = _python(["-m", "ganjax.export", "--workdir", runs["aging"], "--output", str(path)])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Exported AgingGenerator" in done.stdout

    rng = np.random.default_rng(3)
    images = rng.uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32)
    ages = np.array([5.0, 42.5, 90.0], np.float32)
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "ages.npy", ages)
    # The loader copied out on its own, in a fresh interpreter that has only jax and numpy.
    shutil.copy(os.path.join(REPO, "ganjax", "export.py"), tmp_path / "standalone_loader.py")
    script = textwrap.dedent(
        f"""
        import sys, jax, numpy as np
        sys.path.insert(0, {str(tmp_path)!r})
        from standalone_loader import load_exported
        model = load_exported({str(path)!r})
        images, ages = np.load({str(tmp_path / "images.npy")!r}), np.load({str(tmp_path / "ages.npy")!r})
        outs = [np.asarray(model(images[:1], ages[:1]))[0], *np.asarray(model(images, ages))]
        raw = jax.export.deserialize(open({str(path)!r}, "rb").read()).call(images, ages)
        np.save({str(tmp_path / "out.npy")!r}, np.stack(outs + list(np.asarray(raw))))
        assert not [m for m in sys.modules if m.split(".")[0] in ("ganjax", "flax")], "imported ganjax/flax"
        """
    )
    fresh = subprocess.run(
        [sys.executable, "-c", script], cwd=str(tmp_path), capture_output=True, text=True, timeout=120
    )
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    outs = np.load(tmp_path / "out.npy")
    want = aging_reference(runs["aging"], images, ages)
    # The exported program's float reductions run in another order than the jitted reference's, and
    # aging.basis_scale (10) multiplies the rounding of the age step: equal to 1e-4 (measured up to 6e-5).
    np.testing.assert_allclose(outs[0], want[0], atol=1e-4)  # batch of 1
    np.testing.assert_allclose(outs[1:4], want, atol=1e-4)  # batch of 3
    np.testing.assert_allclose(outs[4:], want, atol=1e-4)  # jax.export alone


def test_loader_and_export_refuse_bad_inputs(runs, tmp_path):
    path = str(tmp_path / "aging.jax")
    export.export_run(runs["aging"], path, platforms=("cpu",))
    model = export.load_exported(path)
    images = np.zeros((2, 32, 32, 3), np.float32)
    ages = np.array([20.0, 30.0], np.float32)
    assert model(images, ages.astype(np.int32)).shape == (2, 32, 32, 3)  # integer ages are fine

    cases = [
        ((images,), "takes 2 inputs \\(images, target_ages\\); got 1"),
        ((images[0], ages[:1]), r"add a batch axis"),
        ((np.zeros((2, 64, 64, 3), np.float32), ages), r"axis 1 must be 32.*--size"),
        ((images.astype(np.uint8), ages), r"dtype uint8.*/ 127.5 - 1"),
        ((images + 200.0, ages), r"values in \[200, 200\].*x / 127.5 - 1"),
        ((images * np.nan, ages), r"values in \[nan, nan\]"),
        ((images, ages[:1]), "target_ages has 1 along b but images has 2"),
        ((images, ages + 100.0), r"target_ages has values in \[120, 130\]; .* in \[0, 100\]"),
        ((images[:0], ages[:0]), "an empty batch"),
        ((images, np.array(["a", "b"])), "dtype <U1"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            model(*args)

    with pytest.raises(FileNotFoundError, match="export a run first"):
        export.load_exported(str(tmp_path / "none.jax"))
    (tmp_path / "junk.jax").write_bytes(PNG_HEADER + b"junk" * 10)
    with pytest.raises(ValueError, match="is not a jax.export file"):
        export.load_exported(str(tmp_path / "junk.jax"))
    with pytest.raises(translate.UsageError, match="multiples of 4; the nearest is 32x32"):
        export.export_run(runs["aging"], path, size="30")
    with pytest.raises(translate.UsageError, match="needs a fixed size"):
        export.export_run(runs["aging"], path, size="native")
    with pytest.raises(translate.UsageError, match="aging run has no directions"):
        export.export_run(runs["aging"], path, direction="AtoB")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export.export_run(str(tmp_path / "missing"), path)


def _python(args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=180
    )
