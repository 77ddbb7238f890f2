"""make_sample_dataset.py: the unprocessing steps against their forward counterparts, the layout,
the marker, value ranges, safety of the output folder, and that the result feeds the pipelines."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import camera
import cli
import data_pipeline
import load_dataset as ld
import make_sample_dataset as msd
import unprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------
# the inverse camera pipeline, step by step

def test_inverse_tone_curve_and_gamma_invert_the_forward_ones():
    y = np.linspace(0.0, 1.0, 1001)
    x = unprocess.inverse_smoothstep(y)
    np.testing.assert_allclose(3 * x ** 2 - 2 * x ** 3, y, atol=1e-9)
    assert np.all(np.diff(x) > 0)
    np.testing.assert_allclose(unprocess.gamma_expand(y[1:]) ** (1 / 2.2), y[1:], rtol=1e-9)


def test_colour_matrix_keeps_white_and_is_phone_like():
    rs = np.random.RandomState(0)
    for _ in range(20):
        rgb_to_cam = unprocess.random_rgb_to_cam(rs)
        np.testing.assert_allclose(rgb_to_cam.sum(axis=1), 1.0, atol=1e-12)
        cam_to_rgb = np.linalg.inv(rgb_to_cam)
        assert np.all(np.diag(cam_to_rgb) > 1.3) and np.all(np.diag(cam_to_rgb) < 2.2)


def test_mosaic_is_rggb():
    image = np.arange(4 * 6 * 3).reshape(4, 6, 3)
    mosaic = camera.mosaic_from_rgb(image)
    for y in range(4):
        for x in range(6):
            channel = {(0, 0): 0, (0, 1): 1, (1, 0): 1, (1, 1): 2}[(y % 2, x % 2)]
            assert mosaic[y, x] == image[y, x, channel]


def test_code_values_put_black_at_64_and_white_at_1023():
    np.testing.assert_array_equal(unprocess.to_code_values(np.array([-1.0, 0.0, 0.5, 1.0, 2.0])),
                                  [0, 64, int(np.floor(64 + 0.5 * 959 + 0.5)), 1023, 1023])


def test_forward_isp_recovers_a_uniform_colour():
    """Unprocess a flat colour without noise, then run the forward pipeline by hand on the
    four Bayer sites: black level, white balance, exposure, camera->sRGB, gamma, tone curve."""
    colour = np.array([180, 120, 60], dtype=np.uint8)
    rs = np.random.RandomState(5)
    mosaic, params = unprocess.unprocess(np.tile(colour, (8, 8, 1)), rs, noise=False)
    linear = (mosaic.astype(np.float64) - 64) / 959
    cam = np.array([linear[0, 0], linear[0, 1], linear[1, 1]])
    assert linear[0, 1] == linear[1, 0]
    cam = cam * np.array([params["red_gain"], 1.0, params["blue_gain"]]) / params["exposure"]
    rgb = np.linalg.inv(params["rgb_to_cam"]) @ cam
    display = np.clip(rgb, 0, 1) ** (1 / 2.2)
    srgb = 3 * display ** 2 - 2 * display ** 3
    np.testing.assert_allclose(srgb * 255, colour, atol=2.0)  # 10-bit quantisation only


def test_noise_follows_shot_plus_read_variance():
    rs = np.random.RandomState(0)
    flat = np.full((200, 200), 0.4)
    noisy = unprocess.add_noise(flat.astype(np.float32), rs, 0.004, 0.0001)
    assert abs(noisy.var() - (0.4 * 0.004 + 0.0001)) < 0.1 * (0.4 * 0.004 + 0.0001)


# ---------------------------------------------------------------------------------------
# the dataset on disk

def test_layout_marker_and_values(sample_dataset):
    root = sample_dataset
    for split, count in (("train", 8), ("test", 3)):
        assert sorted(os.listdir(os.path.join(root, split, "huawei_raw"))) == sorted(f"{i}.png" for i in range(count))
        assert sorted(os.listdir(os.path.join(root, split, "canon"))) == sorted(f"{i}.jpg" for i in range(count))
        for i in range(count):
            with Image.open(os.path.join(root, split, "huawei_raw", f"{i}.png")) as image:
                assert image.size == (448, 448) and image.mode in ("L", "I;16")
                mosaic = np.asarray(image).astype(np.int64)
            assert 0 <= mosaic.min() and mosaic.max() <= 1023
            assert 40 <= np.percentile(mosaic, 0.1) <= 90  # dark pixels sit near the black level (64)
            with Image.open(os.path.join(root, split, "canon", f"{i}.jpg")) as image:
                assert image.format == "JPEG" and image.mode == "RGB" and image.size == (448, 448)
    full = os.listdir(os.path.join(root, "test", "huawei_full_resolution"))
    assert len(full) == 1
    with Image.open(os.path.join(root, "test", "huawei_full_resolution", full[0])) as image:
        assert image.size == (96, 64)
    marker = open(os.path.join(root, ld.MARKER_FILE)).read()
    assert "NOT the Zurich RAW-to-RGB" in marker and "CC0" in marker and "public domain" in marker
    assert ld.dataset_kind(root) == ld.KIND_SYNTHETIC
    assert ld.check_dataset(root, "train", deep=True) == list(range(8))


def test_raw_and_target_show_the_same_scene(sample_dataset):
    """The mosaic's green sites follow the target's green channel (same crop, no shift)."""
    for i in range(3):
        with Image.open(os.path.join(sample_dataset, "train", "huawei_raw", f"{i}.png")) as image:
            green = np.asarray(image).astype(np.float64)[0::2, 1::2]
        with Image.open(os.path.join(sample_dataset, "train", "canon", f"{i}.jpg")) as image:
            target = np.asarray(image).astype(np.float64)[0::2, 1::2, 1]
        assert np.corrcoef(green.ravel(), target.ravel())[0, 1] > 0.8
        shifted = np.corrcoef(green[:, 8:].ravel(), target[:, :-8].ravel())[0, 1]
        assert np.corrcoef(green.ravel(), target.ravel())[0, 1] > shifted


def test_sample_feeds_the_training_and_test_pipelines(sample_dataset):
    ds, log = data_pipeline.train_dataset(sample_dataset, 1, batch_size=2, train_size=8, verbose=False)
    for raw, target in data_pipeline.batches(ds.take(2), log):
        assert raw.shape == (2, 224, 224, 4) and target.shape == (2, 224, 224, 3)
        assert 0.0 <= float(raw.numpy().min()) and float(raw.numpy().max()) <= 1023 / 1020
        assert 0.0 <= float(target.numpy().min()) and float(target.numpy().max()) <= 1.0
    batches = list(data_pipeline.batches(*data_pipeline.test_dataset(sample_dataset, 0, batch_size=1, verbose=False)))
    assert len(batches) == 3 and batches[0][1].shape == (1, 448, 448, 3)


def test_each_photo_gives_its_first_half_to_train_and_its_second_to_test(tmp_path):
    """Photos whose halves have distinct flat colours: every test patch, full-resolution mosaic
    and its kept photo comes from a second half, every training patch from a first half, and
    each split goes through the photos in turn."""
    halves = {"a": ((200, 40, 40), (40, 200, 40)), "b": ((40, 40, 200), (200, 200, 40)),
              "c": ((40, 200, 200), (200, 40, 200))}
    photos = []
    for name, (first, second) in halves.items():
        photo = np.empty((120, 200, 3), np.uint8)  # landscape: cut across the width
        photo[:, :100], photo[:, 100:] = first, second
        photos.append((name, photo, "test"))
    root = str(tmp_path / "s")
    msd.build(root, photos, train=6, test=6, full=3, full_height=64, full_width=32, noise=False, progress=False)
    names = list(halves)
    for split, half in (("train", 0), ("test", 1)):
        for i in range(6):
            with Image.open(os.path.join(root, split, "canon", f"{i}.jpg")) as image:
                mean = np.asarray(image).reshape(-1, 3).mean(axis=0)
            np.testing.assert_allclose(mean, halves[names[i % 3]][half], atol=3)
    for i, name in enumerate(names):
        with Image.open(os.path.join(root, "test", msd.FULL_RES_TARGET_FOLDER, f"{name}_{i}.png")) as image:
            assert image.size == (32, 64)
            np.testing.assert_allclose(np.asarray(image).reshape(-1, 3).mean(axis=0), halves[name][1], atol=1)
        assert os.path.isfile(os.path.join(root, "test", "huawei_full_resolution", f"{name}_{i}.png"))


def test_same_seed_same_dataset(tmp_path):
    photos = [("flat", np.full((100, 150, 3), 128, np.uint8), "test"), ("grad", np.tile(
        np.arange(150, dtype=np.uint8)[None, :, None], (100, 1, 3)), "test")]
    for name in ("a", "b"):
        msd.build(str(tmp_path / name), photos, train=2, test=1, full=0, seed=3, progress=False)
    for rel in ("train/huawei_raw/1.png", "train/canon/1.jpg", "test/huawei_raw/0.png"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def test_refuses_to_overwrite_a_dataset_without_marker(tmp_path):
    real = tmp_path / "zrr"
    (real / "train" / "huawei_raw").mkdir(parents=True)
    (real / "train" / "huawei_raw" / "0.png").write_bytes(b"precious")
    with pytest.raises(cli.UserError, match="without SYNTHETIC_SAMPLE.txt"):
        msd.build(str(real), train=1, test=1, full=0, progress=False)
    assert (real / "train" / "huawei_raw" / "0.png").read_bytes() == b"precious"
    assert sorted(os.listdir(real)) == ["train"]


def test_replaces_an_older_sample_completely(tmp_path):
    root = str(tmp_path / "s")
    photos = [("p", np.random.default_rng(0).integers(0, 256, (300, 300, 3)).astype(np.uint8), "test")]
    msd.build(root, photos, train=4, test=2, full=1, full_height=64, full_width=64, progress=False)
    msd.build(root, photos, train=2, test=1, full=0, progress=False)
    assert sorted(os.listdir(os.path.join(root, "train", "huawei_raw"))) == ["0.png", "1.png"]
    assert os.listdir(os.path.join(root, "test", "huawei_full_resolution")) == []
    assert [n for n in os.listdir(root) if n.startswith(".")] == []
    assert ld.check_dataset(root, "test") == [0]


def test_own_photos_and_the_command_line(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (300, 200, 3)).astype(np.uint8)).save(photos / "small.jpg")  # upscaled
    Image.fromarray(rng.integers(0, 256, (500, 700, 4)).astype(np.uint8)).save(photos / "big.png")   # RGBA
    (photos / "readme.txt").write_text("ignored")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=ROOT)
    script = os.path.join(ROOT, "make_sample_dataset.py")
    result = subprocess.run([sys.executable, script, f"output_dir={out}", f"photos_dir={photos}", "train=3",
                             "test=2", "full=1", "full_height=96", "full_width=128", "seed=4"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "synthetic sample" in result.stdout
    marker = (out / ld.MARKER_FILE).read_text()
    assert "user photo" in marker and "big.png" in marker and "small.jpg" in marker
    assert ld.check_dataset(str(out), "train", deep=True) == [0, 1, 2]
    bad = subprocess.run([sys.executable, script, f"output_dir={out}", "full_height=100"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("error: full_height=100: expected a multiple of 32")
    assert bad.stderr.strip().count("\n") == 0
    missing = subprocess.run([sys.executable, script, f"photos_dir={tmp_path / 'nope'}"],
                             capture_output=True, text=True, env=env, timeout=300)
    assert missing.returncode == 1 and "folder of photos not found" in missing.stderr
