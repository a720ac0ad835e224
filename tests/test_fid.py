"""FID/KID: the Flax FID Inception against a PyTorch build of the same network, the weight converter,
the float64 Fréchet distance (against scipy's sqrtm and closed forms), KID's unbiasedness, the .npz
statistics format, the protocols and the command line."""

import json
import sys

import jax
import numpy as np
import pytest
import scipy.linalg
from PIL import Image

from ganjax import sharding
from ganjax.evaluation import fid
from ganjax.interop import inception_weights
from ganjax.models import inception

torch = pytest.importorskip("torch")
F = torch.nn.functional
tnn = torch.nn


# ------------------------------------------------------------------------------------------------
# pytorch-fid's FID Inception, built here from torch layers (torchvision's Inception3 attribute names,
# aux_logits=False, 1008 classes, with pytorch-fid's FIDInceptionA/C/E_1/E_2 pooling patches).
# ------------------------------------------------------------------------------------------------


class TorchBasicConv2d(tnn.Module):
    def __init__(self, cin, cout, **kwargs):
        super().__init__()
        self.conv = tnn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = tnn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_no_pad(x):
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class TorchInceptionA(tnn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = TorchBasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = TorchBasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = TorchBasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = TorchBasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = TorchBasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = TorchBasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = TorchBasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_no_pad(x))], 1)


class TorchInceptionB(tnn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = TorchBasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = TorchBasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = TorchBasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = TorchBasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class TorchInceptionC(tnn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = TorchBasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = TorchBasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = TorchBasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = TorchBasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = TorchBasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = TorchBasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = TorchBasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = TorchBasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = TorchBasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = TorchBasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_avg_no_pad(x))], 1)


