"""Tests for tool_pool.scorers: real pyiqa metrics, real basicsr, real photos."""

import socket
from pathlib import Path

import numpy as np
import pyiqa  # after tir
import pytest
import torch
from basicsr.utils.matlab_functions import imresize
from PIL import Image
from skimage import data

import tir  # noqa: F401  (environment shims first)
from tool_pool import scorers
from tool_pool.scorers import METRICS, MetricUnavailable, get_scorer, match_reference_size, score_all

# ---------------------------------------------------------------- published calibration values
# pyiqa's authors score 5 distorted/reference pairs (installed with pyiqa as ResultsCalibra/) and
# publish two rows per metric, in github.com/chaofengc/IQA-PyTorch at commit 01ae427f:
#  - ResultsCalibra/results_official.csv: the metric's original (mostly MATLAB) implementation;
#    pyiqa's own calibration test (tests/test_metric_general.py) accepts atol 1e-2 + rtol 1e-2
#    against it, rtol 6e-2 for niqe.
#  - "<metric>(ours)" rows of ResultsCalibra/calibration_summary.csv: pyiqa's implementation,
#    printed to 4 decimals. We must reproduce those closely: same code, same inputs.
# niqe: the "niqe" rows, not "niqe_matlab": basicsr's statistics are the NIQE authors' release
# (pyiqa's niqe_modelparameters.mat); niqe_matlab uses MathWorks' refit, which we do not ship.
# psnr: the "psnr" rows (RGB, pyiqa's default), not psnry (Y channel).
CALIBRATION_IMAGES = ("I03.bmp", "I04.bmp", "I06.bmp", "I08.bmp", "I19.bmp")
OFFICIAL = {
    "psnr": [21.11, 20.99, 27.01, 23.3, 21.62],
    "ssim": [0.6993, 0.9978, 0.9989, 0.9669, 0.6519],
    "ms_ssim": [0.6733, 0.9996, 0.9998, 0.9566, 0.8462],
    "niqe": [15.7536293917814, 3.65492152353770, 3.23547743716998, 3.18403333858339, 8.63519663862637],
    "piqe": [100.00, 21.62, 35.86, 41.15, 76.95],
    "fsim": [0.689, 0.9702, 0.9927, 0.9575, 0.822],
    "gmsd": [0.220347639470143, 0.0005220585050504579, 0.0004482814810014102, 0.134631933046914, 0.204996493556054],
    "vif": [0.0172, 0.9891, 0.9924, 0.9103, 0.1745],
    "entropy": [6.9511, 6.9661, 7.5309, 7.5566, 5.7629],
}
PYIQA_OURS = {
    "psnr": [21.1136, 20.9872, 27.0139, 23.3002, 21.6186],
    "ssim": [0.6997, 0.9978, 0.9989, 0.9671, 0.6522],
    "ms_ssim": [0.6707, 0.9996, 0.9998, 0.9567, 0.8418],
    "niqe": [15.6538, 3.6549, 3.2342, 3.1922, 9.0722],
    "piqe": [100.0, 21.6243, 35.8646, 41.1471, 76.9485],
    "fsim": [0.6891, 0.9702, 0.9927, 0.9575, 0.822],
    "gmsd": [0.2203, 0.0005, 0.0004, 0.1346, 0.205],
    "vif": [0.0172, 0.9891, 0.9924, 0.9104, 0.175],
    "entropy": [6.9511, 6.9661, 7.5309, 7.5565, 5.7629],
}
OFFICIAL_TOLERANCE = {"niqe": (1e-2, 6e-2)}  # (atol, rtol), as pyiqa's TOL_DICT


