"""A classical ISP: what a plain camera pipeline makes of the mosaic, the floor PyNET should beat.

Black level, bilinear demosaic, gray-world white balance, sRGB gamma; no colour matrix,
denoising or tone curve. evaluate_accuracy.py model=baseline scores it; the quick start shows
it beside PyNET. (unprocess.py runs a pipeline of this kind backwards.)
"""

import numpy as np
from scipy import ndimage

import camera


def bilinear_demosaic(mosaic):
    """Bilinear demosaic of one mosaic of camera.CFA, H x W -> H x W x 3. Each colour is
    its samples convolved with the bilinear kernel; borders are mirrored, which keeps the
    colour pattern's phase."""
    mosaic = np.asarray(mosaic, np.float64)
    colours = camera.site_colours(*mosaic.shape)
    red_blue = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]]) / 4.0
    green = np.array([[0, 1, 0], [1, 4, 1], [0, 1, 0]]) / 4.0
    planes = [ndimage.convolve(mosaic * (colours == colour), kernel, mode="mirror")
              for colour, kernel in enumerate((red_blue, green, red_blue))]
    return np.stack(planes, axis=-1)


def srgb_gamma(linear):
    """The sRGB transfer function of linear values in [0, 1]."""
    linear = np.clip(linear, 0.0, 1.0)
    return np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * np.power(linear, 1 / 2.4) - 0.055)


def baseline_isp(packed, black_level=camera.BLACK_LEVEL, white_level=camera.WHITE_LEVEL):
    """A classical ISP on packed inputs (B, h, w, 4) -> (B, 2h, 2w, 3) float32 in [0, 1]:
    black level, bilinear demosaic, gray-world white balance (R and B means scaled to G's),
    sRGB gamma. No colour matrix, denoising or tone curve: the floor PyNET should beat."""
    outputs = []
    for mosaic in camera.mosaic_from_packed(packed):
        linear = bilinear_demosaic((mosaic - black_level) / (white_level - black_level))
        means = np.maximum(linear.reshape(-1, 3).mean(axis=0), 1e-8)
        outputs.append(srgb_gamma(linear * (means[1] / means)))
    return np.stack(outputs).astype(np.float32)
