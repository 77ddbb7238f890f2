"""evaluate_accuracy.py: the metrics against scikit-image and NumPy, the baseline ISP, the CLI."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import camera
import evaluate_accuracy as ev
import process
from camera import extract_bayer_channels
from helpers import ROOT
from images import to_uint
from load_dataset import load_target

# ---------------------------------------------------------------------------------------
# independent references

def sk_psnr(enhanced, target):
    return peak_signal_noise_ratio(target.astype(np.float64), enhanced.astype(np.float64), data_range=1.0)


def sk_ssim(enhanced, target):
    # TF's SSIM: 11x11 Gaussian (sigma 1.5), population statistics, mean over the valid region
    return structural_similarity(target.astype(np.float64), enhanced.astype(np.float64), data_range=1.0,
                                 channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)


MS_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def np_ms_ssim(enhanced, target):
    """5-scale MS-SSIM as tf.image.ssim_multiscale defines it (Wang et al. 2003 weights,
    11-tap Gaussian sigma 1.5, 2x2 average pooling, negative terms clamped at 0), in NumPy;
    for even sizes at every scale."""
    taps = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5 ** 2))
    taps /= taps.sum()

    def blur(a):
        return ndimage.correlate1d(ndimage.correlate1d(a, taps, axis=0), taps, axis=1)[5:-5, 5:-5]

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    per_channel = []
    for c in range(3):
        x, y = enhanced[..., c].astype(np.float64), target[..., c].astype(np.float64)
        terms = []
        for scale in range(5):
            if scale:
                x = x.reshape(x.shape[0] // 2, 2, x.shape[1] // 2, 2).mean(axis=(1, 3))
                y = y.reshape(y.shape[0] // 2, 2, y.shape[1] // 2, 2).mean(axis=(1, 3))
            mx, my = blur(x), blur(y)
            luminance = (2 * mx * my + c1) / (mx ** 2 + my ** 2 + c1)
            cs = (2 * blur(x * y) - 2 * mx * my + c2) / (blur(x * x + y * y) - mx ** 2 - my ** 2 + c2)
            terms.append(max(cs.mean(), 0.0) if scale < 4 else max((luminance * cs).mean(), 0.0))
        per_channel.append(np.prod(np.power(terms, MS_WEIGHTS)))
    return float(np.mean(per_channel))


def noisy_pairs(rng, count, side):
    target = ndimage.uniform_filter(rng.uniform(0, 1, (count, side, side, 3)), size=(1, 5, 5, 1))
    enhanced = target + rng.normal(0, 0.05, target.shape)   # unclipped, as the network's output can be
    return np.clip(enhanced, -0.08, 1.08).astype(np.float32), target.astype(np.float32)


# ---------------------------------------------------------------------------------------
# metrics

def test_psnr_and_ssim_equal_scikit_image_per_image():
    enhanced, target = noisy_pairs(np.random.default_rng(0), 3, 64)
    scores = ev.image_metrics(enhanced, target)
    for i in range(3):
        assert scores["psnr"][i] == pytest.approx(sk_psnr(enhanced[i], target[i]), abs=1e-4)
        assert scores["ssim"][i] == pytest.approx(sk_ssim(enhanced[i], target[i]), abs=1e-4)
    assert scores["ms_ssim"] is None  # 64 px: too small for 5 scales
    assert len(set(np.round(scores["psnr"], 3))) == 3  # per image, not one batch value


def test_ms_ssim_equals_an_independent_implementation():
    enhanced, target = noisy_pairs(np.random.default_rng(1), 2, 176)
    scores = ev.image_metrics(enhanced, target)
    for i in range(2):
        assert scores["ms_ssim"][i] == pytest.approx(np_ms_ssim(enhanced[i], target[i]), abs=2e-4)
    assert ev.image_metrics(target, target)["ms_ssim"] == pytest.approx([1.0, 1.0], abs=1e-5)


def test_8bit_metrics_score_the_clipped_rounded_picture():
    enhanced, target = noisy_pairs(np.random.default_rng(2), 2, 48)
    quantised = ev.quantise_8bit(enhanced)
    # what test_model.py saves (images.to_uint, clipping) and PIL reads back
    stored = np.stack([np.asarray(Image.fromarray(to_uint(e, 8))) for e in enhanced]).astype(np.float64) / 255
    np.testing.assert_allclose(quantised, stored, atol=1e-7)
    scores = ev.all_metrics(enhanced, target)
    for i in range(2):
        assert scores["psnr_8bit"][i] == pytest.approx(sk_psnr(stored[i], target[i]), abs=1e-4)
        assert scores["ssim_8bit"][i] == pytest.approx(sk_ssim(stored[i], target[i]), abs=1e-4)
        assert scores["psnr"][i] == pytest.approx(sk_psnr(enhanced[i], target[i]), abs=1e-4)
    assert not np.allclose(scores["psnr"], scores["psnr_8bit"])


# ---------------------------------------------------------------------------------------
# align=true: a target not pixel-aligned with the output

SHIFTS = ((0.4, -0.7), (-1.3, 0.25))  # (dy, dx) by which each target's content is moved


def shifted_pairs(rng, side=96, pad=16):
    """Outputs (a smooth picture with a little noise) and targets that are the same pictures
    moved by SHIFTS, both sampled from one larger picture (no border invented); and the
    pictures unmoved, the ideal targets."""
    outputs, targets, ideals = [], [], []
    for dy, dx in SHIFTS:
        big = ndimage.gaussian_filter(rng.uniform(0, 1, (side + 2 * pad,) * 2 + (3,)), (2, 2, 0))
        big = (big - big.min()) / (big.max() - big.min())
        yy, xx = np.mgrid[pad:pad + side, pad:pad + side].astype(np.float64)
        targets.append(np.stack([ndimage.map_coordinates(big[..., c], [yy - dy, xx - dx], order=3)
                                 for c in range(3)], -1))
        ideals.append(big[pad:pad + side, pad:pad + side])
        outputs.append(ideals[-1] + rng.normal(0, 0.02, ideals[-1].shape))
    return [np.asarray(a, np.float32) for a in (outputs, targets, ideals)]


def test_align_moves_each_target_onto_its_output():
    outputs, targets, ideals = shifted_pairs(np.random.default_rng(5))
    plain = ev.evaluate(lambda x: x, [(outputs, targets)], progress=False)
    aligned = ev.evaluate(lambda x: x, [(outputs, targets)], progress=False, align=True)
    np.testing.assert_allclose(aligned["shift"], -np.array(SHIFTS), atol=0.05)
    for i, (dy, dx) in enumerate(SHIFTS):
        b = int(np.ceil(max(abs(dy), abs(dx))))
        inside = (slice(b, -b), slice(b, -b))
        # independently: the known shift undone, the same border cropped, scikit-image's metrics
        undone = ndimage.shift(targets[i].astype(np.float64), (-dy, -dx, 0), order=3, mode="nearest")
        expected = sk_psnr(outputs[i][inside], undone[inside])
        ideal = sk_psnr(outputs[i][inside], ideals[i][inside])
        print(f"shift {dy, dx}: PSNR {plain['psnr'][i]:.2f} dB as given, {aligned['psnr'][i]:.2f} aligned, "
              f"{expected:.2f} with the known shift undone, {ideal:.2f} unshifted")
        assert aligned["psnr"][i] == pytest.approx(expected, abs=0.1)
        assert aligned["ssim"][i] == pytest.approx(sk_ssim(outputs[i][inside], undone[inside]), abs=2e-3)
        assert aligned["psnr"][i] > plain["psnr"][i] + 3
        assert abs(aligned["psnr"][i] - ideal) < 0.5
    lengths = np.hypot(*np.array(SHIFTS).T)
    assert f"shift mean {lengths.mean():.2f} px, largest {lengths.max():.2f} px" in ev.summary(aligned)


def test_default_scoring_is_unchanged_by_the_align_option():
    outputs, targets, _ = shifted_pairs(np.random.default_rng(6))
    plain = ev.evaluate(lambda x: x, [(outputs, targets)], progress=False)
    assert "shift" not in plain and "align" not in ev.summary(plain)
    direct = ev.all_metrics(outputs, targets)
    for name in ("psnr", "ssim", "psnr_8bit"):
        np.testing.assert_array_equal(plain[name], direct[name])
    assert ev.parse_arguments([])["align"] is False and ev.parse_arguments(["align=true"])["align"] is True


def test_a_shift_too_large_to_be_misalignment_is_left_alone():
    """96-pixel pictures moved by 20 pixels (beyond 96 / 8): a mismatch, scored as given."""
    outputs, _, _ = shifted_pairs(np.random.default_rng(7))
    far = np.roll(outputs, 20, axis=1)
    swapped = ev.evaluate(lambda x: x, [(outputs, far)], progress=False, align=True)
    plain = ev.evaluate(lambda x: x, [(outputs, far)], progress=False)
    assert np.isnan(swapped["shift"]).all()
    np.testing.assert_allclose(swapped["psnr"], plain["psnr"], atol=1e-5)
    assert "no patch moved; 2 patch(es) left unaligned" in ev.summary(swapped)


# ---------------------------------------------------------------------------------------
# the classical baseline

def test_packed_input_goes_back_to_the_mosaic():
    mosaic = np.random.default_rng(3).integers(0, 1024, (8, 12)).astype(np.uint16)
    back = camera.mosaic_from_packed(extract_bayer_channels(mosaic)[None])[0]
    np.testing.assert_allclose(back, mosaic, atol=1e-9)


def test_bilinear_demosaic_is_exact_on_a_ramp_inside_the_frame():
    rows, cols = np.indices((20, 24), dtype=np.float64)
    planes = [3 + 2 * rows + 0.5 * cols, 10 - rows + 4 * cols, 1 + 0.25 * rows - 0.75 * cols]  # R, G, B
    mosaic = np.where((rows % 2 == 0) & (cols % 2 == 0), planes[0],
                      np.where((rows % 2) != (cols % 2), planes[1], planes[2]))
    rgb = process.bilinear_demosaic(mosaic)
    for c in range(3):
        np.testing.assert_allclose(rgb[2:-2, 2:-2, c], planes[c][2:-2, 2:-2], atol=1e-9)
        # samples of a colour are kept where the mosaic has them, border included
    np.testing.assert_array_equal(rgb[0::2, 0::2, 0], planes[0][0::2, 0::2])
    np.testing.assert_array_equal(rgb[1::2, 1::2, 2], planes[2][1::2, 1::2])


def test_baseline_turns_a_flat_colour_into_flat_gray_with_srgb_gamma():
    black, red, green, blue = 64, 700, 400, 250
    mosaic = np.full((16, 16), green, np.uint16)
    mosaic[0::2, 0::2], mosaic[1::2, 1::2] = red, blue
    out = process.baseline_isp(extract_bayer_channels(mosaic)[None], black_level=black)[0]
    linear = (green - black) / (1023 - black)     # gray world maps every channel to green's level
    expected = 1.055 * linear ** (1 / 2.4) - 0.055  # sRGB, above the linear toe
    assert out.shape == (16, 16, 3)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert process.srgb_gamma(np.array([0.18, 0.002]))[0] == pytest.approx(0.46135612950044164, abs=1e-9)
    assert process.srgb_gamma(np.array([0.002]))[0] == pytest.approx(12.92 * 0.002)


# ---------------------------------------------------------------------------------------
# end to end on a small dataset

@pytest.fixture(scope="module")
def small_dataset(module_tmp):
    """test/huawei_raw/{i}.png (448x448 10-bit RGGB mosaics of a smooth colour image) and
    test/canon/{i}.jpg (the image itself)."""
    root = module_tmp("zrr")
    rng = np.random.default_rng(4)
    for folder in ("huawei_raw", "canon"):
        (root / "test" / folder).mkdir(parents=True)
    for i in range(3):
        image = ndimage.gaussian_filter(rng.uniform(0, 1, (448, 448, 3)), sigma=(2, 2, 0))
        image = np.clip((image - image.min()) / (image.max() - image.min()), 0, 1)
        linear = image ** 2.2 * rng.uniform(0.5, 1.0, 3)
        mosaic = np.where((np.indices((448, 448))[0] % 2 == 0) & (np.indices((448, 448))[1] % 2 == 0),
                          linear[..., 0], np.where(np.indices((448, 448)).sum(0) % 2 == 1, linear[..., 1],
                                                   linear[..., 2]))
        Image.fromarray((64 + mosaic * 950).astype(np.uint16)).save(root / "test" / "huawei_raw" / f"{i}.png")
        Image.fromarray((image * 255).astype(np.uint8)).save(root / "test" / "canon" / f"{i}.jpg", quality=95)
    return root


def run_script(cwd, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "evaluate_accuracy.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_baseline_scores_match_scikit_image_on_the_same_pictures(small_dataset, tmp_path):
    result = run_script(small_dataset, "model=baseline", "dataset_dir=.", "batch_size=2", f"csv={tmp_path}/s.csv")
    assert result.returncode == 0, result.stderr
    psnrs, ssims = [], []
    for i in range(3):
        mosaic = np.asarray(Image.open(small_dataset / "test" / "huawei_raw" / f"{i}.png"))
        target = load_target(str(small_dataset / "test" / "canon" / f"{i}.jpg"), 0)  # the reference's targets
        out = process.baseline_isp(extract_bayer_channels(mosaic)[None])[0]
        psnrs.append(sk_psnr(out, target))
        ssims.append(sk_ssim(out, target))
    with open(tmp_path / "s.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["patch"] for r in rows] == ["0.png", "1.png", "2.png"]  # batch 2: the last patch is kept
    for row, psnr, ssim in zip(rows, psnrs, ssims):
        assert float(row["psnr"]) == pytest.approx(psnr, abs=1e-4)
        assert float(row["ssim"]) == pytest.approx(ssim, abs=1e-4)
        assert 0 < float(row["ms_ssim"]) <= 1
    assert f"PSNR: {np.mean([float(r['psnr']) for r in rows]):.4g}, MS-SSIM: " \
           f"{np.mean([float(r['ms_ssim']) for r in rows]):.4g}" in result.stdout
    assert psnrs[0] > 10  # the fixture's mosaics are that picture: the baseline gets it roughly right


@pytest.mark.slow
def test_pynet_level_is_scored_against_that_levels_target(full_model, small_dataset):
    import data_pipeline
    import load_dataset

    level = 3
    from model import level_model
    from render import level_function

    predict = level_function(full_model, level)
    dataset, log = data_pipeline.test_dataset(str(small_dataset), level, 2, drop_remainder=False, verbose=False)
    scores = ev.evaluate(predict, data_pipeline.batches(dataset, log), total=3, progress=False)
    assert len(scores["psnr"]) == 3 and scores["ms_ssim"] is None   # 56 x 56 targets
    view = level_model(full_model, level)    # level 3 alone: the whole pyramid would run level 0 too
    for i in range(3):
        raw, target = load_dataset.load_pair(str(small_dataset), "test", i, level)
        output = view(raw[None])[0].numpy()
        assert output.shape == target.shape == (56, 56, 3)
        assert scores["psnr"][i] == pytest.approx(sk_psnr(output, target), abs=1e-3)
        assert scores["ssim"][i] == pytest.approx(sk_ssim(output, target), abs=1e-3)
    assert "MS-SSIM: n/a" in ev.summary(scores, 56)


def test_cli_errors_are_one_line(small_dataset):
    result = run_script(small_dataset, "orig=true", "restore_iter=5")
    assert result.returncode == 2 and "leave out restore_iter" in result.stderr
    result = run_script(small_dataset, "model=baseline", "level=2")
    assert result.returncode == 2 and "level 0 (full resolution) only" in result.stderr
    result = run_script(small_dataset, "level=1", "orig=false")
    assert result.returncode == 1 and "no checkpoint pynet_level_1_iteration_*.ckpt" in result.stderr
    result = run_script(small_dataset, "dataset_dir=.")   # orig=true by default: the released weights
    assert result.returncode == 1
    assert "models/original/pynet_level_0.ckpt: the authors' released weights are not there" in result.stderr
    assert "Traceback" not in result.stderr
