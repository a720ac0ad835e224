"""Cross-framework checks: PyTorch reference checkpoints -> ganjax (and back), with numerical parity.

The PyTorch side is `ganjax.interop.torch_reference` (the reference networks with its state_dict key
names) and, for the training step, `ganjax.interop.parity.torch_pix2pix_step` (the reference's
`Pix2PixModel.optimize_parameters` written out). Files go through `torch.save` / `torch.load`, as users'
checkpoints do.
"""

import hashlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ganjax.interop import convert, parity  # noqa: E402
from ganjax.interop import torch as torch_io  # noqa: E402
from ganjax.interop import torch_reference as tr  # noqa: E402
from ganjax.interop.parity import images, nchw  # noqa: E402
from ganjax.losses import adversarial, relation  # noqa: E402
from ganjax.losses.aging import l1  # noqa: E402
from ganjax.trainers.common import restore_subtrees  # noqa: E402

SIZES = {"resnet_9blocks": 64, "resnet_6blocks": 64, "unet_256": 256, "unet_128": 128}


def save(state_dict, path, wrapping="plain"):
    """Writes a state_dict as users' files come: plain, DataParallel-prefixed or nested in a dict."""
    if wrapping in ("data_parallel", "nested_data_parallel"):
        state_dict = {f"module.{k}": v for k, v in state_dict.items()}
    if wrapping.startswith("nested"):
        state_dict = {"epoch": 200, "netG": state_dict, "optimizer": {"lr": 2e-4}}
    torch.save(state_dict, path)
    return str(path)


def torch_forward(net, x):
    with torch.no_grad():
        return net(x).numpy()


def abstract(variables):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), variables)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


# ---- Reading reference files: outputs ---------------------------------------------------------------


@pytest.mark.parametrize(
    "arch,ngf,norm,dropout,size,wrapping",
    [
        ("resnet_9blocks", 64, None, False, 256, "plain"),  # CycleGAN's generator at full size
        ("unet_256", 64, None, True, 256, "data_parallel"),  # pix2pix's generator at full size
        ("resnet_6blocks", 8, "batch", True, 64, "nested"),  # dropout shifts conv_block keys
        ("unet_128", 8, "instance", False, 128, "nested_data_parallel"),
    ],
)
def test_load_generator_matches_torch(tmp_path, arch, ngf, norm, dropout, size, wrapping):
    net = parity.reference_generator(arch, ngf, norm, dropout=dropout).eval()
    path = save(net.state_dict(), tmp_path / "latest_net_G.pth", wrapping)
    module, variables = torch_io.load_generator(path, arch, ngf, norm)
    assert module.norm == torch_io.resolve_generator_norm(arch, norm)
    assert ("batch_stats" in variables) == (module.norm == "batch")
    if arch.startswith("resnet"):
        assert module.use_dropout == dropout  # detected from the keys
    xt, xj = images(1, 3, size)
    y = jax.jit(module.apply)(variables, xj)
    np.testing.assert_allclose(nchw(y), torch_forward(net, xt), atol=1e-4, rtol=0)


@pytest.mark.parametrize("norm,input_nc", [("batch", 6), ("instance", 3)])  # pix2pix's D, CycleGAN's D
def test_load_discriminator_matches_torch_and_reads_norm_and_channels(tmp_path, norm, input_nc):
    net = parity.reference_discriminator(16, 3, norm, input_nc=input_nc).eval()
    path = save(net.state_dict(), tmp_path / "latest_net_D.pth", "data_parallel")
    module, variables = torch_io.load_discriminator(path, ndf=16)
    assert module.norm == norm
    xt, xj = images(2, input_nc, 64)
    np.testing.assert_allclose(nchw(jax.jit(module.apply)(variables, xj)), torch_forward(net, xt), atol=1e-4)


def test_old_instance_norm_statistics_are_ignored(tmp_path):
    """PyTorch < 0.4 saved InstanceNorm2d running statistics; the reference's loader drops them too."""
    net = parity.reference_generator("resnet_6blocks", 4)
    state_dict = dict(net.state_dict())
    state_dict["model.2.running_mean"] = torch.zeros(4)
    state_dict["model.10.conv_block.2.running_var"] = torch.ones(16)
    _, variables = torch_io.load_generator(save(state_dict, tmp_path / "g.pth"), "resnet_6blocks", 4)
    assert "batch_stats" not in variables


