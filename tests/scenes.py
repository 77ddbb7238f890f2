"""Synthetic RAW/reference pairs whose geometry is known, for testing align.py.

A scene is a natural photograph (the reference camera's picture) and the phone's RAW mosaic
of the same scene: the photo seen through a known homography (mosaic pixel -> photo pixel,
the phone having another scale, rotation, perspective and field of view) plus a smooth
sub-pixel displacement field (what a homography cannot express: lens distortion), then
unprocessed into the sensor's mosaic by the project's own camera pipeline run backwards
(unprocess.py: random colour matrix, white balance and exposure, sensor noise; 10-bit RGGB,
black 64, white 1023, camera.py).

Coordinates are (x, y) = (column, row) with pixel centres at integers, as in align.py.
"""

import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import data

import camera
import unprocess as unprocessing

BLACK, WHITE = camera.BLACK_LEVEL, camera.WHITE_LEVEL

PHOTOS = {"astronaut": data.astronaut, "chelsea": data.chelsea, "coffee": data.coffee, "rocket": data.rocket,
          "motorcycle": lambda: data.stereo_motorcycle()[0]}


def photo(name):
    """Return one of scikit-image's bundled photographs as uint8 RGB."""
    return np.ascontiguousarray(PHOTOS[name]()[..., :3])


def homography(mosaic_shape, photo_shape, scale=0.7, angle=3.0, tilt=(1e-4, -5e-5), offset=(0.0, 0.0)):
    """Return the 3x3 map mosaic (x, y) -> photo (x, y): the mosaic's centre lands on the photo's
    centre plus ``offset``; ``scale`` is mosaic pixels per photo pixel, ``angle`` in degrees."""
    my, mx = (np.array(mosaic_shape[:2]) - 1) / 2
    py, px = (np.array(photo_shape[:2]) - 1) / 2
    to_origin = np.array([[1, 0, -mx], [0, 1, -my], [0, 0, 1.0]])
    perspective = np.array([[1, 0, 0], [0, 1, 0], [tilt[0], tilt[1], 1.0]])
    c, s = np.cos(np.radians(angle)) / scale, np.sin(np.radians(angle)) / scale
    similarity = np.array([[c, -s, px + offset[0]], [s, c, py + offset[1]], [0, 0, 1.0]])
    return similarity @ perspective @ to_origin


def apply(matrix, x, y):
    """Map coordinates by a 3x3 homography."""
    w = matrix[2, 0] * x + matrix[2, 1] * y + matrix[2, 2]
    return ((matrix[0, 0] * x + matrix[0, 1] * y + matrix[0, 2]) / w,
            (matrix[1, 0] * x + matrix[1, 1] * y + matrix[1, 2]) / w)


@dataclass
class Scene:
    mosaic: np.ndarray  # uint16 RGGB, black 64, white 1023
    reference: np.ndarray  # uint8 RGB, the photo as given to the engine
    photo: np.ndarray  # uint8 RGB, the photo before any JPEG round trip (the truth's source)
    homography: np.ndarray  # mosaic (x, y) -> photo (x, y), without the displacement field
    amplitude: float  # of the displacement field, mosaic pixels
    period: float  # of the displacement field, mosaic pixels
    shape: tuple  # the mosaic's
    _blurred: list = field(default=None, repr=False)

    def displacement(self, x, y):
        """Return the field (dx, dy) in mosaic pixels added before the homography."""
        return (self.amplitude * np.sin(2 * np.pi * y / self.period + 0.5),
                self.amplitude * np.cos(2 * np.pi * x / self.period + 1.0))

    def true_map(self, x, y):
        """Return where mosaic point (x, y) truly lies in the photo."""
        dx, dy = self.displacement(x, y)
        return apply(self.homography, x + dx, y + dy)

    def scale(self):
        """Photo pixels per mosaic pixel at the mosaic's centre (square root of the Jacobian's determinant)."""
        cy, cx = (np.array(self.shape) - 1) / 2
        x, y = apply(self.homography, np.array([cx, cx + 1, cx]), np.array([cy, cy, cy + 1]))
        return float(np.sqrt(abs((x[1] - x[0]) * (y[2] - y[0]) - (x[2] - x[0]) * (y[1] - y[0]))))

    def true_target(self, y0, x0, size):
        """Return the RGB the mosaic's sites of window (y0, x0, size) saw (uint8)."""
        if self._blurred is None:
            self._blurred = blurred(self.photo, self.scale())
        y, x = np.mgrid[y0:y0 + size, x0:x0 + size].astype(np.float64)
        return np.clip(np.rint(sample(self._blurred, *self.true_map(x, y))), 0, 255).astype(np.uint8)


