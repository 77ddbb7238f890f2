"""Tests of align.py, the alignment engine of a ZRR-style dataset maker, on synthetic scenes
whose truth is known (tests/scenes.py): a photograph seen by the phone through a known
homography plus a smooth sub-pixel displacement field, unprocessed into a 10-bit RGGB mosaic.
Every check compares the engine's output with that truth, never with the engine's own figures.

Scenes (patch sizes kept small so that the module runs in well under a minute on 2 cores):
* main: astronaut, 320 x 320 mosaic at 0.7 mosaic pixel per photo pixel, 3 degrees, a little
  perspective, a 0.3-pixel field; the mosaic written as a DNG and read back with rawpy; the
  reference through JPEG quality 95; 64-pixel windows;
* edits: motorcycle, 320 x 448, with painted flat / black / clipped windows, an occluder from
  another photo and a patch seen 2 pixels away (parallax);
* fov: motorcycle at 2.5 reference pixels per mosaic pixel, the reference a crop that the
  mosaic's field of view overflows; 48-pixel windows.
"""

import numpy as np
import pytest

import align
import runtime
import scenes
from helpers import write_dng

# one worker builds this module's shared fixtures (pytest-xdist --dist loadgroup)
pytestmark = pytest.mark.xdist_group("align")

P_MAIN, P_EDITS, P_FOV = 64, 64, 48
POSITION_TOLERANCE = 0.5  # mosaic pixels
MIN_PSNR = 28.0  # dB, each kept target against the truly warped photo (observed 29-42 here)


def _centre_error(scene, result, window):
    """Distance (mosaic pixels) between where the engine puts the window's centre and where it truly is."""
    cx, cy = align._centre(window, result.patch_size)
    found_x, found_y = scenes.apply(result.window_homography(window), cx, cy)
    back_x, back_y = scenes.apply(np.linalg.inv(scene.homography), found_x, found_y)
    dx, dy = scene.displacement(cx, cy)
    return float(np.hypot(back_x - (cx + dx), back_y - (cy + dy)))


def _psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0**2 / max(mse, 1e-12))


@pytest.fixture(scope="module")
def main_scene(tmp_path_factory):
    """The main scene, its mosaic as rawpy reads it back from a DNG, and the engine's result."""
    import rawpy

    scene = scenes.make_scene("astronaut", mosaic_shape=(320, 320), scale=0.7, angle=3.0, jpeg=True)
    path = write_dng(tmp_path_factory.mktemp("dng") / "scene.dng", scene.mosaic, pattern="RGGB", bits=10,
                     black=64, white=1023)
    with rawpy.imread(str(path)) as raw:
        mosaic = raw.raw_image.copy()
    return scene, mosaic, align.align_scene(mosaic, scene.reference, patch_size=P_MAIN)


@pytest.fixture(scope="module")
def edits_scene():
    scene = scenes.make_scene(
        "motorcycle", mosaic_shape=(320, 448), scale=0.75, jpeg=True,
        paint=[(64, 64, P_EDITS, "flat"), (64, 192, P_EDITS, "black"), (64, 320, P_EDITS, "clipped")],
        occluder=(192, 64, 64, 96, "coffee"), parallax=(224, 352, 32, 32, 0.0, 2.0))
    return scene, align.align_scene(scene.mosaic, scene.reference, patch_size=P_EDITS)


@pytest.fixture(scope="module")
def fov_scene():
    scene = scenes.make_scene("motorcycle", mosaic_shape=(192, 288), scale=0.4, angle=1.0, jpeg=True,
                              crop=(60, 90, 380, 560))
    return scene, align.align_scene(scene.mosaic, scene.reference, patch_size=P_FOV)


def _window(result, y, x):
    return next(w for w in result.windows if (w.y, w.x) == (y, x))


# ---------------------------------------------------------------------------------------
# geometry against the truth

def test_dng_read_back_is_the_mosaic(main_scene):
    scene, mosaic, _ = main_scene
    assert mosaic.dtype == np.uint16 and np.array_equal(mosaic, scene.mosaic)


def test_homography_within_half_a_pixel_across_the_frame(main_scene):
    scene, mosaic, result = main_scene
    y, x = np.mgrid[0:mosaic.shape[0]:8, 0:mosaic.shape[1]:8].astype(np.float64)
    found_x, found_y = scenes.apply(result.homography, x, y)
    back_x, back_y = scenes.apply(np.linalg.inv(scene.homography), found_x, found_y)
    error = np.hypot(back_x - x, back_y - y)
    print(f"homography error: max {error.max():.3f} px, mean {error.mean():.3f} px; "
          f"{result.matches} matches, {result.inliers} inliers, residual {result.residual:.2f} px")
    assert error.max() < POSITION_TOLERANCE