def test_nested_files_pick_the_role_or_the_named_key(tmp_path):
    g_a, g_b = (parity.reference_generator("resnet_6blocks", 4, seed=s) for s in (0, 1))
    d = parity.reference_discriminator(4, 2, "instance", input_nc=3)
    path = str(tmp_path / "all.pth")
    torch.save({"netG": g_a.state_dict(), "netD": d.state_dict()}, path)
    _, variables = torch_io.load_generator(path, "resnet_6blocks", 4)
    np.testing.assert_array_equal(
        variables["params"]["head_conv"]["bias"], g_a.state_dict()["model.23.bias"].numpy()
    )
    assert torch_io.load_discriminator(path, 4, 2)[0].num_layers == 2

    torch.save({"G_A": g_a.state_dict(), "G_B": g_b.state_dict()}, path)
    with pytest.raises(torch_io.StateDictError, match=r"2 nested entries \['G_A', 'G_B'\].*key="):
        torch_io.load_generator(path, "resnet_6blocks", 4)
    _, variables = torch_io.load_generator(path, "resnet_6blocks", 4, key="G_B")
    np.testing.assert_array_equal(
        variables["params"]["stem_conv"]["kernel"],
        g_b.state_dict()["model.1.weight"].numpy().transpose(2, 3, 1, 0),
    )


# ---- Errors ------------------------------------------------------------------------------------------


class PickledConfig:
    """A custom class: torch.load(weights_only=True) must refuse files that pickle it."""

    def __init__(self):
        self.ngf = 64


@pytest.fixture(scope="module")
def resnet6_file(tmp_path_factory):
    net = parity.reference_generator("resnet_6blocks", 8)
    return save(net.state_dict(), tmp_path_factory.mktemp("errors") / "net_G.pth"), net.state_dict()


def test_wrong_width_names_the_first_key_and_both_shapes(resnet6_file):
    path, _ = resnet6_file
    with pytest.raises(torch_io.StateDictError) as info:
        torch_io.load_generator(path, "resnet_6blocks", 16)
    message = str(info.value)
    assert "first: key 'model.1.weight' has shape (8, 3, 7, 7) in the file, expected (16, 3, 7, 7)" in message
    assert "looks like --arch resnet_6blocks --ngf 8 --norm instance" in message


def test_wrong_arch_names_the_first_missing_key(resnet6_file):
    path, _ = resnet6_file
    with pytest.raises(
        torch_io.StateDictError, match=r"first: key 'model.16.conv_block.1.weight' is missing"
    ):
        torch_io.load_generator(path, "resnet_9blocks", 8)
    with pytest.raises(torch_io.StateDictError, match=r"first: key 'model.model.0.weight' is missing"):
        torch_io.load_generator(path, "unet_256", 8)


def test_missing_and_unexpected_keys_are_named(resnet6_file, tmp_path):
    _, state_dict = resnet6_file
    missing = {k: v for k, v in state_dict.items() if k != "model.13.conv_block.5.weight"}
    with pytest.raises(
        torch_io.StateDictError, match=r"1 missing; first: key 'model.13.conv_block.5.weight' is"
    ):
        torch_io.load_generator(save(missing, tmp_path / "missing.pth"), "resnet_6blocks", 8)
    extra = {**state_dict, "model.30.weight": torch.zeros(3, 8, 7, 7)}
    with pytest.raises(
        torch_io.StateDictError, match=r"unexpected key 'model.30.weight' \(shape \(3, 8, 7, 7\)\)"
    ):
        torch_io.load_generator(save(extra, tmp_path / "extra.pth"), "resnet_6blocks", 8)


def test_pickled_objects_are_refused(tmp_path):
    path = str(tmp_path / "pickled.pth")
    torch.save({"config": PickledConfig(), "netG": {"model.1.weight": torch.zeros(1)}}, path)
    with pytest.raises(torch_io.StateDictError, match=r"PickledConfig.*weights_only=True.*state_dict\(\)"):
        torch_io.load_generator(path, "resnet_6blocks", 8)
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(torch_io.StateDictError, match="could not be read as a PyTorch file"):
        torch_io.load_generator(str(tmp_path / "text.pth"), "resnet_6blocks", 8)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        torch_io.load_generator(str(tmp_path / "nowhere.pth"), "resnet_6blocks", 8)