class TorchInceptionD(tnn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = TorchBasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = TorchBasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = TorchBasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = TorchBasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = TorchBasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = TorchBasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class TorchInceptionE(tnn.Module):
    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = TorchBasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = TorchBasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = TorchBasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = TorchBasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = TorchBasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = TorchBasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = TorchBasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = TorchBasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = TorchBasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        if self.pool == "avg":  # FIDInceptionE_1
            pooled = _avg_no_pad(x)
        else:  # FIDInceptionE_2
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class TorchFIDInception(tnn.Module):
    """pytorch-fid's InceptionV3(output_blocks=[3]) on [0, 1] NCHW images -> (B, 2048)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = TorchBasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = TorchBasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = TorchBasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = TorchBasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = TorchBasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = TorchInceptionA(192, 32)
        self.Mixed_5c = TorchInceptionA(256, 64)
        self.Mixed_5d = TorchInceptionA(288, 64)
        self.Mixed_6a = TorchInceptionB(288)
        self.Mixed_6b = TorchInceptionC(768, 128)
        self.Mixed_6c = TorchInceptionC(768, 160)
        self.Mixed_6d = TorchInceptionC(768, 160)
        self.Mixed_6e = TorchInceptionC(768, 192)
        self.Mixed_7a = TorchInceptionD(768)
        self.Mixed_7b = TorchInceptionE(1280, "avg")
        self.Mixed_7c = TorchInceptionE(2048, "max")
        self.fc = tnn.Linear(2048, inception.NUM_CLASSES)

    def forward(self, x, resize=True):
        if resize:
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), kernel_size=3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, "Mixed_" + name)(x)
        return F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)


def _nchw01(images_nhwc_pm1):
    return torch.from_numpy((np.asarray(images_nhwc_pm1, np.float32) + 1) / 2).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def torch_model():
    """Random weights whose batch-norm running statistics are calibrated on random images, so that
    every layer's activations have unit scale (uncalibrated random weights make the features vanish)."""
    torch.manual_seed(0)
    model = TorchFIDInception()
    for m in model.modules():
        if isinstance(m, tnn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0.0, 0.2)
            m.momentum = None  # cumulative average: after one batch the running stats are its stats
            m.reset_running_stats()
    # Calibrate on images like the tested ones (sizes 32 to 299, resized): deep random networks are
    # scale-sensitive to the input's smoothness.
    calibration = torch.cat(
        [
            F.interpolate(_nchw01(_images(1, h, w, seed=100 + h)), size=(299, 299), mode="bilinear")
            for h, w in [(32, 32), (96, 128), (299, 299)]
        ]
    )
    model.train()
    with torch.no_grad():
        model(calibration, resize=False)
    return model.eval()


@pytest.fixture(scope="module")
def variables(torch_model):
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    return inception_weights.convert_state_dict(state)


def _images(n, h, w, seed):
    """Smooth random float images in [-1, 1] (upsampled noise: nearer to photos than white noise)."""
    rng = np.random.default_rng(seed)
    small = rng.uniform(-1, 1, (n, 3, max(2, h // 8), max(2, w // 8))).astype(np.float32)
    up = F.interpolate(torch.from_numpy(small), size=(h, w), mode="bilinear", align_corners=False)
    noise = rng.normal(0, 0.1, (n, 3, h, w)).astype(np.float32)
    return np.clip(up.numpy() + noise, -1, 1).transpose(0, 2, 3, 1)


# ------------------------------------------------------------------------------------------------
# The network and its weights.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(64, 64), (96, 200), (512, 400), (299, 299)])
def test_resize_matches_torch_bilinear(size):
    x = _images(2, *size, seed=1)
    ours = np.asarray(inception.resize_bilinear(x, 299, 299))
    ref = F.interpolate(_nchw01(x) * 2 - 1, size=(299, 299), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), atol=2e-6)


def test_inception_matches_torch(torch_model, variables):
    x = _images(2, 96, 128, seed=2)  # resized to 299 x 299 by both
    ours = jax.jit(inception.FIDInceptionV3().apply)(variables, x)
    with torch.no_grad():
        ref = torch_model(_nchw01(x)).numpy()
    assert ours.shape == (2, inception.FEATURE_DIM) and ours.dtype == np.float32
    assert 0.1 < ref.std() < 10  # calibrated: features of the scale real pool3 features have
    # ~9e-5 at most here; PyTorch's own float32 result differs from its float64 one by ~2.5e-4.
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=1e-4)


def test_sharded_extractor_matches_torch_and_pads_last_batch(torch_model, variables):
    mesh = sharding.make_mesh((("data", -1),))
    extractor = fid.InceptionFeatures(variables, mesh=mesh, batch_size=6)  # -> 8, one image per device
    assert extractor.batch_size == 8
    images = fid.to_uint8(_images(11, 32, 32, seed=3), "round")
    ours = extractor(images)  # two steps, the second padded with 5 copies of the last image
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255).numpy()
    assert ours.shape == (11, 2048)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)
    # Batches of any size from an iterable give the same features.
    np.testing.assert_allclose(extractor(iter([images[:3], images[3:8]])), ours[:8], atol=1e-6)
    with pytest.raises(ValueError, match="no images"):
        extractor(images[:0])


