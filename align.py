"""Align a phone's RAW mosaic with a reference camera's photo of the same scene and cut
ZRR-style training pairs (PyNET, Ignatov et al., CVPRW 2020, section 2).

The procedure: a global homography from SIFT keypoints and RANSAC; a non-overlapping grid of
windows on the mosaic; each window's place on the reference refined by a sub-pixel shift and a
small rotation maximising the normalised cross-correlation (NCC) of luminances; the homography
refitted to the refined windows; windows that correlate below 0.9, whose parts disagree, or
that are flat, black or clipped dropped; the reference warped onto each kept window's sites.

Coordinates are (x, y) = (column, row) with pixel centres at integers; a homography maps
mosaic pixels to reference pixels. Luminance is compared per 2x2 Bayer cell (half the
mosaic's resolution): a cell's mean is a true luminance sample, with no demosaicking to invent
one per site, at a quarter of the cost, and sub-pixel fits there still resolve 0.1 mosaic pixel.

    result = align_scene(mosaic, reference, patch_size=448)
    for window in result.kept:
        save(window.raw, window.target)
"""

import contextlib
import itertools
import multiprocessing
import signal
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, sparse
from skimage import feature, measure, transform

import runtime

GAMMA = 2.2  # sRGB's tone, roughly: the linear RAW then looks like the JPEG to keypoints and NCC
WORK_SIZE = 1000  # long side of the keypoint images: the refit, not SIFT, brings sub-pixel accuracy
LOWE_RATIO = 0.8  # a match must beat the second best by this ratio (Lowe 2004)
RANSAC_PX = 1.5  # working pixels; SIFT positions are good to a few tenths of one
RANSAC_TRIALS = 2000
MIN_INLIERS = 15  # any 4 matches fit a homography; unrelated photos gave at most 5 here, real pairs 16-1300
SCALE_RANGE = (0.2, 8.0)  # reference pixels per mosaic pixel beyond which a fit is nonsense
MAX_SHIFT = 32  # mosaic pixels searched around the homography's prediction (lens distortion)
MAX_ANGLE = 1.0  # degrees of rotation a window may take (the paper's small rotations)
ANGLE_PRIOR = 0.1  # degrees: a homography leaves little rotation (radial distortion has none)
MAX_SPREAD = 1.0  # mosaic pixels the sub-blocks' shifts may disagree by (parallax, motion)
SUB_MIN_NCC = 0.5  # a textured sub-block correlating below this matches nothing: motion
SUB_ANCHOR = 0.01  # a sub-block's shift follows its texture where it is well above this (see _refine)
BLACK_MEAN = 0.01  # mean linear signal (of white - black) below which noise rules the window
SATURATED = 0.99  # a site at 99% of white - black or more is clipped
CLIPPED_SHARE = 0.02  # a few glints are harmless; more is a blown area the target shows and the RAW lacks
FLAT_GRADIENT = 0.004  # RMS luminance step per cell along the weakest direction: below it, no position
REFIT_MIN_WINDOWS = 6  # fewer cannot pin a homography across the frame
REFIT_OUTLIER = 2.0  # mosaic pixels off the refitted homography: a distorted or moving window
WORKERS = 2  # processes for keypoints and windows: the 2 cores of the target machine (1: this process only)

_SCENES = {}  # the arrays of the scenes being aligned, by key: forked workers inherit them uncopied
_KEYS = itertools.count()


class AlignmentFailed(Exception):
    """The pair does not match: no homography relates the two pictures."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


STATUSES = ("kept", "outside", "black", "clipped", "flat", "ncc", "parallax")  # a window's fate


@dataclass
class Window:
    y: int  # top-left in the mosaic, even
    x: int
    status: str = "kept"  # or outside, black, clipped, flat, ncc, parallax
    shift: tuple = (0.0, 0.0)  # (dy, dx) mosaic pixels, applied before the scene's homography
    angle: float = 0.0  # degrees, about the window's centre
    ncc: float = float("nan")
    spread: float = float("nan")  # mosaic pixels the sub-blocks disagree by
    raw: np.ndarray = None  # mosaic[y:y+P, x:x+P], uint16, kept windows only
    target: np.ndarray = None  # P x P x 3 uint8, the reference on the window's sites


@dataclass
class SceneResult:
    homography: np.ndarray  # 3x3, mosaic (x, y) -> reference (x, y)
    matches: int  # keypoint matches
    inliers: int  # of them consistent with one homography (RANSAC)
    residual: float  # RMS reprojection of the inliers through the homography, mosaic pixels
    windows: list
    patch_size: int

    @property
    def kept(self):
        return [w for w in self.windows if w.status == "kept"]

    def window_homography(self, window):
        """Return the 3x3 map of the window's mosaic pixels to the reference, refinement included."""
        return self.homography @ _rigid(_centre(window, self.patch_size), window.shift, np.radians(window.angle))