def test_without_torch_the_error_says_how_to_install_it(monkeypatch, tmp_path):
    # Importing the module needs no torch (checked in a fresh interpreter with torch blocked).
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import ganjax.interop.torch as t\n"
        "try:\n    t.read_state_dict('x.pth')\nexcept ImportError as e:\n    print(e)\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert "pip install torch" in out.stdout and "[test]" in out.stdout
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match="pip install torch"):
        torch_io.read_state_dict(str(tmp_path / "net_G.pth"))


# ---- Conversion to teacher checkpoints (CLI) -------------------------------------------------------------


def test_cli_converts_a_pix2pix_generator_and_discriminator_into_one_teacher(tmp_path):
    g = parity.reference_generator("unet_128", 8)
    d = parity.reference_discriminator(8, 3, "batch", input_nc=6)
    g_path = save(g.state_dict(), tmp_path / "latest_net_G.pth", "nested_data_parallel")
    d_path = save(d.state_dict(), tmp_path / "latest_net_D.pth")
    out = str(tmp_path / "teacher")
    convert.main(["--arch", "unet_128", "--ngf", "8", "--input", g_path, "--output", out])
    convert.main(["--arch", "unet_128", "--ngf", "8", "--input", g_path, "--output", out])  # overwrites
    convert.main(["--arch", "patchgan", "--ndf", "8", "--input", d_path, "--output", out])  # merges
    assert os.listdir(os.path.join(out, "checkpoints")) == ["0"]

    _, g_vars = torch_io.load_generator(g_path, "unet_128", 8)
    _, d_vars = torch_io.load_discriminator(d_path, 8)
    targets = {
        "g_params": abstract(g_vars["params"]),
        "g_batch_stats": abstract(g_vars["batch_stats"]),
        "d_params": abstract(d_vars["params"]),
        "d_batch_stats": abstract(d_vars["batch_stats"]),
    }
    restored = restore_subtrees(out, targets, "teacher.checkpoint")  # what the distillation trainer does
    assert_trees_equal(restored["g_params"], g_vars["params"])
    assert_trees_equal(restored["g_batch_stats"], g_vars["batch_stats"])
    assert_trees_equal(restored["d_params"], d_vars["params"])
    assert_trees_equal(restored["d_batch_stats"], d_vars["batch_stats"])

    with open(os.path.join(out, "conversion.json")) as f:
        record = json.load(f)
    assert set(record["networks"]) == {"G", "D"}
    g_record = record["networks"]["G"]
    assert g_record["fields"] == ["g_params", "g_batch_stats"]
    assert (g_record["arch"], g_record["ngf"], g_record["norm"]) == ("unet_128", 8, "batch")
    with open(g_path, "rb") as f:
        assert g_record["sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert record["networks"]["D"]["input_nc"] == 6
    assert record["config"]["teacher.ngf"] == 8 and record["config"]["disc.norm"] == "batch"


def test_cli_converts_a_cyclegan_pair_and_exports_one_back(tmp_path):
    nets = {name: parity.reference_generator("resnet_6blocks", 4, seed=i) for i, name in enumerate("AB")}
    paths = {
        name: save(net.state_dict(), tmp_path / f"latest_net_G_{name}.pth") for name, net in nets.items()
    }
    out = str(tmp_path / "teacher")
    convert.main(
        [
            "--arch",
            "resnet_6blocks",
            "--ngf",
            "4",
            "--input",
            paths["A"],
            "--input_b",
            paths["B"],
            "--output",
            out,
        ]
    )
    one = jax.eval_shape(
        torch_io.generator_table("resnet_6blocks", 4)[0].init, jax.random.key(0), jnp.zeros((1, 64, 64, 3))
    )
    targets = {
        "g_params": {"G_A": one["params"], "G_B": one["params"]},
        "g_batch_stats": {"G_A": {}, "G_B": {}},
    }
    restored = restore_subtrees(out, targets, "teacher.checkpoint")
    for name in "AB":
        _, variables = torch_io.load_generator(paths[name], "resnet_6blocks", 4)
        assert_trees_equal(restored["g_params"][f"G_{name}"], variables["params"])

    exported = str(tmp_path / "export" / "net_G_B.pth")
    base = ["--to", "torch", "--arch", "resnet_6blocks", "--ngf", "4", "--input", out, "--output", exported]
    with pytest.raises(
        convert.ConversionError, match=r"holds networks \['G_A', 'G_B'\]: choose one with --network"
    ):
        convert.main(base)
    convert.main([*base, "--network", "G_B"])
    reloaded = tr.build_generator("resnet_6blocks", 4, "instance")
    reloaded.load_state_dict(torch.load(exported, weights_only=True), strict=True)
    for key, value in nets["B"].state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value, rtol=0, atol=0)