def test_inception_rejects_bad_inputs(variables):
    with pytest.raises(ValueError, match="at least 75"):
        inception.FIDInceptionV3(resize_input=False).apply(variables, np.zeros((1, 64, 64, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        inception.FIDInceptionV3().apply(variables, np.zeros((1, 64, 64), np.float32))


def test_converter_key_map_is_torchvisions(torch_model):
    mapping = inception_weights.torch_key_map()
    torch_keys = {
        k
        for k in torch_model.state_dict()
        if not k.endswith("num_batches_tracked") and k not in inception_weights.CLASSIFIER_SHAPES
    }
    assert set(mapping) == torch_keys and len(mapping) == 94 * 5  # 94 BasicConv2d: conv + 4 bn arrays
    path, shape = mapping["Mixed_5b.branch1x1.conv.weight"]
    assert path == ("params", "Mixed_5b", "branch1x1", "conv", "kernel") and shape == (1, 1, 192, 64)
    assert mapping["Conv2d_1a_3x3.bn.running_var"][0] == ("batch_stats", "Conv2d_1a_3x3", "bn", "var")
    assert mapping["Mixed_7c.branch3x3dbl_3b.conv.weight"][1] == (3, 1, 384, 384)


def test_converter_layouts(torch_model, variables):
    state = torch_model.state_dict()
    np.testing.assert_array_equal(
        variables["params"]["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"],
        state["Mixed_6b.branch7x7_2.conv.weight"].numpy().transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        variables["batch_stats"]["Mixed_5b"]["branch_pool"]["bn"]["mean"],
        state["Mixed_5b.branch_pool.bn.running_mean"].numpy(),
    )


@pytest.fixture(scope="module")
def state_dict(torch_model):
    return {k: v.numpy() for k, v in torch_model.state_dict().items()}


def test_converter_names_the_first_problem(state_dict):
    bad = dict(state_dict)
    del bad["Mixed_6c.branch7x7dbl_3.bn.weight"]
    with pytest.raises(
        inception_weights.WeightsError, match=r"missing.*'Mixed_6c\.branch7x7dbl_3\.bn\.weight'"
    ):
        inception_weights.convert_state_dict(bad)

    bad = dict(state_dict, **{"Mixed_5b.extra.weight": np.zeros(3)})
    with pytest.raises(inception_weights.WeightsError, match=r"Unexpected key 'Mixed_5b\.extra\.weight'"):
        inception_weights.convert_state_dict(bad)

    bad = dict(state_dict, **{"Mixed_7b.branch1x1.conv.weight": np.zeros((320, 1280, 3, 3), np.float32)})
    with pytest.raises(
        inception_weights.WeightsError, match=r"\(320, 1280, 3, 3\), expected \(320, 1280, 1, 1\)"
    ):
        inception_weights.convert_state_dict(bad)

    torchvision_like = dict(state_dict, **{"AuxLogits.fc.weight": np.zeros((1000, 768), np.float32)})
    with pytest.raises(inception_weights.WeightsError, match="torchvision's ImageNet Inception"):
        inception_weights.convert_state_dict(torchvision_like)

    bad = dict(state_dict, **{"fc.weight": np.zeros((1000, 2048), np.float32)})
    with pytest.raises(inception_weights.WeightsError, match="1008-class.*torchvision's ImageNet"):
        inception_weights.convert_state_dict(bad)


def test_pth_conversion_is_cached_and_cache_needs_no_torch(state_dict, tmp_path, monkeypatch):
    pth = tmp_path / inception.FID_WEIGHTS_FILENAME
    # pytorch-fid's file comes from an old torch: no num_batches_tracked counters; both must load.
    torch.save({k: torch.from_numpy(v) for k, v in state_dict.items() if "num_batches" not in k}, pth)
    first = inception_weights.load_variables(pth)
    cache = tmp_path / "pt_inception-2015-12-05-6726825d.flax.npz"
    assert cache.exists()

    def no_torch(path):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(inception_weights, "load_torch_state_dict", no_torch)
    second = inception_weights.load_variables(pth)
    third = inception_weights.load_variables(cache)
    for a, b, c in zip(jax.tree.leaves(first), jax.tree.leaves(second), jax.tree.leaves(third), strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_missing_weights_and_missing_torch_messages(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="pytorch-fid/releases/download/fid_weights"):
        inception_weights.load_variables(tmp_path / "nope.pth")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install -e '\.\[test\]'"):
        inception_weights.load_torch_state_dict(tmp_path / "x.pth")


# ------------------------------------------------------------------------------------------------
# Fréchet distance.
# ------------------------------------------------------------------------------------------------


def _random_covariance(rng, d, n=None):
    a = rng.normal(size=(n or 3 * d, d))
    return np.cov(a, rowvar=False)


def _pytorch_fid_reference(mu1, s1, mu2, s2):
    """pytorch-fid's calculate_frechet_distance (scipy sqrtm) for full-rank covariances."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    diff = mu1 - mu2
    return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def test_sqrtm_matches_scipy():
    rng = np.random.default_rng(0)
    a, b = _random_covariance(rng, 40), _random_covariance(rng, 40)
    np.testing.assert_allclose(fid.sqrtm_psd(a), scipy.linalg.sqrtm(a).real, atol=1e-10)
    np.testing.assert_allclose(
        fid.trace_sqrtm_product(a, b), np.trace(scipy.linalg.sqrtm(a @ b)).real, rtol=1e-10
    )


def test_frechet_distance_matches_pytorch_fid_formula():
    rng = np.random.default_rng(1)
    d = 64
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_covariance(rng, d), _random_covariance(rng, d)
    np.testing.assert_allclose(
        fid.frechet_distance(mu1, s1, mu2, s2), _pytorch_fid_reference(mu1, s1, mu2, s2), rtol=1e-9
    )


def test_frechet_distance_of_gaussians_known_answer():
    # Diagonal covariances: FID = |mu1 - mu2|^2 + sum_i (s1_i + s2_i - 2 sqrt(s1_i s2_i)).
    rng = np.random.default_rng(2)
    d = 32
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    got = fid.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    # Rotating both Gaussians by the same orthogonal matrix changes nothing.
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    rotated = fid.frechet_distance(q @ mu1, q @ np.diag(v1) @ q.T, q @ mu2, q @ np.diag(v2) @ q.T)
    np.testing.assert_allclose(rotated, expected, rtol=1e-9)


@pytest.mark.parametrize("n", [500, 40])  # 40 < d: singular covariances (scipy's sqrtm needs an eps there)
def test_fid_of_a_set_with_itself_is_zero(n):
    rng = np.random.default_rng(3)
    feats = rng.gamma(2.0, 0.3, size=(n, 64)).astype(np.float32)
    stats = fid.statistics(feats)
    assert abs(fid.fid_from_statistics(stats, stats)) < 1e-6
    assert stats.mu.dtype == np.float64 and stats.sigma.shape == (64, 64)
    np.testing.assert_allclose(stats.sigma, np.cov(feats.astype(np.float64), rowvar=False))


def test_frechet_distance_rejects_bad_inputs():
    with pytest.raises(ValueError, match="shapes do not match"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="sigma2 has NaN"):
        fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.full((2, 2), np.nan))


# ------------------------------------------------------------------------------------------------
# KID.
# ------------------------------------------------------------------------------------------------


def test_mmd2_unbiased_is_the_u_statistic():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(7, 5)), rng.normal(0.5, 1.0, size=(7, 5))
    k = lambda a, b: (a @ b / 5 + 1) ** 3  # noqa: E731
    m = len(x)
    within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    cross = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    np.testing.assert_allclose(fid.mmd2_unbiased(x, y), within - 2 * cross, rtol=1e-12)


def test_kid_gram_and_subset_paths_agree():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(60, 16)), rng.normal(0.2, 1.0, size=(50, 16))
    gram = fid.kid_subset_values(a, b, 12, 30, seed=7, precompute_gram=True)
    direct = fid.kid_subset_values(a, b, 12, 30, seed=7, precompute_gram=False)
    np.testing.assert_allclose(gram, direct, rtol=1e-10, atol=1e-13)
    assert fid.kid(a, b, 12, 30, seed=7) == (float(gram.mean()), float(gram.std()))


def test_kid_is_unbiased_and_detects_a_shift():
    rng = np.random.default_rng(6)
    d, n, draws = 8, 60, 60
    same, biased = [], []
    for _ in range(draws):
        a = rng.normal(0.3, 1.0, size=(n, d))
        b = rng.normal(0.3, 1.0, size=(n, d))
        same.append(fid.kid(a, b, num_subsets=10, subset_size=30, seed=int(rng.integers(1 << 30)))[0])
        # The biased (V-statistic) estimate keeps the diagonal terms: positive on average.
        kxx, kyy, kxy = fid.polynomial_kernel(a, a), fid.polynomial_kernel(b, b), fid.polynomial_kernel(a, b)
        biased.append(kxx.mean() + kyy.mean() - 2 * kxy.mean())
    same, biased = np.asarray(same), np.asarray(biased)
    standard_error = same.std(ddof=1) / np.sqrt(draws)
    assert abs(same.mean()) < 4 * standard_error, (same.mean(), standard_error)
    assert biased.mean() > 10 * biased.std(ddof=1) / np.sqrt(draws)  # the test can see a bias
    a, b = rng.normal(0.3, 1.0, size=(n, d)), rng.normal(0.8, 1.0, size=(n, d))
    shifted_mean, _ = fid.kid(a, b, num_subsets=10, subset_size=30)
    assert shifted_mean > 10 * same.std(ddof=1)


def test_kid_subset_size_is_capped_at_the_set_size():
    rng = np.random.default_rng(8)
    a, b = rng.normal(size=(20, 4)), rng.normal(size=(25, 4))
    values = fid.kid_subset_values(a, b, num_subsets=5, subset_size=1000)
    assert values.shape == (5,)
    # With all 20 a-features in every subset only the b subsets vary; a == b subsets give one value.
    mean, std = fid.kid(a, a, num_subsets=5, subset_size=1000)
    assert std < 1e-12 and mean < 0  # the unbiased estimate of identical samples is negative
    with pytest.raises(ValueError, match="at least 2"):
        fid.kid(a[:1], b)


# ------------------------------------------------------------------------------------------------
# Statistics files, protocols, command line.
# ------------------------------------------------------------------------------------------------


def test_statistics_npz_round_trip_and_pytorch_fid_format(tmp_path):
    rng = np.random.default_rng(9)
    feats = rng.normal(size=(30, 6)).astype(np.float32)
    stats = fid.statistics(feats, keep_features=True)
    path = tmp_path / "sub" / "stats.npz"
    fid.save_statistics(path, stats)
    with np.load(path) as data:  # what pytorch-fid reads: f["mu"], f["sigma"]
        assert {"mu", "sigma"} <= set(data.files)
        assert data["mu"].dtype == np.float64 and data["sigma"].shape == (6, 6)
    loaded = fid.load_statistics(path)
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    np.testing.assert_array_equal(loaded.features, feats)
    assert loaded.num_images == 30
    # A file written the way pytorch-fid / GAN Compression write theirs.
    other = tmp_path / "theirs.npz"
    np.savez(other, mu=stats.mu, sigma=stats.sigma)
    theirs = fid.load_statistics(other)
    assert theirs.features is None and theirs.num_images is None
    np.savez(tmp_path / "bad.npz", mu=stats.mu)
    with pytest.raises(ValueError, match="no 'sigma'"):
        fid.load_statistics(tmp_path / "bad.npz")


def test_to_uint8_matches_the_references_tensor2im():
    rng = np.random.default_rng(10)
    x = rng.uniform(-1.1, 1.1, size=(2, 8, 8, 3)).astype(np.float32)
    # tensor2im: (np.transpose(t.cpu().float().numpy(), (1, 2, 0)) + 1) / 2.0 * 255.0, clip, astype(uint8)
    expected = np.clip((torch.from_numpy(x).numpy() + 1) / 2.0 * 255.0, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(fid.to_uint8(x), expected)
    u = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, -1)
    decoded = u.astype(np.float32) / 127.5 - 1  # how ganjax pipelines decode 8-bit images
    np.testing.assert_array_equal(fid.to_uint8(decoded, "round"), u)
    assert (fid.to_uint8(decoded, "truncate") != u).any()  # truncation shifts some levels (reference)
    assert fid.to_uint8(u) is u


def _pixel_features(images):
    """A cheap stand-in for Inception: per-image channel means and a few pixels (float32 (N, 12))."""
    batches = [images] if isinstance(images, np.ndarray) else list(images)
    x = np.concatenate(batches).astype(np.float32) / 255.0
    return np.concatenate([x.mean(axis=(1, 2)), x[:, 0, 0], x[:, -1, -1], x[:, 3, 5]], axis=1)


def test_protocols():
    real = fid.to_uint8(_images(40, 16, 16, seed=11), "round")
    same = fid.protocol_test_vs_test(_pixel_features, real, real, kid_subset_size=20, kid_subsets=10)
    assert abs(same["fid"]) < 1e-6 and same["num_real"] == same["num_fake"] == 40
    assert same["kid_subset_size"] == 20 and set(same) >= {"kid_mean", "kid_std"}
    fake = _images(40, 16, 16, seed=12) * 0.5  # float generator outputs: quantized as tensor2im
    result = fid.protocol_test_vs_test(_pixel_features, real, fake, kid_subset_size=20, kid_subsets=10)
    expected = fid.fid_from_statistics(
        fid.statistics(_pixel_features(real)), fid.statistics(_pixel_features(fid.to_uint8(fake)))
    )
    np.testing.assert_allclose(result["fid"], expected, rtol=1e-12)
    assert result["fid"] > 100 * abs(same["fid"]) + 0.05 and result["kid_mean"] > 0

    stats = fid.reference_statistics(_pixel_features, iter([real[:15], real[15:]]), keep_features=True)
    gc = fid.protocol_gan_compression(_pixel_features, fake, stats, kid_subset_size=20, kid_subsets=10)
    np.testing.assert_allclose(gc["fid"], result["fid"], rtol=1e-12)  # uint8 reals: same statistics
    no_features = fid.protocol_gan_compression(
        _pixel_features, fake, fid.reference_statistics(_pixel_features, real)
    )
    assert "kid_mean" not in no_features


def test_image_folder_reading(tmp_path):
    images = fid.to_uint8(_images(5, 12, 10, seed=13), "round")
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{i:02d}.png")
    Image.fromarray(images[0][..., 0]).save(tmp_path / "05_grey.PNG")  # greyscale -> RGB, any case
    (tmp_path / "notes.txt").write_text("not an image")
    folder = fid.ImageFolder(tmp_path, batch_size=4)
    batches = list(folder)
    assert len(folder) == 6 and [len(b) for b in batches] == [4, 2]
    np.testing.assert_array_equal(np.concatenate(batches)[:5], images)
    np.testing.assert_array_equal(batches[1][1], np.repeat(images[0][..., :1], 3, -1))
    Image.fromarray(images[0][:6]).save(tmp_path / "06_small.png")
    with pytest.raises(ValueError, match="06_small.png is 10x6"):
        list(fid.ImageFolder(tmp_path))


def test_command_line(variables, tmp_path, capsys):
    weights = tmp_path / "inception.flax.npz"
    inception_weights.save_npz(variables, weights)
    real_images = fid.to_uint8(_images(8, 32, 32, seed=14), "round")
    fake_images = fid.to_uint8(_images(7, 32, 32, seed=15) * 0.8)
    for name, images in (("real", real_images), ("fake", fake_images)):
        (tmp_path / name).mkdir()
        for i, image in enumerate(images):
            Image.fromarray(image).save(tmp_path / name / f"{i}.png")
    common = ["--weights", str(weights), "--batch_size", "8", "--kid_subsets", "10", "--kid_subset_size", "5"]
    stats = tmp_path / "real_stats.npz"
    metrics_json = tmp_path / "metrics.json"
    args = ["--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"), "--out", str(stats)]
    metrics = fid.main(common + args + ["--metrics_json", str(metrics_json)])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["fid"] == metrics["fid"]
    assert json.loads(metrics_json.read_text())["kid_subset_size"] == 5
    assert metrics["fid"] > 0 and metrics["num_real"] == 8 and metrics["num_fake"] == 7
    # Against the saved statistics (no features kept: FID only) the FID is the same.
    again = fid.main(common + ["--real", str(stats), "--fake", str(tmp_path / "fake")])
    np.testing.assert_allclose(again["fid"], metrics["fid"], rtol=1e-12)
    assert "kid_mean" not in again
    with pytest.raises(SystemExit, match="nothing to do"):
        fid.main(common + ["--real", str(tmp_path / "real")])