def blurred(image, scale):
    """Return the photo's channels as a sensor of ``scale`` photo pixels per site sees them: a
    Gaussian of half a site (the site's area and a little lens blur)."""
    return [ndimage.gaussian_filter(image[..., c].astype(np.float64), 0.5 * scale) for c in range(3)]


def sample(channels, x, y):
    """Return float RGB of the channels at points (x, y) (cubic spline)."""
    return np.stack([ndimage.map_coordinates(c, [y, x], order=3, mode="nearest") for c in channels], axis=-1)


def to_mosaic(rgb, seed=0, exposure=None):
    """Return the sensor's RGGB mosaic (uint16 code values) of sRGB values in [0, 255] (float
    H x W x 3), through unprocess.unprocess with its random camera drawn from ``seed``;
    ``exposure`` (None, or an H x W array) scales the signal above black afterwards, the codes
    clipped at white as a sensor clips them (an overexposed area)."""
    photo = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    mosaic, _ = unprocessing.unprocess(photo, np.random.RandomState(seed), True, BLACK)
    if exposure is None:
        return mosaic
    signal = (mosaic.astype(np.float64) - BLACK) * exposure
    return np.clip(np.rint(BLACK + signal), 0, WHITE).astype(np.uint16)


def make_scene(name="coffee", mosaic_shape=(256, 352), scale=0.7, angle=3.0, tilt=(1e-4, -5e-5), offset=(0.0, 0.0),
               amplitude=0.3, period=None, paint=(), occluder=None, parallax=None, crop=None, jpeg=False,
               seed=0):
    """Build a Scene.

    paint: (y0, x0, size, kind) mosaic windows whose scene is repainted in the photo, so that
    both cameras see it: kind "flat" (uniform grey), "black" (the photo at 2% brightness) or
    "clipped" (uniform white, which the phone overexposes 1.5 times). occluder: (y0, x0, h, w,
    photo name), the middle of another photo pasted into the mosaic's scene only. parallax: (y0, x0, h,
    w, dy, dx), a mosaic rectangle seeing the scene moved by (dy, dx) mosaic pixels (an object
    nearer the phone). crop: (top, left, height, width), the part of the photo the reference
    camera saw (else all of it). jpeg: the reference goes through JPEG quality 95 and back."""
    image = photo(name).copy()
    matrix = homography(mosaic_shape, image.shape, scale, angle, tilt, offset)
    scene = Scene(None, None, image, matrix, amplitude, period or 0.7 * max(mosaic_shape), tuple(mosaic_shape))
    gain = np.ones(mosaic_shape)
    for y0, x0, size, kind in paint:
        _paint(image, scene, y0, x0, size, kind)
        if kind == "clipped":
            gain[y0:y0 + size, x0:x0 + size] *= 1.5
    y, x = np.mgrid[0:mosaic_shape[0], 0:mosaic_shape[1]].astype(np.float64)
    if parallax is not None:
        py, px, ph, pw, dy, dx = parallax
        y[py:py + ph, px:px + pw] += dy
        x[py:py + ph, px:px + pw] += dx
    rgb = sample(blurred(image, scene.scale()), *scene.true_map(x, y))
    if occluder is not None:
        oy, ox, oh, ow, other = occluder
        middle = photo(other)
        top, left = (middle.shape[0] - oh) // 2, (middle.shape[1] - ow) // 2
        rgb[oy:oy + oh, ox:ox + ow] = middle[top:top + oh, left:left + ow]
    scene.mosaic = to_mosaic(rgb, seed, gain)
    if crop is not None:
        top, left, height, width = crop
        scene.photo = image[top:top + height, left:left + width].copy()
        scene.homography = np.array([[1, 0, -left], [0, 1, -top], [0, 0, 1.0]]) @ matrix
    scene.reference = _jpeg(scene.photo) if jpeg else scene.photo
    return scene


def _paint(image, scene, y0, x0, size, kind):
    """Repaint the photo under mosaic window (y0, x0, size), with a 6-pixel margin."""
    xs, ys = scene.true_map(np.array([x0 - 6, x0 + size + 6] * 2, float), np.repeat([y0 - 6.0, y0 + size + 6], 2))
    cols = slice(max(0, int(xs.min())), int(np.ceil(xs.max())) + 1)
    rows = slice(max(0, int(ys.min())), int(np.ceil(ys.max())) + 1)
    if kind == "flat":
        image[rows, cols] = 128
    elif kind == "black":
        image[rows, cols] //= 50
    elif kind == "clipped":
        image[rows, cols] = 255
    else:
        raise ValueError(kind)


def _jpeg(image, quality=95):
    """Return ``image`` after a JPEG round trip through Pillow."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
