"""The DRN-D segmenter (GAN Compression's Cityscapes mIoU model) against a PyTorch transcription of fyu/drn.

`TorchDRN` / `TorchDRNSeg` below follow fyu/drn drn.py (`BasicBlock`, `Bottleneck`, `DRN` with arch "D")
and segment.py (`DRNSeg`, `fill_up_weights`), which gan-compression copies into metric/drn.py and
metric/mIoU_score.py; only the model-zoo loading and arch "C" are left out. Tiny widths and depths keep
the test fast; the structure (dilations, shortcuts, `up`) is the real one, and the DRN-D-105 key table is
checked against a full-size build.
"""

import functools
import math
import re

import jax
import numpy as np
import pytest

from ganjax.evaluation import segmentation
from ganjax.interop import drn_weights
from ganjax.models import drn

torch = pytest.importorskip("torch")
tnn = torch.nn

# ---- fyu/drn, transcribed ------------------------------------------------------------------------------


def conv3x3(in_planes, out_planes, stride=1, padding=1, dilation=1):
    return tnn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=padding, bias=False, dilation=dilation)


class BasicBlock(tnn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, dilation=(1, 1), residual=True):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride, padding=dilation[0], dilation=dilation[0])
        self.bn1 = tnn.BatchNorm2d(planes)
        self.relu = tnn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, padding=dilation[1], dilation=dilation[1])
        self.bn2 = tnn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride
        self.residual = residual

    def forward(self, x):
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        if self.residual:
            out += residual
        return self.relu(out)


class Bottleneck(tnn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, dilation=(1, 1), residual=True):
        super().__init__()
        self.conv1 = tnn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = tnn.BatchNorm2d(planes)
        self.conv2 = tnn.Conv2d(
            planes, planes, 3, stride=stride, padding=dilation[1], bias=False, dilation=dilation[1]
        )
        self.bn2 = tnn.BatchNorm2d(planes)
        self.conv3 = tnn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = tnn.BatchNorm2d(planes * 4)
        self.relu = tnn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        out += residual
        return self.relu(out)