def test_kept_windows_at_their_true_positions(main_scene):
    scene, _, result = main_scene
    errors = [_centre_error(scene, result, w) for w in result.kept]
    print(f"{len(errors)} of {len(result.windows)} kept; centre error max {max(errors):.3f} px, "
          f"mean {np.mean(errors):.3f} px")
    assert len(result.kept) >= 0.8 * len(result.windows)  # a textured photo fully inside the reference
    assert max(errors) < POSITION_TOLERANCE


def test_targets_match_the_truly_warped_photo(main_scene):
    scene, _, result = main_scene
    psnr = [_psnr(w.target, scene.true_target(w.y, w.x, P_MAIN)) for w in result.kept]
    print(f"target PSNR: min {min(psnr):.1f} dB, median {np.median(psnr):.1f} dB")
    assert all(w.target.shape == (P_MAIN, P_MAIN, 3) and w.target.dtype == np.uint8 for w in result.kept)
    assert min(psnr) >= MIN_PSNR


def test_a_misplaced_target_is_worse(main_scene):
    """The PSNR check can fail: the truth shifted by one pixel is far from the targets."""
    scene, _, result = main_scene
    shifted = [_psnr(w.target, scene.true_target(w.y, w.x + 1, P_MAIN)) for w in result.kept]
    aligned = [_psnr(w.target, scene.true_target(w.y, w.x, P_MAIN)) for w in result.kept]
    assert np.median(shifted) < np.median(aligned) - 3


def test_raw_patches_are_the_mosaic_bit_for_bit(main_scene):
    scene, mosaic, result = main_scene
    for w in result.kept:
        assert w.raw.dtype == np.uint16 and w.raw.shape == (P_MAIN, P_MAIN)
        assert np.array_equal(w.raw, mosaic[w.y:w.y + P_MAIN, w.x:w.x + P_MAIN])
        assert np.array_equal(w.raw, scene.mosaic[w.y:w.y + P_MAIN, w.x:w.x + P_MAIN])


def test_windows_tile_a_grid_at_even_offsets(main_scene):
    _, mosaic, result = main_scene
    ys, xs = sorted({w.y for w in result.windows}), sorted({w.x for w in result.windows})
    assert all(v % 2 == 0 for v in ys + xs)
    assert np.all(np.diff(ys) == P_MAIN) and np.all(np.diff(xs) == P_MAIN)
    assert len(result.windows) == (mosaic.shape[0] // P_MAIN) * (mosaic.shape[1] // P_MAIN)
    assert ys[-1] + P_MAIN <= mosaic.shape[0] and xs[-1] + P_MAIN <= mosaic.shape[1]


def test_large_scale_ratio_and_narrower_reference(fov_scene):
    """2.5 reference pixels per mosaic pixel; windows the reference does not cover are "outside"."""
    scene, result = fov_scene
    height, width = scene.photo.shape[:2]
    for w in result.windows:
        x, y = align._corners(w, P_FOV)
        tx, ty = scene.true_map(x, y)
        margin = min(tx.min(), ty.min(), width - 1 - tx.max(), height - 1 - ty.max())
        if margin < -2:
            assert w.status == "outside", (w.y, w.x, margin)
        elif margin > 2:
            assert w.status != "outside", (w.y, w.x, margin)
    errors = [_centre_error(scene, result, w) for w in result.kept]
    psnr = [_psnr(w.target, scene.true_target(w.y, w.x, P_FOV)) for w in result.kept]
    print(f"scale {scene.scale():.2f}: {len(errors)} kept, centre error max {max(errors):.3f} px, "
          f"PSNR min {min(psnr):.1f} dB")
    assert len(errors) >= 6
    assert max(errors) < POSITION_TOLERANCE
    assert min(psnr) >= MIN_PSNR


def test_one_process_gives_what_two_give(fov_scene):
    """The default refines windows in two forked processes; in-process gives the same windows."""
    scene, result = fov_scene
    alone = align.align_scene(scene.mosaic, scene.reference, patch_size=P_FOV, workers=1)
    assert np.allclose(alone.homography, result.homography, atol=1e-9)
    for a, b in zip(alone.windows, result.windows):
        assert (a.y, a.x, a.status) == (b.y, b.x, b.status)
        assert np.allclose(a.shift + (a.angle, a.ncc), b.shift + (b.angle, b.ncc), atol=1e-6, equal_nan=True)
        if a.status == "kept":
            assert np.array_equal(a.raw, b.raw)
            assert np.abs(a.target.astype(int) - b.target).max() <= 1


# ---------------------------------------------------------------------------------------
# drops

def test_flat_black_and_clipped_windows_are_dropped(edits_scene):
    _, result = edits_scene
    assert _window(result, 64, 64).status == "flat"
    assert _window(result, 64, 192).status == "black"
    assert _window(result, 64, 320).status == "clipped"
    for w in result.windows:
        if w.status in ("flat", "black", "clipped"):
            assert w.raw is None and w.target is None


def test_windows_over_an_occluder_are_dropped(edits_scene):
    """The occluder (64 x 96 at (192, 64)) covers window (192, 64) and half of (192, 128)."""
    _, result = edits_scene
    assert _window(result, 192, 64).status in ("ncc", "parallax")
    assert _window(result, 192, 128).status in ("ncc", "parallax")
    for y, x in ((128, 64), (128, 128), (192, 192), (256, 64), (256, 128)):  # its textured neighbours
        assert _window(result, y, x).status == "kept", (y, x)


def test_a_window_whose_parts_disagree_is_dropped(edits_scene):
    """A quarter of window (192, 320) sees the scene 2 pixels away: its sub-blocks disagree."""
    _, result = edits_scene
    window = _window(result, 192, 320)
    print(f"parallax window: NCC {window.ncc:.3f}, sub-blocks disagree by {window.spread:.2f} px")
    assert window.status == "parallax"


def test_kept_windows_of_the_edited_scene_are_right(edits_scene):
    scene, result = edits_scene
    errors = [_centre_error(scene, result, w) for w in result.kept]
    assert len(errors) >= 12
    assert max(errors) < POSITION_TOLERANCE


def test_min_ncc_is_the_threshold(edits_scene):
    _, result = edits_scene
    assert all(w.ncc >= 0.9 for w in result.kept)
    assert all(w.ncc < 0.9 for w in result.windows if w.status == "ncc")


# ---------------------------------------------------------------------------------------
# failures and inputs

def test_an_unrelated_reference_fails_with_a_one_line_reason():
    scene = scenes.make_scene("astronaut", mosaic_shape=(320, 320))
    with pytest.raises(align.AlignmentFailed) as caught:
        align.align_scene(scene.mosaic, scenes.photo("coffee"), patch_size=P_MAIN)
    reason = str(caught.value)
    assert reason == caught.value.reason and "\n" not in reason
    assert "keypoint matches" in reason and "consistent with one homography" in reason


def test_bad_inputs_are_refused():
    reference = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="even"):
        align.align_scene(np.zeros((63, 64), np.uint16), reference)
    with pytest.raises(ValueError, match="uint8"):
        align.align_scene(np.zeros((64, 64), np.uint16), reference.astype(np.float32))
    with pytest.raises(ValueError, match="patch_size"):
        align.align_scene(np.zeros((64, 64), np.uint16), reference, patch_size=30)