def align_scene(mosaic, reference, patch_size=448, min_ncc=0.9, black_level=64, white_level=1023,
                max_shift=MAX_SHIFT, workers=WORKERS, seed=0):
    """Align one scene and cut its windows; raise AlignmentFailed if the pictures do not match.

    ``workers`` > 1 detects keypoints and refines windows in that many forked processes (1: all in
    this one); they read the arrays they inherit, so nothing large is copied."""
    mosaic, reference = np.asarray(mosaic), np.asarray(reference)
    if mosaic.ndim != 2 or mosaic.shape[0] % 2 or mosaic.shape[1] % 2:
        raise ValueError(f"mosaic: expected a 2-D RGGB mosaic of even sides, got shape {mosaic.shape}")
    if reference.ndim != 3 or reference.shape[2] != 3 or reference.dtype != np.uint8:
        raise ValueError(f"reference: expected uint8 H x W x 3, got {reference.dtype} {reference.shape}")
    if patch_size < 16 or patch_size % 4:
        raise ValueError(f"patch_size={patch_size}: expected a multiple of 4 from 16")
    mosaic_lum = mosaic_luminance(mosaic, black_level, white_level)
    reference_lum = reference_luminance(reference)
    key = next(_KEYS)
    _SCENES[key] = _Scene(mosaic, reference, mosaic_lum, reference_lum, patch_size, min_ncc, max_shift)
    try:
        with _workers(workers) as run:
            start, src, dst, matches = global_homography(mosaic_lum, reference_lum, seed, run)
            windows = [Window(y, x) for y, x in _grid(mosaic.shape, patch_size)]
            for w in windows:
                w.status = _screen(w, mosaic, mosaic_lum, reference.shape, start, patch_size, black_level,
                                   white_level)
            todo = run(_first_pass, [(key, w, start) for w in windows if w.status == "kept"])
            homography = _refit(start, [w for w in todo if w.status == "kept"], patch_size)
            done = run(_second_pass, [(key, w, start, homography) for w in todo if w.status == "kept"])
    finally:
        del _SCENES[key]
    for w in todo:
        if w.status == "ncc":  # dropped by the first pass: its shift against the final homography
            w.shift = _rebase(w, start, homography, patch_size)
    refined = {(w.y, w.x): w for w in todo + done}
    windows = [refined.get((w.y, w.x), w) for w in windows]
    back_x, back_y = _map(np.linalg.inv(homography), dst[:, 0], dst[:, 1])
    residual = np.sqrt(np.mean((back_x - src[:, 0]) ** 2 + (back_y - src[:, 1]) ** 2))
    return SceneResult(homography, matches, len(src), float(residual), windows, patch_size)


@dataclass
class _Scene:
    """What the window workers read."""
    mosaic: np.ndarray
    reference: np.ndarray
    mosaic_lum: np.ndarray
    reference_lum: np.ndarray  # linear
    size: int
    min_ncc: float
    max_shift: int


@contextlib.contextmanager
def _workers(count):
    """Yield a starmap running on ``count`` forked processes, or in this one if ``count`` is 1.

    Never forked from a process where TensorFlow runs: a fork copies a lock that one of its
    pool threads holds, locked forever in the child; there the work stays in this process
    (make_dataset.py aligns in a helper process that never imports TensorFlow)."""
    if count <= 1 or "fork" not in multiprocessing.get_all_start_methods() or runtime.tensorflow_running():
        yield _in_process  # Windows cannot fork
        return
    with multiprocessing.get_context("fork").Pool(count, initializer=_worker_signals) as pool:
        yield pool.starmap


