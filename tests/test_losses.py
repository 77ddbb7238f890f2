"""losses.py against hand computations in NumPy (and scikit-image for SSIM)."""

import numpy as np
import pytest
import tensorflow as tf
from skimage.metrics import structural_similarity

import losses
import vgg as vgg_module
from helpers import np_vgg_relu5_4, random_vgg_weights


def pair(shape, seed, noise=0.1):
    rng = np.random.default_rng(seed)
    target = rng.uniform(0, 1, shape).astype(np.float32)
    # enhanced in the network's [-0.08, 1.08] output range, unclipped
    enhanced = np.clip(target + rng.normal(0, noise, shape), -0.08, 1.08).astype(np.float32)
    return enhanced, target


# ---------------------------------------------------------------------------------------
# NumPy SSIM / MS-SSIM as Wang et al. and tf.image define them: 11x11 Gaussian (sigma 1.5),
# 'valid' filtering, c1 = (0.01)^2, c2 = (0.03)^2, mean over the valid region then channels.

def gaussian_window(size=11, sigma=1.5):
    x = np.arange(size) - (size - 1) / 2.0
    g = np.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def filter_valid(img, window):  # img: H x W
    windows = np.lib.stride_tricks.sliding_window_view(img, window.shape)
    return np.einsum("hwij,ij->hw", windows, window)


def np_ssim_cs_channel(x, y):
    """(mean SSIM, mean contrast-structure) of one channel."""
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    w = gaussian_window()
    mu_x, mu_y = filter_valid(x, w), filter_valid(y, w)
    sxx = filter_valid(x * x, w) - mu_x ** 2
    syy = filter_valid(y * y, w) - mu_y ** 2
    sxy = filter_valid(x * y, w) - mu_x * mu_y
    lum = (2 * mu_x * mu_y + c1) / (mu_x ** 2 + mu_y ** 2 + c1)
    cs = (2 * sxy + c2) / (sxx + syy + c2)
    return (lum * cs).mean(), cs.mean()


def np_ssim(img1, img2):  # H x W x C
    return np.mean([np_ssim_cs_channel(img1[..., c].astype(np.float64), img2[..., c].astype(np.float64))[0]
                    for c in range(img1.shape[-1])])