def test_area_resize_averages_boxes():
    rng = np.random.default_rng(0)
    image = rng.random((12, 18)).astype(np.float32)
    assert np.allclose(align.area_resize(image, 3), image.reshape(4, 3, 6, 3).mean(axis=(1, 3)), atol=1e-6)
    # a non-integer factor: each output is the mean over its box, partial pixels weighted
    out = align.area_resize(image, 1.5)
    assert out.shape == (8, 12)
    expected = (image[0, 0] + 0.5 * image[0, 1] + 0.5 * image[1, 0] + 0.25 * image[1, 1]) / 2.25
    assert np.isclose(out[0, 0], expected, atol=1e-6)
    rgb = rng.random((12, 18, 3)).astype(np.float32)
    assert np.allclose(align.area_resize(rgb, 2)[..., 1], align.area_resize(rgb[..., 1], 2), atol=1e-6)


def _signal_dispositions():
    import signal

    return signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)


def test_workers_are_forked_only_without_tensorflow_running(monkeypatch):
    """Forked workers leave Ctrl-C to their parent and die on SIGTERM; in a process where
    TensorFlow's runtime runs, nothing is forked (a fork could copy a lock its threads hold)."""
    import os
    import signal
    import sys
    from types import SimpleNamespace

    def eager_context(initialized):
        context = None if initialized is None else SimpleNamespace(_initialized=initialized)
        monkeypatch.setitem(sys.modules, "tensorflow.python.eager.context", SimpleNamespace(_context=context))

    for state in (None, False):  # imported only, or its context made but not started: forked
        eager_context(state)
        with align._workers(2) as run:
            assert os.getpid() not in run(os.getpid, [()] * 4)
            assert run(_signal_dispositions, [()] * 2) == [(signal.SIG_IGN, signal.SIG_DFL)] * 2
    eager_context(True)
    with align._workers(2) as run:
        assert run(os.getpid, [()] * 2) == [os.getpid()] * 2
    monkeypatch.setitem(sys.modules, "tensorflow.python.eager.context", sys)  # a layout it does not know
    assert runtime.tensorflow_running()
