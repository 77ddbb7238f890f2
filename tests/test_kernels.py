"""The choice of CPU kernels (oneDNN or TensorFlow's own) per script and CPU.

On CPUs with AVX2 but no AVX-512, oneDNN has no optimised convolution for a batch of one
image with the 9x9 kernels of levels 1 and 0 and falls back to its reference loops: a
level-0 forward of a 64x64 packed patch takes minutes instead of a second. oneDNN can be
capped at AVX2 on any newer x86 CPU (ONEDNN_MAX_CPU_ISA=AVX2), which reproduces that CPU here.
"""

import os
import subprocess
import sys
import time

import numpy as np
import pytest

import checkpoints
import images
import runtime
from helpers import ROOT

AVX512 = {"avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl"}
AVX2 = {"avx2", "fma", "sse4_2"}


def host_flags():
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


needs_avx2 = pytest.mark.skipif(not os.path.exists("/proc/cpuinfo") or not {"avx2", "fma"} <= host_flags(),
                                reason="an x86 Linux CPU with AVX2 (the case these tests reproduce)")


@pytest.mark.parametrize("flags, training, batch, expected", [
    (AVX512, True, 10, True),
    (AVX512, False, 1, True),     # AVX-512: oneDNN is the faster backend for single images too
    (AVX2, True, 2, True),        # AVX2: halves a training step
    (AVX2, True, 1, False),       # ... but not with single images
    (AVX2, False, 1, False),      # rendering, evaluation
    ({"sse4_2"}, True, 10, False),
    (set(), True, 10, None),      # unknown CPU: TensorFlow's own default
])
def test_choice_per_cpu_and_use(flags, training, batch, expected):
    choice, why = runtime.choose_onednn(training, batch, flags)
    assert choice is expected
    assert why


def env_without_choice(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TF_ENABLE_ONEDNN_OPTS", "ONEDNN_MAX_CPU_ISA")}
    env.update(PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2", **extra)
    return env


CHOICE = ("import os, runtime; runtime.select_cpu_kernels(training={training}, smallest_batch={batch}); "
          "print('value', os.environ.get('TF_ENABLE_ONEDNN_OPTS'))")


def chosen(training, batch, **env):
    proc = subprocess.run([sys.executable, "-c", CHOICE.format(training=training, batch=batch)], cwd=str(ROOT),
                          env=env_without_choice(**env), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@needs_avx2
def test_avx2_cap_picks_per_use():
    """With oneDNN capped at AVX2, rendering gets TensorFlow's kernels and training oneDNN."""
    render = chosen(False, 1, ONEDNN_MAX_CPU_ISA="AVX2")
    assert "value 0" in render and "CPU kernels: TensorFlow's own (Eigen)" in render
    train = chosen(True, 2, ONEDNN_MAX_CPU_ISA="AVX2")
    assert "value 1" in train and "CPU kernels: oneDNN" in train
    assert "value 0" in chosen(True, 1, ONEDNN_MAX_CPU_ISA="AVX2")


def test_user_value_wins():
    out = chosen(True, 8, TF_ENABLE_ONEDNN_OPTS="0")
    assert "value 0" in out and "TF_ENABLE_ONEDNN_OPTS=0" in out
    out = chosen(False, 1, TF_ENABLE_ONEDNN_OPTS="1")
    assert "value 1" in out and "CPU kernels: oneDNN" in out


def test_no_choice_once_tensorflow_runs(capsys, monkeypatch):
    import tensorflow  # noqa: F401 - the situation under test: TensorFlow already started

    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    runtime.select_cpu_kernels(training=True, smallest_batch=4)
    assert "TF_ENABLE_ONEDNN_OPTS" not in os.environ
    assert capsys.readouterr().out == ""


@pytest.mark.slow
@needs_avx2
def test_level0_render_of_a_small_mosaic_is_not_pathological(full_model, tmp_path):
    """test_model.py with its default kernels renders a 128x128 mosaic (64x64 packed) at level 0
    in seconds on an AVX2-capped oneDNN, where oneDNN's kernels would take minutes."""
    from checkpoints import save_checkpoint

    models = tmp_path / "models"
    save_checkpoint(full_model, checkpoints.checkpoint_prefix(str(models), 0, 1))
    mosaic = np.random.default_rng(0).integers(0, 1024, (128, 128)).astype(np.uint16)
    images.write_png(str(tmp_path / "small.png"), mosaic)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "test_model.py", "level=0", f"models_dir={models}",
                           f"input={tmp_path / 'small.png'}", f"output_dir={tmp_path / 'out'}"], cwd=str(ROOT),
                          env=env_without_choice(ONEDNN_MAX_CPU_ISA="AVX2"), capture_output=True, text=True,
                          timeout=300)
    took = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "CPU kernels: TensorFlow's own (Eigen)" in proc.stdout
    if runtime.huge_pages_environment(env_without_choice()) is not None:  # started again on huge pages
        assert "Memory: malloc on transparent huge pages" in proc.stdout
    assert (tmp_path / "out" / "small_level_0_iteration_1.png").is_file()
    # building the model and loading 190 MB take ~15-30 s; oneDNN's fallback takes > 4 minutes
    assert took < 150, took
