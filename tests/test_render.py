"""test_model.py: rendering full-resolution mosaics."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import test_model
from conftest import ROOT
from load_dataset import extract_bayer_channels
from model import level_model, save_checkpoint
from utils import UserError


@pytest.fixture(scope="module")
def fabricated_release(full_model, tmp_path_factory):
    """A folder laid out as a user's: models/original/pynet_level_0.ckpt with random weights
    (written by our saver under the reference's keys) and two full-resolution mosaics."""
    root = tmp_path_factory.mktemp("user")
    rng = np.random.default_rng(0)
    saved = [v.numpy() for v in full_model.weights]
    for var in full_model.weights:
        var.assign(rng.normal(0, 0.05, var.shape).astype(np.float32))
    save_checkpoint(full_model, str(root / "models" / "original" / "pynet_level_0.ckpt"))
    for var, value in zip(full_model.weights, saved):
        var.assign(value)
    folder = root / "raw_images" / "test" / "huawei_full_resolution"
    folder.mkdir(parents=True)
    # 100 x 150 packs to 50 x 75: not a multiple of 16, so padding and cropping are exercised
    Image.fromarray(rng.integers(0, 1024, (100, 150)).astype(np.uint16)).save(folder / "odd.png")
    Image.fromarray(rng.integers(0, 256, (64, 64)).astype(np.uint8)).save(folder / "eight_bit.png")
    return root


def run_script(cwd, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "test_model.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_renders_released_weights_end_to_end(fabricated_release):
    result = run_script(fabricated_release, "level=0", "orig=true", "bits=16", "use_gpu=false")
    assert result.returncode == 0, result.stderr
    out = fabricated_release / "results" / "full-resolution"
    import png
    width, height, _, info = png.Reader(filename=str(out / "odd_level_0_iteration_None.png")).read()
    assert (height, width, info["bitdepth"], info["planes"]) == (100, 150, 16, 3)
    with Image.open(out / "eight_bit_level_0_iteration_None.png") as image:
        assert image.size == (64, 64)


def test_render_pads_then_crops_without_changing_aligned_frames(full_model):
    rng = np.random.default_rng(1)
    mosaic = rng.integers(0, 1024, (64, 96)).astype(np.uint16)
    direct = full_model(extract_bayer_channels(mosaic)[None])
    for level in (0, 3):
        rendered = test_model.render(level_model(full_model, level), mosaic, level)
        np.testing.assert_allclose(rendered, direct[level][0].numpy(), atol=1e-6)
    odd = test_model.render(full_model, rng.integers(0, 1024, (70, 98)).astype(np.uint16), 0)
    assert odd.shape == (70, 98, 3)


def test_missing_checkpoint_and_folder_are_one_line_errors(tmp_path):
    (tmp_path / "raw_images" / "test" / "huawei_full_resolution").mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32), np.uint16)).save(tmp_path / "raw_images" / "test" /
                                                        "huawei_full_resolution" / "a.png")
    result = run_script(tmp_path, "level=1")
    assert result.returncode == 1
    assert result.stderr.strip() == ("error: no checkpoint pynet_level_1_iteration_*.ckpt in models/: train level 1 "
                                     "first (python train_model.py level=1) or use the released weights with orig=true")
    result = run_script(tmp_path, "orig=true")
    assert result.returncode == 1 and "models/original/pynet_level_0.ckpt: no checkpoint there" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_script(tmp_path, "dataset_dir=elsewhere/")
    assert result.returncode == 1 and "huawei_full_resolution: folder not found" in result.stderr
    result = run_script(tmp_path, "bits=12")
    assert result.returncode == 2 and result.stderr.strip() == "error: bits=12: expected one of 8, 16"


def test_output_names_follow_the_reference():
    assert test_model.output_path("results/full-resolution/", "x/0.png", 0, "None") == \
        "results/full-resolution/0_level_0_iteration_None.png"
    params = {"orig": False, "level": 2, "restore_iter": 20000, "models_dir": "models/"}
    assert test_model.resolve_checkpoint(params) == ("models/pynet_level_2_iteration_20000.ckpt", "20000")
    with pytest.raises(UserError):
        test_model.resolve_checkpoint({**params, "restore_iter": None, "models_dir": "/nonexistent/"})