def _worker_signals():
    """Ctrl-C reaches the whole process group: the parent decides, and its pool's terminate()
    (SIGTERM) ends a worker without a traceback, even where the parent handles SIGTERM."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _in_process(function, tasks):
    """Return [function(*task) for task in tasks]."""
    return [function(*task) for task in tasks]


# ---------------------------------------------------------------------------------------
# luminance, resampling, geometry

def mosaic_luminance(mosaic, black_level=64, white_level=1023):
    """Return the gamma-encoded luminance of each 2x2 Bayer cell (float32, half resolution)."""
    h, w = mosaic.shape
    cells = mosaic.reshape(h // 2, 2, w // 2, 2).sum(axis=(1, 3), dtype=np.float32)
    linear = (cells / 4 - black_level) / (white_level - black_level)
    return np.clip(linear, 0, 1, out=linear) ** np.float32(1 / GAMMA)


def reference_luminance(reference):
    """Return the reference's linear luminance, weighted as a Bayer cell (R + 2G + B) / 4 (float32)."""
    lut = ((np.arange(256) / 255.0) ** GAMMA / 4).astype(np.float32)
    lum = lut[reference[..., 0]]
    lum += (2 * lut)[reference[..., 1]]
    lum += lut[reference[..., 2]]
    return lum


def area_resize(image, factor):
    """Shrink an image (H x W or H x W x C) by ``factor`` >= 1, averaging exact box areas (float32)."""
    image = np.asarray(image, dtype=np.float32)
    if factor <= 1:
        return image
    rows, cols = _box_matrix(image.shape[0], factor), _box_matrix(image.shape[1], factor)
    planes = [image] if image.ndim == 2 else [image[..., c] for c in range(image.shape[2])]
    out = [rows @ (cols @ plane.T).T for plane in planes]
    return out[0] if image.ndim == 2 else np.stack(out, axis=-1)


def _box_matrix(n, factor):
    """Return the sparse (n // factor) x n matrix averaging boxes of ``factor`` samples."""
    m = max(1, int(n / factor))
    start, end = np.arange(m) * factor, np.arange(1, m + 1) * factor
    rows, cols, weights = [], [], []
    for k in range(int(np.ceil(factor)) + 1):
        i = np.floor(start).astype(int) + k
        overlap = np.minimum(i + 1, end) - np.maximum(i, start)
        ok = (overlap > 1e-9) & (i < n)
        rows.append(np.arange(m)[ok]), cols.append(i[ok]), weights.append(overlap[ok] / factor)
    data = np.concatenate(weights).astype(np.float32)
    return sparse.csr_matrix((data, (np.concatenate(rows), np.concatenate(cols))), shape=(m, n))


def _shrunk(x, origin, factor):
    """Return full-image coordinates in a crop at ``origin`` shrunk by ``factor`` (area_resize)."""
    return (x - origin + 0.5) / factor - 0.5 if factor > 1 else x - origin


def _map(matrix, x, y):
    """Map coordinate arrays by a 3x3 homography."""
    (a, b, c), (d, e, f), (g, h, i) = matrix
    w = g * x + h * y + i
    return (a * x + b * y + c) / w, (d * x + e * y + f) / w


def _local_scale(matrix, x, y):
    """Return the homography's area scale (square root of its Jacobian's determinant) at (x, y), or -1 if it mirrors."""
    px, py = _map(matrix, np.array([x, x + 1, x]), np.array([y, y, y + 1]))
    det = (px[1] - px[0]) * (py[2] - py[0]) - (px[2] - px[0]) * (py[1] - py[0])
    return np.sqrt(det) if det > 0 else -1.0


def _scaling(factor):
    """Return the 3x3 map from an image shrunk by ``factor`` to the full image's pixels."""
    return np.array([[factor, 0, (factor - 1) / 2], [0, factor, (factor - 1) / 2], [0, 0, 1.0]])


def _rigid(centre, shift, angle):
    """Return the 3x3 shift (dy, dx) and rotation (radians) about ``centre`` (x, y)."""
    c, s = np.cos(angle), np.sin(angle)
    (cx, cy), (dy, dx) = centre, shift
    return np.array([[c, -s, cx - c * cx + s * cy + dx], [s, c, cy - s * cx - c * cy + dy], [0, 0, 1.0]])