@pytest.fixture(autouse=True, scope="module")
def tir_cache(tmp_path_factory):
    """Generated files (NIQE's .mat) go to a fresh folder, not the user's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TIR_CACHE_DIR", str(tmp_path_factory.mktemp("tir_cache")))
    mp.delenv("TIR_IQA_WEIGHTS", raising=False)
    yield
    mp.undo()


def calibra_dir() -> Path:
    # The wheel installs it beside the package, a source checkout holds it at the repo root.
    return Path(pyiqa.__file__).resolve().parent.parent / "ResultsCalibra"


@pytest.fixture(scope="module")
def calibration_pairs():
    root = calibra_dir()
    if not (root / "ref_dir").is_dir():
        pytest.skip(f"pyiqa's ResultsCalibra not found at {root}")

    def load(sub):
        return [np.asarray(Image.open(root / sub / name).convert("RGB")) for name in CALIBRATION_IMAGES]

    return load("dist_dir"), load("ref_dir")


@pytest.mark.parametrize("name", scorers.OFFLINE_METRICS)
def test_reproduces_pyiqa_published_calibration(name, calibration_pairs):
    distorted, references = calibration_pairs
    got = get_scorer(name, "cpu").score(distorted, references)
    atol, rtol = OFFICIAL_TOLERANCE.get(name, (1e-2, 1e-2))
    np.testing.assert_allclose(got, OFFICIAL[name], atol=atol, rtol=rtol, err_msg=f"{name} vs original implementation")
    np.testing.assert_allclose(got, PYIQA_OURS[name], atol=1e-3, rtol=1e-4, err_msg=f"{name} vs pyiqa's published row")


def test_every_offline_metric_is_registered_and_available():
    assert set(scorers.DEFAULT_METRICS) <= set(scorers.OFFLINE_METRICS) <= set(METRICS.names())
    status = scorers.available_metrics()
    assert all(status[name].available for name in scorers.OFFLINE_METRICS), status


# ---------------------------------------------------------------- photos


@pytest.fixture(scope="module")
def photo():
    return data.astronaut()[100:228, 150:278]  # 128x128 uint8, a face


def noisy(image, sigma, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(image + rng.normal(0, sigma, image.shape), 0, 255).astype(np.uint8)


def test_metric_properties_come_from_pyiqa():
    psnr, niqe, lpips = METRICS.get("psnr"), METRICS.get("niqe"), METRICS.get("lpips")
    assert (psnr.full_reference, psnr.lower_better, psnr.units) == (True, False, "dB")
    assert (niqe.full_reference, niqe.lower_better) == (False, True)
    assert (lpips.full_reference, lpips.lower_better) == (True, True)
    assert get_scorer("piqe").lower_better and not get_scorer("ssim").lower_better
    with pytest.raises(KeyError, match="did you mean 'lpips'"):
        METRICS.get("lpip")


def test_full_reference_metric_needs_a_reference(photo):
    with pytest.raises(ValueError, match="'psnr' is full-reference"):
        get_scorer("psnr").score([photo])
    with pytest.raises(ValueError, match="'ssim' is full-reference"):
        score_all(["niqe", "ssim"], photo)
    with pytest.raises(ValueError, match="2 images but 1 references"):
        get_scorer("psnr").score([photo, photo], [photo])


def test_scores_rank_noise_levels(photo):
    slightly, badly = noisy(photo, 5), noisy(photo, 40)
    better = score_all(scorers.DEFAULT_METRICS, slightly, photo)
    worse = score_all(scorers.DEFAULT_METRICS, badly, photo)
    assert set(better) == set(scorers.DEFAULT_METRICS)
    assert all(np.isfinite(v) for v in list(better.values()) + list(worse.values()))
    assert better["psnr"] > worse["psnr"] + 10 and better["ssim"] > worse["ssim"]
    assert better["niqe"] < worse["niqe"]  # lower is better
    assert get_scorer("psnr").score([photo], [photo])[0] > 60  # identical images: pyiqa caps, no inf


def test_quarter_size_output_is_upscaled_x4_before_scoring(photo):
    quarter = np.clip(np.round(imresize(photo.astype(np.float32) / 255, 0.25) * 255), 0, 255).astype(np.uint8)
    assert quarter.shape == (32, 32, 3)
    matched = match_reference_size(quarter, photo)
    assert matched.shape == photo.shape and matched.dtype == np.float32
    np.testing.assert_allclose(matched, np.clip(imresize(quarter.astype(np.float32) / 255, 4), 0, 1), atol=1e-6)
    psnr = get_scorer("psnr").score([quarter], [photo])[0]
    assert psnr == pytest.approx(get_scorer("psnr").score([matched], [photo])[0], abs=1e-9)
    assert 20 < psnr < 35  # bicubic x4 of a face: blurry but close
    assert match_reference_size(photo, photo).shape == photo.shape


def test_other_size_mismatch_names_both_shapes(photo):
    with pytest.raises(ValueError, match=r"\(64, 64, 3\).*\(128, 128, 3\)"):
        get_scorer("ssim").score([photo[:64, :64]], [photo])
    with pytest.raises(ValueError, match=r"\(33, 32, 3\)"):
        match_reference_size(photo[:33, :32], photo)


def test_bad_inputs_are_named(photo):
    with pytest.raises(ValueError, match=r"images\[1\].*HxWx3"):
        get_scorer("piqe").score([photo, photo[..., 0]])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        get_scorer("piqe").score([photo.astype(np.float32)])
    with pytest.raises(ValueError, match="'niqe' needs images of at least 96 px"):
        get_scorer("niqe").score([photo[:64]])


def test_batch_score_equals_per_image_score(photo):
    images = [noisy(photo, 10, seed=1), noisy(photo, 30, seed=2), noisy(photo[:112, :120], 20, seed=3)]
    refs = [photo, photo, photo[:112, :120]]
    for name in scorers.DEFAULT_METRICS:
        scorer = get_scorer(name)
        batch = scorer.score(images, refs)
        one_by_one = [scorer.score([im], [ref])[0] for im, ref in zip(images, refs, strict=True)]
        assert batch.shape == (3,) and batch.dtype == np.float64
        np.testing.assert_allclose(batch, one_by_one, rtol=1e-5, err_msg=name)
    assert get_scorer("psnr").score([], []).shape == (0,)


# ---------------------------------------------------------------- NIQE


def test_niqe_close_to_basicsr(photo):
    from basicsr.metrics import calculate_niqe

    image = data.astronaut()[:192, :192]
    ours = get_scorer("niqe").score([image])[0]
    reference = calculate_niqe(image[..., ::-1], 0, input_order="HWC", convert_to="y")  # basicsr wants BGR
    # pyiqa takes luma as Y of YIQ, basicsr as Y of YCbCr: a percent apart, not more.
    assert np.isfinite(ours) and ours == pytest.approx(float(reference), rel=0.03)


def test_niqe_params_written_once(tmp_path, monkeypatch):
    import scipy.io

    monkeypatch.setenv("TIR_CACHE_DIR", str(tmp_path / "cache"))
    path = scorers.niqe_params_path()
    assert path.parent == tmp_path / "cache" and path.is_file()
    stats, mat = np.load(scorers.basicsr_niqe_npz()), scipy.io.loadmat(path)
    np.testing.assert_array_equal(mat["mu_prisparam"], stats["mu_pris_param"])
    np.testing.assert_array_equal(mat["cov_prisparam"], stats["cov_pris_param"])
    mtime = path.stat().st_mtime_ns
    assert scorers.niqe_params_path() == path and path.stat().st_mtime_ns == mtime
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind


# ---------------------------------------------------------------- weights


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """No weights anywhere, and any network attempt fails the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("TIR_IQA_WEIGHTS", raising=False)

    def no_network(*args, **kwargs):
        raise AssertionError("a scorer tried to reach the network")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    return tmp_path


