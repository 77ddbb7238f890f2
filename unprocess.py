"""A camera pipeline run backwards: an sRGB photograph into the RAW mosaic a phone would have
recorded, after Brooks et al., "Unprocessing Images for Learned Raw Denoising" (CVPR 2019).

Priors chosen for a phone sensor: inverse smoothstep tone curve, inverse gamma 2.2, a random
sRGB -> camera colour matrix, inverse white balance and exposure (highlights protected), the
mosaic of camera.CFA, optional shot/read noise, then code values over the sensor's black level
(camera.py). make_sample_dataset.py builds the synthetic sample with it; process.py is the
forward pipeline the baseline scores.
"""

import numpy as np

import camera

# Camera -> linear sRGB colour matrices (rows sum to 1) with the strong off-diagonal terms typical
# of small phone sensors (diagonal 1.45-2.0). Plausible, not measured on a particular camera;
# a random convex combination of them is inverted to get the sRGB -> camera matrix.
CAM_TO_RGB = np.array([
    [[1.70, -0.55, -0.15], [-0.25, 1.55, -0.30], [0.00, -0.60, 1.60]],
    [[1.85, -0.70, -0.15], [-0.20, 1.45, -0.25], [0.05, -0.75, 1.70]],
    [[1.55, -0.45, -0.10], [-0.30, 1.70, -0.40], [-0.05, -0.45, 1.50]],
    [[2.00, -0.85, -0.15], [-0.30, 1.60, -0.30], [0.00, -0.55, 1.55]],
])


def inverse_smoothstep(image):
    """Inverse of the global tone curve y = 3x^2 - 2x^3 on [0, 1]."""
    image = np.clip(image, 0.0, 1.0)
    return 0.5 - np.sin(np.arcsin(1.0 - 2.0 * image) / 3.0)


def gamma_expand(image, gamma=2.2):
    """Inverse of the display gamma y = x^(1/gamma)."""
    return np.maximum(image, 1e-8) ** gamma


_LINEARIZE = gamma_expand(inverse_smoothstep(np.arange(256) / 255.0)).astype(np.float32)


def random_rgb_to_cam(rs):
    """A random sRGB -> camera matrix: inverse of a random convex mix of CAM_TO_RGB, rows summing to 1."""
    weights = rs.uniform(1e-8, 1.0, len(CAM_TO_RGB))
    cam_to_rgb = np.tensordot(weights / weights.sum(), CAM_TO_RGB, axes=1)
    rgb_to_cam = np.linalg.inv(cam_to_rgb)
    return rgb_to_cam / rgb_to_cam.sum(axis=1, keepdims=True)


def apply_matrix(image, matrix):
    return image @ np.asarray(matrix, dtype=image.dtype).T


def random_gains(rs):
    """White-balance gains of a phone sensor in daylight, and an exposure factor (Brooks et al.'s
    ranges, slightly widened): red 1.7-2.4, blue 1.4-2.0, exposure N(0.8, 0.1) in [0.5, 1]."""
    return rs.uniform(1.7, 2.4), rs.uniform(1.4, 2.0), float(np.clip(rs.normal(0.8, 0.1), 0.5, 1.0))


def invert_gains(image, red_gain, blue_gain, exposure):
    """Divide by the white-balance gains and scale by ``exposure``, blending the factor towards 1
    for the brightest pixels (grey level above 0.9) so that highlights are not pushed below the
    point where the forward gains would saturate them (Brooks et al.'s highlight protection)."""
    factors = (exposure * np.array([1.0 / red_gain, 1.0, 1.0 / blue_gain])).astype(image.dtype)
    grey = image.mean(axis=-1, keepdims=True)
    inflection = 0.9
    mask = np.square(np.maximum(grey - inflection, 0.0) / (1.0 - inflection))
    safe = np.maximum(mask + (1.0 - mask) * factors, factors)
    return image * safe


def random_noise_levels(rs):
    """Shot and read noise variances (Brooks et al.'s log-linear relation), daylight phone range."""
    log_shot = rs.uniform(np.log(1e-4), np.log(4e-3))
    log_read = 2.18 * log_shot + 1.20 + rs.normal(0.0, 0.26)
    return float(np.exp(log_shot)), float(np.exp(log_read))


def add_noise(mosaic, rs, shot, read):
    variance = np.maximum(mosaic, 0.0) * np.float32(shot) + np.float32(read)
    return mosaic + rs.standard_normal(mosaic.shape).astype(np.float32) * np.sqrt(variance)


def to_code_values(mosaic, black_level=camera.BLACK_LEVEL, white_level=camera.WHITE_LEVEL):
    """Linear [0, 1] -> integer code values black..white (noise may fall below black), uint16."""
    codes = np.floor(black_level + mosaic * (white_level - black_level) + 0.5)
    return np.clip(codes, 0, white_level).astype(np.uint16)


def unprocess(photo, rs, noise=True, black_level=camera.BLACK_LEVEL):
    """An sRGB uint8 photo (H x W x 3, H and W even) -> (the sensor's mosaic, uint16 code values;
    the parameters drawn)."""
    image = _LINEARIZE[photo]  # inverse tone curve and inverse gamma, tabulated for the 256 uint8 values
    rgb_to_cam = random_rgb_to_cam(rs)
    image = np.clip(apply_matrix(image, rgb_to_cam), 0.0, 1.0)
    red_gain, blue_gain, exposure = random_gains(rs)
    image = np.clip(invert_gains(image, red_gain, blue_gain, exposure), 0.0, 1.0)
    mosaic = camera.mosaic_from_rgb(image)
    params = {"red_gain": red_gain, "blue_gain": blue_gain, "exposure": exposure, "rgb_to_cam": rgb_to_cam}
    if noise:
        shot, read = random_noise_levels(rs)
        mosaic = add_noise(mosaic, rs, shot, read)
        params.update(shot_noise=shot, read_noise=read)
    return to_code_values(mosaic, black_level), params
