"""quickstart.py, the README's first command, end to end on a still smaller schedule."""

import os
import re
import subprocess
import sys

from PIL import Image

from conftest import ROOT


def test_quickstart_runs_every_stage(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "quickstart.py"), "iters=1", "patch_size=16", "batch_size=1",
         "train=4", "test=2", "full_height=64", "full_width=96"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    # no VGG file on a fresh machine: said loudly, and levels 3..0 trained without the content term
    assert "imagenet-vgg-verydeep-19.mat is absent" in out
    assert len(re.findall(r"WARNING: vgg_dir=none: level [0-3] trains WITHOUT", out)) == 4
    for level in range(6):
        assert (tmp_path / "models" / "quickstart" / f"pynet_level_{level}_iteration_1.ckpt.index").exists()
    assert (tmp_path / "raw_images" / "sample" / "SYNTHETIC_SAMPLE.txt").exists()
    (rendered,) = (tmp_path / "results" / "full-resolution").iterdir()
    assert rendered.name.endswith("_level_0_iteration_1.png")
    with Image.open(rendered) as image:
        assert image.size == (96, 64) and image.mode == "RGB"
    psnr = re.search(r"^PSNR: ([0-9.]+), MS-SSIM: ([0-9.]+)", out, re.M)
    assert psnr and 0 < float(psnr.group(1)) < 60 and 0 < float(psnr.group(2)) <= 1
    assert "Quick start finished" in out
    # one trainer per level in one process: no "retracing" warning for the newcomer to puzzle over
    assert "retracing" not in result.stderr