def test_cli_refuses_a_training_workdir_and_bad_flags(tmp_path, resnet6_file):
    path, _ = resnet6_file
    os.makedirs(tmp_path / "run" / "checkpoints" / "4" / "state")
    with pytest.raises(convert.ConversionError, match="not a directory written by this converter"):
        convert.main(
            ["--arch", "resnet_6blocks", "--ngf", "8", "--input", path, "--output", str(tmp_path / "run")]
        )
    with pytest.raises(torch_io.StateDictError, match="expected \\(16, 3, 7, 7\\)"):
        convert.main(
            ["--arch", "resnet_6blocks", "--ngf", "16", "--input", path, "--output", str(tmp_path / "x")]
        )
    with pytest.raises(SystemExit):
        convert.main(["--arch", "patchgan", "--ngf", "8", "--input", path, "--output", str(tmp_path / "x")])


# ---- Export: ganjax -> PyTorch ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch,norm,dropout", [("unet_128", "batch", True), ("resnet_6blocks", "batch", True)]
)
def test_exported_generator_loads_strictly_into_the_reference(tmp_path, arch, norm, dropout):
    module, _ = torch_io.generator_table(arch, 8, norm, dropout=dropout)
    xt, xj = images(1, 3, SIZES[arch], seed=3)
    variables = parity.random_variables(module, xj)
    path = str(tmp_path / "net_G.pth")
    torch_io.export_generator(variables, arch, 8, norm, path, dropout=dropout)
    net = tr.build_generator(arch, 8, norm, dropout)
    net.load_state_dict(torch.load(path, weights_only=True), strict=True)
    y = nchw(jax.jit(module.apply)(variables, xj))
    np.testing.assert_allclose(torch_forward(net.eval(), xt), y, atol=1e-4)
    # ... and back: the same variables.
    assert_trees_equal(torch_io.load_generator(path, arch, 8, norm)[1], jax.tree.map(np.asarray, variables))


def test_exported_discriminator_loads_strictly_into_the_reference(tmp_path):
    module, _ = torch_io.discriminator_table(8, 3, "batch", input_nc=6)
    xt, xj = images(2, 6, 64, seed=4)
    variables = parity.random_variables(module, xj, seed=1)
    path = str(tmp_path / "net_D.pth")
    torch_io.export_discriminator(variables, 8, 3, "batch", path)
    net = tr.NLayerDiscriminator(6, 8, 3, "batch")
    net.load_state_dict(torch.load(path, weights_only=True), strict=True)
    np.testing.assert_allclose(torch_forward(net.eval(), xt), nchw(module.apply(variables, xj)), atol=1e-4)
    wrong = {**variables, "params": {**variables["params"], "extra": {"kernel": jnp.zeros(2)}}}
    with pytest.raises(torch_io.StateDictError, match="params/extra/kernel"):
        torch_io.export_discriminator(wrong, 8, 3, "batch", path)


# ---- Losses and one training step --------------------------------------------------------------------


