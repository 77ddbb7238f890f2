"""quickstart.py, the README's first command: end to end on a tiny schedule, and (long) that its
default schedule gives a PyNET that beats the classical baseline ISP on the sample."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from helpers import ROOT

PSNR_LINE = re.compile(r"^  PSNR on the sample's test split at level 0: PyNET ([0-9.]+) dB, "
                       r"classical baseline ISP ([0-9.]+) dB$", re.M)


def run_quickstart(cwd, *args, timeout):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "quickstart.py"), *args],
                            cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def read_rgb(path):
    with Image.open(path) as image:
        assert image.mode == "RGB"
        return np.asarray(image)


def comparison_panels(root, height, width):
    """The comparison's three panels, after checking its layout (three panels of the mosaic's
    size side by side under a caption band), and the photo the mosaic was made from."""
    (mosaic,) = (root / "raw_images" / "sample" / "test" / "huawei_full_resolution").iterdir()
    (comparison,) = (root / "results" / "full-resolution").glob("*_comparison.png")
    assert comparison.name.startswith(mosaic.stem + "_level_0_iteration_")
    image = read_rgb(comparison)
    band = image.shape[0] - height
    assert image.shape[1] == 3 * width and 0 < band < height
    panels = [image[band:, k * width:(k + 1) * width] for k in range(3)]
    target = read_rgb(root / "raw_images" / "sample" / "test" / "full_resolution_target" / mosaic.name)
    return mosaic, comparison, panels, target


@pytest.mark.slow
def test_quickstart_runs_every_stage(tmp_path):
    result = run_quickstart(tmp_path, "iters=0", "patch_size=16", "batch_size=1", "train=4", "test=2",
                            "full_height=64", "full_width=96", timeout=900)
    out = result.stdout
    # no VGG file on a fresh machine: said loudly, and levels 3..0 trained without the content term
    assert "imagenet-vgg-verydeep-19.mat is absent" in out
    assert len(re.findall(r"WARNING: vgg_dir=none: level [0-3] trains WITHOUT", out)) == 4
    assert "quick-start schedule (NOT the paper's" in out
    for level in range(6):
        assert (tmp_path / "models" / "quickstart" / f"pynet_level_{level}_iteration_0.ckpt.index").exists()
    assert (tmp_path / "raw_images" / "sample" / "SYNTHETIC_SAMPLE.txt").exists()
    (rendered,) = (tmp_path / "results" / "full-resolution").glob("*_level_0_iteration_0.png")
    pynet = read_rgb(rendered)
    assert pynet.shape == (64, 96, 3)
    mosaic, comparison, panels, target = comparison_panels(tmp_path, 64, 96)
    import evaluate_accuracy
    import test_model
    import utils

    classical = utils.to_uint(evaluate_accuracy.baseline_isp(test_model.pack(utils.read_mosaic(str(mosaic)))[None])[0])
    np.testing.assert_array_equal(panels[0], classical)
    np.testing.assert_array_equal(panels[1], pynet)
    np.testing.assert_array_equal(panels[2], target)
    psnr = re.search(r"^PSNR: ([0-9.]+), MS-SSIM: ([0-9.]+)", out, re.M)
    assert psnr and 0 < float(psnr.group(1)) < 60 and 0 < float(psnr.group(2)) <= 1
    lines = out.rstrip().splitlines()
    assert lines[-2] == f"  comparison (classical ISP | PyNET | target): {os.path.relpath(comparison, tmp_path)}"
    assert PSNR_LINE.match(lines[-1])
    # one trainer per level in one process: no "retracing" warning for the newcomer to puzzle over
    assert "retracing" not in result.stderr


@pytest.mark.long
def test_default_quickstart_beats_the_classical_isp(tmp_path):
    """The README's promise: the quick start's own schedule ends with a PyNET that scores above
    the classical baseline on the sample's test split, and so looks better on its photo too."""
    from skimage.metrics import peak_signal_noise_ratio

    out = run_quickstart(tmp_path, timeout=3600).stdout
    pynet, baseline = (float(v) for v in PSNR_LINE.search(out).groups())
    assert pynet > baseline, out[-2000:]
    _, _, (classical, network, _), target = comparison_panels(tmp_path, 384, 256)
    assert peak_signal_noise_ratio(target, network) > peak_signal_noise_ratio(target, classical)