def np_halve(img):
    """Pad odd sides by repeating the last row/column, then 2x2 average."""
    h, w = img.shape[:2]
    img = np.pad(img, ((0, h % 2), (0, w % 2), (0, 0)), mode="symmetric")
    return img.reshape(img.shape[0] // 2, 2, img.shape[1] // 2, 2, -1).mean(axis=(1, 3))


def np_ms_ssim(img1, img2, weights=(0.0448, 0.2856, 0.3001, 0.2363, 0.1333)):
    x, y = img1.astype(np.float64), img2.astype(np.float64)
    per_channel = np.ones(x.shape[-1])
    for scale, weight in enumerate(weights):
        if scale:
            x, y = np_halve(x), np_halve(y)
        for c in range(x.shape[-1]):
            s, cs = np_ssim_cs_channel(x[..., c], y[..., c])
            value = s if scale == len(weights) - 1 else cs
            per_channel[c] *= max(value, 0.0) ** weight
    return per_channel.mean()


# ---------------------------------------------------------------------------------------

def test_mse_and_psnr_by_hand():
    enhanced, target = pair((3, 8, 6, 3), seed=0)
    diff2 = (target.astype(np.float64) - enhanced) ** 2
    want_mse = diff2.sum() / (8 * 6 * 3 * 3)
    assert float(losses.mse(enhanced, target)) == pytest.approx(want_mse, rel=1e-5)
    assert float(losses.psnr(enhanced, target)) == pytest.approx(20 * np.log10(1 / np.sqrt(want_mse)), rel=1e-5)
    per_image = diff2.reshape(3, -1).mean(axis=1)
    np.testing.assert_allclose(losses.mse_per_image(enhanced, target).numpy(), per_image, rtol=1e-5)
    np.testing.assert_allclose(losses.psnr_per_image(enhanced, target).numpy(),
                               20 * np.log10(1 / np.sqrt(per_image)), rtol=1e-5)
    # the batch PSNR is not the mean of the per-image PSNRs
    assert abs(float(losses.psnr(enhanced, target)) - np.mean(20 * np.log10(1 / np.sqrt(per_image)))) > 1e-4


def test_ssim_against_numpy_and_skimage():
    enhanced, target = pair((2, 24, 20, 3), seed=1)
    got = losses.ssim_per_image(enhanced, target).numpy()
    for i in range(2):
        by_hand = np_ssim(enhanced[i], target[i])
        # scikit-image filters with 'reflect' borders and then drops a 5-pixel margin, which
        # leaves exactly TF's 'valid' region; its Gaussian (truncate 3.5 -> radius 5) is 11 wide.
        by_skimage = structural_similarity(
            enhanced[i].astype(np.float64), target[i].astype(np.float64), channel_axis=-1, data_range=1.0,
            gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        assert by_hand == pytest.approx(by_skimage, abs=1e-9)
        assert got[i] == pytest.approx(by_hand, abs=1e-4)
    assert float(losses.ssim(enhanced, target)) == pytest.approx(got.mean(), abs=1e-6)


def test_ms_ssim_against_numpy():
    # 176 x 168: the sides go 176-88-44-22-11 and 168-84-42-21-11, so the symmetric padding of
    # the odd 21 is exercised.
    enhanced, target = pair((2, 176, 168, 3), seed=2, noise=0.15)
    got = losses.ms_ssim_per_image(enhanced, target).numpy()
    want = [np_ms_ssim(enhanced[i], target[i]) for i in range(2)]
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert float(losses.ms_ssim(enhanced, target)) == pytest.approx(np.mean(want), abs=1e-4)


@pytest.mark.parametrize("side, ok", [(160, False), (161, True), (176, True), (448, True), (224, True), (112, False)])
def test_ms_ssim_size_limit_is_tf_s(side, ok):
    assert losses.ms_ssim_applicable(side, side) is ok
    x = tf.random.uniform((1, side, side, 3), seed=1)
    if ok:
        assert losses.ms_ssim(x, x * 0.9) is not None
    else:
        assert losses.ms_ssim(x, x * 0.9) is None
        with pytest.raises(tf.errors.InvalidArgumentError):  # what TF itself does at that size
            tf.image.ssim_multiscale(x, x * 0.9, 1.0)


def test_ms_ssim_limit_needs_both_sides():
    assert not losses.ms_ssim_applicable(448, 160)
    assert losses.ms_ssim_per_image(tf.zeros((1, 448, 160, 3)), tf.zeros((1, 448, 160, 3))) is None


# ---------------------------------------------------------------------------------------
# content loss

def stand_in_features(images):
    """A cheap differentiable stand-in for VGG: a fixed 2x2 average pool to 7 channels."""
    pooled = tf.nn.avg_pool2d(tf.cast(images, tf.float32) * 255.0, 2, 2, "VALID")
    return tf.concat([pooled, pooled ** 2 / 255.0, pooled[..., :1]], axis=-1)


def np_stand_in(images):
    x = images.astype(np.float64) * 255.0
    n, h, w, c = x.shape
    pooled = x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
    return np.concatenate([pooled, pooled ** 2 / 255.0, pooled[..., :1]], axis=-1)


def test_content_loss_formula():
    enhanced, target = pair((3, 8, 12, 3), seed=3)
    diff = np_stand_in(enhanced) - np_stand_in(target)
    h5, w5, c5 = diff.shape[1:]
    # 2 * l2_loss(diff) / (H5 * W5 * C * batch), l2_loss = sum(diff^2) / 2
    want = 2 * (np.sum(diff ** 2) / 2) / (h5 * w5 * c5 * 3)
    assert float(losses.content_loss(stand_in_features, enhanced, target)) == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(losses.content_per_image(stand_in_features, enhanced, target).numpy(),
                               (diff ** 2).reshape(3, -1).mean(axis=1), rtol=1e-5)


def test_content_loss_with_vgg19():
    weights = random_vgg_weights(seed=5)
    net = vgg_module.VGG19(weights)
    enhanced, target = pair((2, 16, 16, 3), seed=4, noise=0.2)
    diff = np_vgg_relu5_4(enhanced, weights) - np_vgg_relu5_4(target, weights)
    assert diff.shape == (2, 1, 1, 512)
    want = np.sum(diff ** 2) / (1 * 1 * 512 * 2)
    assert float(losses.content_loss(net, enhanced, target)) == pytest.approx(want, rel=1e-4)


# ---------------------------------------------------------------------------------------
# the loss of each level

# reference train_model.py lines 85-92, written out independently of losses.LEVEL_WEIGHTS
def hand_level_loss(level, enhanced, target):
    m = np.mean((target.astype(np.float64) - enhanced) ** 2)
    content = np.mean((np_stand_in(enhanced) - np_stand_in(target)) ** 2)
    s = np.mean([np_ssim(enhanced[i], target[i]) for i in range(len(enhanced))])
    return {
        5: 100 * m,
        4: 100 * m,
        3: 100 * m + content,
        2: 100 * m + content,
        1: 50 * m + content,
        0: 20 * m + content + 20 * (1 - s),
    }[level], m, content, s


@pytest.mark.parametrize("level", [5, 4, 3, 2, 1, 0])
def test_level_loss(level):
    enhanced, target = pair((2, 16, 14, 3), seed=10 + level)
    total, parts = losses.level_loss(level, enhanced, target, vgg=stand_in_features)
    want, m, content, s = hand_level_loss(level, enhanced, target)
    assert float(total) == pytest.approx(want, rel=1e-4)
    assert float(parts["mse"]) == pytest.approx(m, rel=1e-5)
    assert ("content" in parts) == (level <= 3)
    if level <= 3:
        assert float(parts["content"]) == pytest.approx(content, rel=1e-5)
    assert ("ssim" in parts) == (level == 0)
    if level == 0:
        assert float(parts["ssim"]) == pytest.approx(s, abs=1e-4)
    # the per-image losses average to the batch loss
    per_image, _ = losses.level_loss_per_image(level, enhanced, target, vgg=stand_in_features)
    assert per_image.shape == (2,)
    assert float(tf.reduce_mean(per_image)) == pytest.approx(float(total), rel=1e-5)


@pytest.mark.parametrize("level", [5, 3, 1, 0])
def test_mse_loss_is_the_mse_term_alone(level):
    enhanced, target = pair((2, 16, 14, 3), seed=20 + level)
    # no VGG needed: loss="mse" has no content term
    total, parts = losses.level_loss(level, enhanced, target, vgg=None, loss="mse")
    _, m, _, _ = hand_level_loss(level, enhanced, target)
    assert float(total) == pytest.approx(losses.LEVEL_WEIGHTS[level][0] * m, rel=1e-5)
    assert set(parts) == {"mse"}
    with pytest.raises(ValueError, match="loss must be one of"):
        losses.level_loss(level, enhanced, target, loss="ssim")


def test_levels_3_to_0_need_vgg_and_5_4_do_not():
    enhanced, target = pair((1, 8, 8, 3), seed=0)
    for level in (5, 4):
        losses.level_loss(level, enhanced, target, vgg=None)
    for level in (3, 2, 1, 0):
        with pytest.raises(ValueError, match="VGG"):
            losses.level_loss(level, enhanced, target, vgg=None)


def test_float16_inputs_give_float32_losses():
    enhanced, target = pair((2, 16, 16, 3), seed=6)
    total, parts = losses.level_loss(0, tf.cast(enhanced, tf.float16), target, vgg=stand_in_features)
    assert total.dtype == tf.float32 and all(v.dtype == tf.float32 for v in parts.values())


def test_gradient_flows_to_enhanced():
    enhanced, target = pair((2, 16, 16, 3), seed=7)
    x = tf.Variable(enhanced)
    for level in (5, 3, 0):
        with tf.GradientTape() as tape:
            total, _ = losses.level_loss(level, x, target, vgg=stand_in_features)
        grad = tape.gradient(total, x)
        assert grad is not None and float(tf.reduce_max(tf.abs(grad))) > 0
    # level 5: d(100 * mean((t - e)^2)) / de = -200 (t - e) / N
    with tf.GradientTape() as tape:
        total, _ = losses.level_loss(5, x, target)
    np.testing.assert_allclose(tape.gradient(total, x).numpy(),
                               -200 * (target - enhanced) / enhanced.size, rtol=1e-4, atol=1e-9)