# ---------------------------------------------------------------------------------------
# global alignment

def global_homography(mosaic_lum, reference_lum, seed=0, run=None):
    """Return (homography, inlier mosaic points, inlier reference points, matches) from SIFT.

    ``run``, a starmap, may detect the two images' keypoints at once (see _workers)."""
    f_mosaic = max(1.0, max(mosaic_lum.shape) / WORK_SIZE)
    f_reference = max(1.0, max(reference_lum.shape) / WORK_SIZE)
    images = [area_resize(mosaic_lum, f_mosaic), area_resize(reference_lum, f_reference) ** np.float32(1 / GAMMA)]
    run = run or _in_process
    (points_m, descriptors_m), (points_r, descriptors_r) = run(_keypoints, [(image,) for image in images])
    pairs = np.zeros((0, 2), int)
    if len(points_m) and len(points_r):
        pairs = feature.match_descriptors(descriptors_m, descriptors_r, cross_check=True, max_ratio=LOWE_RATIO)
    src, dst = points_m[pairs[:, 0]], points_r[pairs[:, 1]]
    model, inliers = None, np.zeros(len(pairs), bool)
    if len(pairs) >= MIN_INLIERS:
        model, inliers = measure.ransac((src, dst), transform.ProjectiveTransform, min_samples=4,
                                        residual_threshold=RANSAC_PX, max_trials=RANSAC_TRIALS, rng=seed)
    count = int(inliers.sum()) if model is not None else 0
    if count < MIN_INLIERS:
        raise AlignmentFailed(f"{len(pairs)} keypoint matches, {count} consistent with one homography "
                              f"(at least {MIN_INLIERS} needed): the pictures do not show the same scene")
    # working pixels -> full ones: the mosaic's working image is its cells' luminance shrunk
    to_mosaic, to_reference = _scaling(2 * f_mosaic), _scaling(f_reference)
    homography = to_reference @ model.params @ np.linalg.inv(to_mosaic)
    scale = _local_scale(homography, mosaic_lum.shape[1] - 0.5, mosaic_lum.shape[0] - 0.5)
    if not SCALE_RANGE[0] <= scale <= SCALE_RANGE[1]:
        raise AlignmentFailed(f"{count} inliers give an implausible scale of {scale:.3g} reference pixels per "
                              "mosaic pixel (or a mirror image)")
    src, dst = src[inliers], dst[inliers]
    return homography, np.stack(_map(to_mosaic, *src.T), 1), np.stack(_map(to_reference, *dst.T), 1), len(pairs)