def test_pix2pix_losses_match_torch():
    """GANLoss("vanilla") (BCE with logits; D's halved, as backward_D) and the L1 term. Both are means
    over all elements, so the layout (NCHW here) does not matter."""
    rng = np.random.default_rng(0)
    real, fake = (rng.normal(0, 2, (2, 1, 30, 30)).astype(np.float32) for _ in range(2))
    a, b = (rng.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32) for _ in range(2))
    bce = torch.nn.BCEWithLogitsLoss()
    rt, ft = torch.from_numpy(real), torch.from_numpy(fake)
    expected = {
        "d": 0.5 * (bce(ft, torch.zeros_like(ft)) + bce(rt, torch.ones_like(rt))).item(),
        "g": bce(ft, torch.ones_like(ft)).item(),
        "l1": torch.nn.L1Loss()(torch.from_numpy(a), torch.from_numpy(b)).item(),
    }
    got = {
        "d": adversarial.discriminator_loss("vanilla", real, fake),
        "g": adversarial.generator_loss("vanilla", fake),
        "l1": l1(a, b),
    }
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-6, err_msg=name)


def test_one_pix2pix_training_step_matches_torch():
    """U-Net 128 (batch norm, as pix2pix) + conditional PatchGAN, Adam(2e-4, (0.5, 0.999)), one step."""
    r = parity.pix2pix_step("unet_128", 8, 128, ndf=8, float64_reference=True)
    for name, diff in r["losses"].items():
        assert diff <= 1e-5 * max(1.0, abs(r["losses_torch"][name])), (name, diff)
    for net in ("g", "d"):
        u = r[f"{net}_update"]
        assert u["largest_update"] == pytest.approx(parity.LEARNING_RATE, rel=1e-3)
        # Every update whose gradient is not numerically zero agrees to 0.5% of the learning rate ...
        assert u["max_where_grad_not_tiny"] < parity.UPDATE_TOLERANCE, (net, u)
        assert u["differ_where_grad_not_tiny"] == 0, (net, u)
        # ... the few others (Adam's lr * g / (|g| + eps) amplifies the rounding of g ~ 0) are rare, and
        # ganjax's float32 step is about as close to PyTorch's float64 step as PyTorch's float32 step is.
        assert u["differ"] <= 1e-4 * u["params"], (net, u)
        exact = u["vs_float64"]
        assert exact["jax"]["differ"] <= 2 * exact["torch"]["differ"] + 10, (net, exact)
        assert r[f"{net}_stats"]["max"] < 1e-5, (net, r[f"{net}_stats"])


def torch_relation_loss(ft, fs, normalize):
    """The SRPKD formula written out: A = Q Q^T, rows normalised (or Q's rows for "cosine"),
    mean over the batch of (1/N^2) ||A_T - A_S||_F^2. Features (B, H, W, C)."""
    f = torch.nn.functional
    b, h, w = ft.shape[:3]
    n = h * w
    qt, qs = ft.reshape(b, n, -1), fs.reshape(b, n, -1)
    if normalize == "cosine":
        qt, qs = f.normalize(qt, dim=-1), f.normalize(qs, dim=-1)
    at, a_s = qt @ qt.transpose(1, 2), qs @ qs.transpose(1, 2)
    if normalize == "row":
        at, a_s = f.normalize(at, dim=-1), f.normalize(a_s, dim=-1)
    return ((at - a_s) ** 2).sum(dim=(1, 2)).div(n * n).mean()


@pytest.mark.parametrize("method", relation.RELATION_METHODS)
@pytest.mark.parametrize("normalize", relation.RELATION_NORMS)
def test_relation_loss_matches_torch(normalize, method):
    rng = np.random.default_rng(0)
    ft = rng.normal(0.3, 1, (2, 6, 5, 12)).astype(np.float32)
    fs = rng.normal(0.3, 1, (2, 6, 5, 7)).astype(np.float32)
    tt, ts = (torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (ft, fs))
    expected = torch_relation_loss(tt, ts, normalize)
    expected.backward()
    loss_fn = jax.value_and_grad(
        lambda a, b: relation.relation_loss(a, b, normalize=normalize, method=method), (0, 1)
    )
    value, (gt, gs) = loss_fn(jnp.asarray(ft), jnp.asarray(fs))
    np.testing.assert_allclose(value, expected.item(), rtol=1e-4)
    for got, want in ((gt, tt.grad.numpy()), (gs, ts.grad.numpy())):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