class TorchDRN(tnn.Module):
    """fyu/drn `DRN(block, layers, num_classes, channels, arch="D")`."""

    def __init__(self, block, layers, num_classes=1000, channels=drn.CHANNELS, pool_size=28):
        super().__init__()
        self.inplanes = channels[0]
        self.out_dim = channels[-1]
        self.layer0 = tnn.Sequential(
            tnn.Conv2d(3, channels[0], kernel_size=7, stride=1, padding=3, bias=False),
            tnn.BatchNorm2d(channels[0]),
            tnn.ReLU(inplace=True),
        )
        self.layer1 = self._make_conv_layers(channels[0], layers[0], stride=1)
        self.layer2 = self._make_conv_layers(channels[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, channels[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, channels[3], layers[3], stride=2)
        self.layer5 = self._make_layer(block, channels[4], layers[4], dilation=2, new_level=False)
        self.layer6 = (
            None
            if layers[5] == 0
            else self._make_layer(block, channels[5], layers[5], dilation=4, new_level=False)
        )
        self.layer7 = None if layers[6] == 0 else self._make_conv_layers(channels[6], layers[6], dilation=2)
        self.layer8 = None if layers[7] == 0 else self._make_conv_layers(channels[7], layers[7], dilation=1)
        if num_classes > 0:
            self.avgpool = tnn.AvgPool2d(pool_size)
            self.fc = tnn.Conv2d(self.out_dim, num_classes, kernel_size=1, stride=1, padding=0, bias=True)
        for m in self.modules():
            if isinstance(m, tnn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / n))
            elif isinstance(m, tnn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()

    def _make_layer(self, block, planes, blocks, stride=1, dilation=1, new_level=True, residual=True):
        assert dilation == 1 or dilation % 2 == 0
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = tnn.Sequential(
                tnn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                tnn.BatchNorm2d(planes * block.expansion),
            )
        layers = [
            block(
                self.inplanes,
                planes,
                stride,
                downsample,
                dilation=(1, 1) if dilation == 1 else (dilation // 2 if new_level else dilation, dilation),
                residual=residual,
            )
        ]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, residual=residual, dilation=(dilation, dilation)))
        return tnn.Sequential(*layers)

    def _make_conv_layers(self, channels, convs, stride=1, dilation=1):
        modules = []
        for i in range(convs):
            modules.extend(
                [
                    tnn.Conv2d(
                        self.inplanes,
                        channels,
                        kernel_size=3,
                        stride=stride if i == 0 else 1,
                        padding=dilation,
                        bias=False,
                        dilation=dilation,
                    ),
                    tnn.BatchNorm2d(channels),
                    tnn.ReLU(inplace=True),
                ]
            )
            self.inplanes = channels
        return tnn.Sequential(*modules)


def fill_up_weights(up):
    w = up.weight.data
    f = math.ceil(w.size(2) / 2)
    c = (2 * f - 1 - f % 2) / (2.0 * f)
    for i in range(w.size(2)):
        for j in range(w.size(3)):
            w[0, 0, i, j] = (1 - math.fabs(i / f - c)) * (1 - math.fabs(j / f - c))
    for c in range(1, w.size(0)):
        w[c, 0, :, :] = w[0, 0, :, :]


class TorchDRNSeg(tnn.Module):
    """fyu/drn segment.py `DRNSeg` (use_torch_up=False), taking the DRN instead of its name."""

    def __init__(self, model, classes):
        super().__init__()
        self.base = tnn.Sequential(*list(model.children())[:-2])
        self.seg = tnn.Conv2d(model.out_dim, classes, kernel_size=1, bias=True)
        self.softmax = tnn.LogSoftmax(dim=1)  # the reference's LogSoftmax() picks dim 1 for 4-D input
        m = self.seg
        n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
        m.weight.data.normal_(0, math.sqrt(2.0 / n))
        m.bias.data.zero_()
        up = tnn.ConvTranspose2d(
            classes, classes, 16, stride=8, padding=4, output_padding=0, groups=classes, bias=False
        )
        fill_up_weights(up)
        up.weight.requires_grad = False
        self.up = up

    def forward(self, x):
        x = self.base(x)
        x = self.seg(x)
        y = self.up(x)
        return self.softmax(y), x


# Tiny variants with every structural case: shortcuts with stride 2 (layer3/4) and stride 1 (layer5),
# blocks without one (layer6), dilations 2 and 4, conv groups with dilation 2 (layer7).
TINY = {
    "bottleneck": dict(layers=(1, 1, 2, 1, 2, 1, 1, 1), channels=(4, 8, 8, 8, 16, 16, 8, 8)),
    "basic": dict(layers=(1, 1, 1, 2, 1, 2, 1, 1), channels=(4, 8, 8, 16, 32, 32, 8, 8)),
}
NUM_CLASSES = 5


def _torch_segmenter(block: str, seed: int = 0) -> TorchDRNSeg:
    """A tiny DRNSeg with random weights, BatchNorm statistics and `up` kernel, in eval mode."""
    torch.manual_seed(seed)
    cfg = TINY[block]
    block_cls = Bottleneck if block == "bottleneck" else BasicBlock
    net = TorchDRNSeg(TorchDRN(block_cls, cfg["layers"], channels=cfg["channels"]), NUM_CLASSES)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, tnn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
        net.seg.bias.normal_(0.0, 0.1)
        net.up.weight.normal_(0.0, 0.1)  # not bilinear: a flip or transposition of the kernel would show
    return net.eval()


def _save(net, path, legacy: bool = False) -> str:
    """legacy: as a 2017 file (fyu/drn's release): pre-1.6 serialization, no num_batches_tracked."""
    state = net.state_dict()
    if legacy:
        state = type(state)((k, v) for k, v in state.items() if not k.endswith("num_batches_tracked"))
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    return str(path)


@pytest.fixture(scope="module")
def bottleneck_file(tmp_path_factory):
    net = _torch_segmenter("bottleneck")
    return net, _save(net, tmp_path_factory.mktemp("drn") / "tiny_drn.pth")


# ---- Tests -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", ["bottleneck", "basic"])
def test_flax_matches_torch_drnseg(block, tmp_path, bottleneck_file):
    net, path = bottleneck_file if block == "bottleneck" else (None, None)
    if net is None:
        net = _torch_segmenter(block, seed=1)
        path = _save(net, tmp_path / "tiny_basic.pth", legacy=True)
    explicit = drn.DRNSeg(num_classes=NUM_CLASSES, block=block, **TINY[block])
    model, variables = drn_weights.load(path, "auto")
    assert model == explicit  # the architecture read off the keys
    assert drn_weights.load(path, explicit)[1].keys() == variables.keys()

    apply = jax.jit(functools.partial(model.apply, return_coarse=True))
    rng = np.random.default_rng(0)
    for shape in ((2, 64, 64), (1, 60, 52)):  # 60 x 52: strided convs round up, output 64 x 56
        x = rng.standard_normal((shape[0], 3, *shape[1:])).astype(np.float32)
        with torch.no_grad():
            ref_logp, ref_coarse = (t.numpy().transpose(0, 2, 3, 1) for t in net(torch.from_numpy(x)))
        scores, coarse = apply(variables, x.transpose(0, 2, 3, 1))
        logp = np.asarray(scores - np.log(np.exp(np.asarray(scores, np.float64)).sum(-1, keepdims=True)))
        assert scores.shape == ref_logp.shape
        np.testing.assert_allclose(np.asarray(coarse), ref_coarse, atol=1e-4, rtol=0)
        np.testing.assert_allclose(logp, ref_logp, atol=1e-4, rtol=0)
    assert np.abs(ref_logp).max() > 0.5  # not a trivially flat output


def test_drn_d_105_key_table_matches_torch():
    """Every key and shape of the real DRN-D-105 DRNSeg state_dict (built on the meta device, no memory)."""
    with torch.device("meta"):
        net = TorchDRNSeg(TorchDRN(Bottleneck, drn.ARCHS["drn_d_105"][1]), drn.CITYSCAPES_CLASSES)
    expected = {
        k: tuple(v.shape) for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")
    }
    table = drn_weights.torch_key_map(drn.DRNSeg())
    assert {k: shape for k, (_, shape) in table.items()} == expected
    assert table["base.5.22.conv2.weight"][0] == ("params", "layer5", "block_22", "conv2", "kernel")
    shortcut_var = table["base.6.0.downsample.1.running_var"][0]
    assert shortcut_var == ("batch_stats", "layer6", "block_0", "downsample_bn", "var")
    assert list(table) == list(expected)  # listed in the state_dict's order
    assert drn.DRNSeg().arch == "drn_d_105"


@pytest.mark.parametrize(
    "k, s, p, h, w", [(16, 8, 4, 5, 7), (16, 8, 4, 1, 1), (4, 2, 1, 6, 5), (5, 3, 0, 3, 4)]
)
def test_depthwise_conv_transpose_matches_torch(k, s, p, h, w):
    rng = np.random.default_rng(k + h)
    x = rng.standard_normal((2, 3, h, w)).astype(np.float32)
    weight = rng.standard_normal((3, 1, k, k)).astype(np.float32)
    ref = tnn.functional.conv_transpose2d(
        torch.from_numpy(x), torch.from_numpy(weight), stride=s, padding=p, groups=3
    )
    out = drn.depthwise_conv_transpose(x.transpose(0, 2, 3, 1), weight.transpose(2, 3, 1, 0), s, p)
    np.testing.assert_allclose(np.asarray(out), ref.numpy().transpose(0, 2, 3, 1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_dilated_conv2d_matches_torch(impl):
    from ganjax.models.layers import Conv2d

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 11, 9)).astype(np.float32)
    torch_conv = tnn.Conv2d(4, 5, 3, stride=2, padding=4, dilation=4)
    conv = Conv2d(5, 3, stride=2, padding=4, dilation=4, impl=impl)
    params = {
        "kernel": torch_conv.weight.detach().numpy().transpose(2, 3, 1, 0),
        "bias": torch_conv.bias.detach().numpy(),
    }
    out = conv.apply({"params": params}, x.transpose(0, 2, 3, 1))
    with torch.no_grad():
        ref = torch_conv(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=0)


def test_up_kernel_init_is_fill_up_weights():
    up = tnn.ConvTranspose2d(3, 3, 16, stride=8, padding=4, groups=3, bias=False)
    fill_up_weights(up)
    np.testing.assert_allclose(drn.bilinear_up_kernel(16), up.weight.detach().numpy()[0, 0], atol=1e-7)


def test_converter_errors(bottleneck_file, tmp_path):
    net, path = bottleneck_file
    state = {k: v.numpy() for k, v in net.state_dict().items()}
    model = drn_weights.infer_model(state)
    with pytest.raises(drn_weights.WeightsError) as e:
        drn_weights.convert_state_dict({k: v for k, v in state.items() if k != "base.3.1.bn2.weight"}, model)
    assert "1 missing: base.3.1.bn2.weight" in str(e.value)
    with pytest.raises(drn_weights.WeightsError, match=r"1 unexpected: fc\.weight.*ImageNet classifier"):
        drn_weights.convert_state_dict({**state, "fc.weight": np.zeros((1000, 8, 1, 1))}, model)
    bad = {**state, "seg.weight": np.zeros((NUM_CLASSES, 9, 1, 1), np.float32)}
    shape_error = r"seg\.weight \(5, 9, 1, 1\) \(expected \(5, 8, 1, 1\)\)"
    with pytest.raises(drn_weights.WeightsError, match=shape_error):
        drn_weights.convert_state_dict(bad, model)
    # The tiny file against the default DRN-D-105: everything listed, and the way out named.
    with pytest.raises(drn_weights.WeightsError) as e:
        drn_weights.load(path)
    message = str(e.value)
    assert "does not match DRNSeg drn_d_105, 19 classes" in message
    assert "missing: base.0.0.weight" not in message and "base.0.0.weight (4, 3, 7, 7)" in message
    assert re.search(r"\d+ missing: base\.3\.2\.", message) and "more)" in message
    assert "--arch auto" in message
    # Not a DRNSeg at all; a missing file.
    with pytest.raises(drn_weights.WeightsError, match="Not a DRN-D segmenter"):
        drn_weights.infer_model({"weight": np.zeros(3)})
    download = r"drn-d-105_ms_cityscapes\.pth.*go\.yf\.io/drn-cityscapes-models"
    with pytest.raises(FileNotFoundError, match=download):
        drn_weights.load(tmp_path / "absent.pth")
    with pytest.raises(SystemExit):
        drn_weights.parse_args(["--weights", path, "--output", "x", "--arch", "drn_d_0"])


def _reference_labels(net, photos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GAN Compression's mIoU path for (N, H, W, 3) [-1, 1] photos: util.tensor2im, ToTensor, Normalize,
    DRNSeg, argmax of the LogSoftmax; also returns the top-2 margin of each pixel."""
    images = np.clip((photos + 1) / 2.0 * 255.0, 0, 255).astype(np.uint8)  # tensor2im
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).float() / 255  # ToTensor
    for t in x:  # Normalize
        for ch, m, s in zip(t, drn.CITYSCAPES_MEAN, drn.CITYSCAPES_STD, strict=True):
            ch.sub_(m).div_(s)
    with torch.no_grad():
        logp = net(x)[0].numpy()
    top2 = np.sort(logp, axis=1)[:, -2:]
    return logp.argmax(1), top2[:, 1] - top2[:, 0]


def test_segmenter_and_export_match_the_reference(bottleneck_file, tmp_path):
    net, path = bottleneck_file
    rng = np.random.default_rng(3)
    photos = np.tanh(rng.standard_normal((3, 64, 64, 3))).astype(np.float32)
    ref, margin = _reference_labels(net, photos)

    segmenter = drn_weights.build_segmenter(path, "auto", batch_size=2)
    assert segmenter.num_classes == NUM_CLASSES
    labels = segmenter(photos)
    assert labels.shape == (3, 64, 64) and labels.dtype == np.int32
    assert np.all((labels == ref) | (margin < 1e-4)), np.mean(labels != ref)
    assert len(np.unique(ref)) > 1

    out = tmp_path / "drn.jaxexport"
    args = ["--weights", path, "--output", str(out), "--size", "64", "64", "--arch", "auto"]
    meta = drn_weights.main([*args, "--platforms", "cpu"])
    assert meta["num_classes"] == NUM_CLASSES and meta["output"] == "logits"
    exported = segmentation.load_segmenter(str(out))
    np.testing.assert_array_equal(exported(photos), labels)
    scores = segmentation.score_photos(photos, ref.astype(np.uint8), exported)
    assert scores["pixel_accuracy"] > 0.999