def _keypoints(image):
    """Return SIFT positions (x, y) and descriptors of an image normalised to its 99.5th percentile."""
    image = np.clip(image / max(np.percentile(image, 99.5), 1e-6), 0, 1)
    sift = feature.SIFT(upsampling=2 if max(image.shape) <= WORK_SIZE // 2 else 1)
    try:
        sift.detect_and_extract(image)
    except RuntimeError:  # scikit-image raises when an image yields no keypoint at all
        return np.zeros((0, 2)), np.zeros((0, 128), np.uint8)
    return sift.positions[:, ::-1].astype(np.float64), sift.descriptors


# ---------------------------------------------------------------------------------------
# windows

def _grid(shape, size):
    """Return the top-left corners of non-overlapping windows, centred on the frame at even offsets."""
    def starts(n):
        return range((n % size) // 4 * 2, n - size + 1, size)
    return [(y, x) for y in starts(shape[0]) for x in starts(shape[1])]


def _centre(window, size):
    """Return the window's centre (x, y)."""
    return window.x + (size - 1) / 2, window.y + (size - 1) / 2


def _corners(window, size, margin=0.0):
    """Return the x and y of the window's corner pixels, pushed out by ``margin``."""
    x0, y0 = window.x - margin, window.y - margin
    x1, y1 = window.x + size - 1 + margin, window.y + size - 1 + margin
    return np.array([x0, x1, x0, x1], float), np.array([y0, y0, y1, y1], float)


def _footprint(matrix, window, size, reach, shape, margin=0.0):
    """Return the slices of the reference under the window (corners mapped, plus ``reach``)."""
    px, py = _map(matrix, *_corners(window, size, margin))
    x0, y0 = max(0, int(np.floor(px.min() - reach))), max(0, int(np.floor(py.min() - reach)))
    x1, y1 = min(shape[1], int(np.ceil(px.max() + reach)) + 1), min(shape[0], int(np.ceil(py.max() + reach)) + 1)
    return slice(y0, y1), slice(x0, x1)


def _covered(matrix, window, size, shape):
    """Whether the window, mapped by ``matrix``, lies inside the reference (a pixel from its edges)."""
    px, py = _map(matrix, *_corners(window, size))
    return bool(px.min() >= 1 and py.min() >= 1 and px.max() <= shape[1] - 2 and py.max() <= shape[0] - 2)


def _screen(window, mosaic, mosaic_lum, reference_shape, homography, size, black_level, white_level):
    """Return why the window is dropped before any matching, or "kept"."""
    if not _covered(homography, window, size, reference_shape):
        return "outside"
    raw = mosaic[window.y:window.y + size, window.x:window.x + size]
    if np.mean(raw, dtype=np.float64) - black_level < BLACK_MEAN * (white_level - black_level):
        return "black"
    if np.mean(raw >= black_level + SATURATED * (white_level - black_level)) > CLIPPED_SHARE:
        return "clipped"
    if _texture(_cells(mosaic_lum, window, size)) < FLAT_GRADIENT:
        return "flat"
    return "kept"


def _cells(mosaic_lum, window, size):
    """Return the luminance of the window's Bayer cells."""
    return mosaic_lum[window.y // 2:(window.y + size) // 2, window.x // 2:(window.x + size) // 2]


def _texture(image):
    """Return the RMS gradient along the image's weakest direction (smaller structure-tensor eigenvalue)."""
    gy, gx = np.gradient(ndimage.gaussian_filter(image, 1.0))  # the blur keeps sensor noise out
    a, b, c = np.mean(gx * gx), np.mean(gx * gy), np.mean(gy * gy)
    return float(np.sqrt(max(0.0, (a + c) / 2 - np.hypot((a - c) / 2, b))))


@dataclass
class _Cells:
    """A window's cell luminance, cell centres (mosaic pixels) and the reference's luminance around it."""
    lum: np.ndarray
    x: np.ndarray
    y: np.ndarray
    centre: tuple
    coeffs: np.ndarray  # cubic spline coefficients of the shrunk reference crop
    origin: tuple  # (x, y) of the crop in the reference
    factor: float

    def warp(self, matrix, x=None, y=None):
        """Return the reference's luminance at ``matrix`` (x, y), by default at the window's cells."""
        x, y = (self.x, self.y) if x is None else (x, y)
        px, py = _map(matrix, x, y)
        coords = [_shrunk(py, self.origin[1], self.factor), _shrunk(px, self.origin[0], self.factor)]
        return ndimage.map_coordinates(self.coeffs, coords, order=3, prefilter=False, mode="nearest")


def _reference_cells(window, scene, homography):
    """Return the window's _Cells: the reference around it, shrunk to the cells' scale (two mosaic pixels)."""
    size = scene.size
    factor = 2 * _local_scale(homography, *_centre(window, size))
    rows, cols = _footprint(homography, window, size, 2 * factor + 2, scene.reference_lum.shape, scene.max_shift + 4)
    crop = area_resize(scene.reference_lum[rows, cols], factor) ** np.float32(1 / GAMMA)  # averaged in linear light
    yy, xx = np.mgrid[0:size // 2, 0:size // 2]
    return _Cells(_cells(scene.mosaic_lum, window, size), window.x + 2 * xx + 0.5, window.y + 2 * yy + 0.5,
                  _centre(window, size), ndimage.spline_filter(crop, 3, mode="nearest"), (cols.start, rows.start),
                  factor)


def _coarse_shift(cells, homography, search):
    """Return the shift (dy, dx), in mosaic pixels, best correlating within +-search at a quarter resolution."""
    reach, n = max(1, search // 4), cells.lum.shape[0]
    yy, xx = np.mgrid[-2 * reach:n + 2 * reach, -2 * reach:n + 2 * reach]
    big = cells.warp(homography, cells.x[0, 0] + 2.0 * xx, cells.y[0, 0] + 2.0 * yy)
    scores = feature.match_template(area_resize(big, 2), area_resize(cells.lum, 2))
    i, j = np.unravel_index(np.argmax(scores), scores.shape)
    return 4.0 * (i - reach), 4.0 * (j - reach)


def _refine(cells, homography, shift, angle, rows=slice(None), cols=slice(None), rotate=True, iterations=8,
            anchored=False):
    """Return (shift, angle, ncc) maximising the NCC of the cells with the warped reference.

    Gauss-Newton on lum = a * reference(T(u)) + b, alternating the photometric fit (a, b) with
    the geometric step. Priors keep what the texture cannot tell where it started: the angle
    near 0 (ANGLE_PRIOR: texture on one side of a small window hardly tells a rotation from a
    shift) and, if ``anchored``, the shift where it started as if a texture of SUB_ANCHOR held
    it there (along an edge, or in a faint part, a sub-block's shift is unknown)."""
    lum, x, y = cells.lum[rows, cols], cells.x[rows, cols], cells.y[rows, cols]
    centred = lum - lum.mean()
    start, shift, step = np.array(shift, float), np.array(shift, float), np.ones(3)
    for _ in range(iterations):
        warped = cells.warp(homography @ _rigid(cells.centre, shift, angle), x, y)
        ramp = warped - warped.mean()
        gain = np.sum(ramp * centred) / max(np.sum(ramp * ramp), 1e-12)
        if gain <= 0:  # anti-correlated: nothing to climb towards
            break
        dy, dx = np.gradient(warped, 2.0)  # cells are two mosaic pixels apart
        columns = [dy, dx] + ([dy * (x - cells.centre[0]) - dx * (y - cells.centre[1])] if rotate else [])
        jacobian = gain * np.stack(columns, axis=-1).reshape(-1, len(columns))
        residual = (centred - gain * ramp).ravel()
        weight = np.zeros(len(columns))
        if anchored:
            weight[:2] = lum.size * (gain * SUB_ANCHOR / 2) ** 2  # per mosaic pixel, cells being two
        if rotate:
            weight[2] = np.mean(residual**2) / np.radians(ANGLE_PRIOR) ** 2  # against the residual's variance
        offsets = np.concatenate([shift - start, [angle] if rotate else []])
        step = np.linalg.solve(jacobian.T @ jacobian + np.diag(weight), jacobian.T @ residual - weight * offsets)
        shift += step[:2]
        if rotate:
            angle = float(np.clip(angle + step[2], -np.radians(MAX_ANGLE), np.radians(MAX_ANGLE)))
        if np.all(np.abs(step[:2]) < 0.02) or np.abs(shift).max() > 4 * MAX_SHIFT:
            break
    if np.abs(step[:2]).max() >= 0.02:  # else the last warp's NCC is the final one's to 1e-4
        warped = cells.warp(homography @ _rigid(cells.centre, shift, angle), x, y)
    return shift, angle, _ncc(lum, warped)


def _ncc(a, b):
    """Return the normalised cross-correlation of two images."""
    a, b = a - a.mean(), b - b.mean()
    return float(np.sum(a * b) / (np.sqrt(np.sum(a * a) * np.sum(b * b)) + 1e-12))


def _spread(cells, homography, shift, angle):
    """Return how far (mosaic pixels) the shifts of the window's 2 x 2 sub-blocks disagree."""
    half = cells.lum.shape[0] // 2
    shifts = []
    for rows in (slice(0, half), slice(half, None)):
        for cols in (slice(0, half), slice(half, None)):
            if _texture(cells.lum[rows, cols]) < FLAT_GRADIENT:
                continue  # a flat sub-block has no position to disagree with
            sub, _, ncc = _refine(cells, homography, shift, angle, rows, cols, False, 6, anchored=True)
            shifts.append(sub if ncc >= SUB_MIN_NCC else np.full(2, 1e6))  # matches nothing: disagrees with all
    shifts = np.array(shifts).reshape(-1, 2)
    return float(np.max(np.hypot(*(shifts[:, None] - shifts[None]).transpose(2, 0, 1)), initial=0.0))


def _first_pass(key, window, homography):
    """Return the window refined against the keypoints' homography (status "ncc" or "kept")."""
    scene = _SCENES[key]
    cells = _reference_cells(window, scene, homography)
    shift, angle, window.ncc = _refine(cells, homography, _coarse_shift(cells, homography, scene.max_shift), 0.0)
    window.shift, window.angle = tuple(shift), float(np.degrees(angle))
    window.status = "ncc" if window.ncc < scene.min_ncc else "kept"
    return window


def _refit(homography, windows, size):
    """Return the homography fitted to the refined windows' corners, or the given one if too few."""
    offsets_x, offsets_y = np.array([-1, 1, -1, 1]) * (size - 1) / 2, np.array([-1, -1, 1, 1]) * (size - 1) / 2
    src = np.array([(cx + offsets_x, cy + offsets_y) for cx, cy in (_centre(w, size) for w in windows)])
    dst = np.array([_map(homography @ _rigid(_centre(w, size), w.shift, np.radians(w.angle)), *s)
                    for w, s in zip(windows, src)])
    src, dst = src.transpose(0, 2, 1).reshape(-1, 2), dst.transpose(0, 2, 1).reshape(-1, 2)
    keep = np.ones(len(src), bool)
    for _ in range(2):  # the second fit without the windows the first left REFIT_OUTLIER pixels off
        if keep.sum() < 4 * REFIT_MIN_WINDOWS:
            return homography
        model = transform.ProjectiveTransform.from_estimate(src[keep], dst[keep])
        if not model:
            return homography
        back_x, back_y = _map(np.linalg.inv(model.params), dst[:, 0], dst[:, 1])
        keep = (np.hypot(back_x - src[:, 0], back_y - src[:, 1]) < REFIT_OUTLIER).reshape(-1, 4).all(1).repeat(4)
    return model.params


def _rebase(window, start, homography, size):
    """Return the shift (dy, dx) that puts the window's centre where ``start`` and its shift put it."""
    cx, cy = _centre(window, size)
    moved = _map(start @ _rigid((cx, cy), window.shift, np.radians(window.angle)), cx, cy)
    back_x, back_y = _map(np.linalg.inv(homography), *moved)
    return float(back_y - cy), float(back_x - cx)


def _second_pass(key, window, start, homography):
    """Return the window refined again against the final homography, its status decided, cut if kept."""
    scene = _SCENES[key]
    cells = _reference_cells(window, scene, homography)
    shift, angle, window.ncc = _refine(cells, homography, _rebase(window, start, homography, scene.size),
                                       np.radians(window.angle), iterations=3)
    window.shift, window.angle = (float(shift[0]), float(shift[1])), float(np.degrees(angle))
    window.spread = _spread(cells, homography, shift, angle)
    if window.ncc < scene.min_ncc:
        window.status = "ncc"
    elif window.spread > MAX_SPREAD:
        window.status = "parallax"
    else:
        _cut(window, scene, homography)
    return window


def _cut(window, scene, homography):
    """Attach the raw patch and the reference warped onto its sites, or mark the window outside."""
    size = scene.size
    matrix = homography @ _rigid(_centre(window, size), window.shift, np.radians(window.angle))
    if not _covered(matrix, window, size, scene.reference.shape):
        window.status = "outside"
        return
    factor = _local_scale(matrix, *_centre(window, size))
    rows, cols = _footprint(matrix, window, size, 2 * factor + 2, scene.reference.shape)
    crop = area_resize(scene.reference[rows, cols], factor)  # averaged first, the warp cannot alias
    yy, xx = np.mgrid[window.y:window.y + size, window.x:window.x + size].astype(np.float64)
    px, py = _map(matrix, xx, yy)
    coords = [_shrunk(py, rows.start, factor), _shrunk(px, cols.start, factor)]
    target = [ndimage.map_coordinates(crop[..., c], coords, order=3, mode="nearest") for c in range(3)]
    window.target = np.clip(np.rint(np.stack(target, axis=-1)), 0, 255).astype(np.uint8)
    window.raw = scene.mosaic[window.y:window.y + size, window.x:window.x + size].copy()