def test_missing_weights_raise_metric_unavailable_naming_the_file(empty_caches):
    with pytest.raises(MetricUnavailable) as err:
        get_scorer("musiq", "cpu")
    message = str(err.value)
    assert "'musiq'" in message and "musiq_koniq_ckpt-e95806b9.pth" in message
    assert str(empty_caches / "torch" / "hub" / "pyiqa") in message
    status = scorers.available_metrics()
    assert not status["musiq"].available and "musiq_koniq_ckpt-e95806b9.pth" in status["musiq"].reason
    assert not status["lpips"].available and "alexnet-owt-7be5be79.pth" in status["lpips"].reason
    assert not status["clipiqa"].available and "RN50.pt" in status["clipiqa"].reason
    assert not status["maniqa"].available and "ckpt_koniq10k.pt" in status["maniqa"].reason
    assert status["niqe"].available and status["psnr"].available


def test_weights_folder_is_used(empty_caches, monkeypatch, photo):
    """A checkpoint under pyiqa's file name in $TIR_IQA_WEIGHTS is found and loaded strictly.
    (Random weights, saved as pyiqa's release files are: the point is the loading path.)"""
    torch.manual_seed(0)
    reference_net = pyiqa.create_metric("musiq", pretrained=False, device="cpu")
    weights = empty_caches / "weights"
    weights.mkdir()
    torch.save({"params": reference_net.net.state_dict()}, weights / "musiq_koniq_ckpt-e95806b9.pth")
    monkeypatch.setenv("TIR_IQA_WEIGHTS", str(weights))

    assert scorers.available_metrics()["musiq"].available
    scorer = get_scorer("musiq", "cpu")
    assert not scorer.full_reference and not scorer.lower_better
    got = scorer.score([photo])
    with torch.no_grad():
        expected = reference_net(torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 255)
    np.testing.assert_allclose(got, expected.reshape(-1).numpy(), rtol=1e-5)


def test_no_reference_metrics_score_large_images_on_a_bounded_centre_crop():
    from tool_pool.scorers import NR_MAX_PIXELS, bounded_view, get_scorer

    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, (1500, 1000, 3), dtype=np.uint8)
    view = bounded_view(big)
    assert view.shape[0] * view.shape[1] <= NR_MAX_PIXELS and view.base is None  # a compact copy
    assert abs(view.shape[0] / view.shape[1] - 1.5) < 0.01  # the aspect kept
    top, left = (1500 - view.shape[0]) // 2, (1000 - view.shape[1]) // 2
    assert np.array_equal(view, big[top : top + view.shape[0], left : left + view.shape[1]])
    small = big[:200, :300]
    assert bounded_view(small) is small
    assert bounded_view(big[:4000, :5], max_pixels=100, min_side=5).shape == (20, 5, 3)
    niqe = get_scorer("niqe")
    assert niqe.score([big])[0] == pytest.approx(niqe.score([view])[0])
