"""PSNR, SSIM and MS-SSIM of PyNET (or of a classical ISP) on the test split.

    python evaluate_accuracy.py                                  # the released weights, level 0 (the reference)
    python evaluate_accuracy.py orig=false level=1 restore_iter=35000
    python evaluate_accuracy.py model=baseline                   # what a plain ISP scores on the same patches
    python evaluate_accuracy.py csv=results/scores.csv           # one line per test patch

The reference protocol: every patch of {dataset_dir}/test/ (huawei_raw/{i}.png against
canon/{i}.jpg), the network's output of the level *unclipped*, PSNR with data range 1 and
MS-SSIM (tf.image.ssim_multiscale, TF's defaults) per patch, averaged over the patches. The
same metrics are also given for the output clipped to [0, 1] and rounded to 8 bits, i.e. what
a saved picture scores, plus single-scale SSIM.
"""

import csv
import os
import sys

import numpy as np

import checkpoints
import utils
from utils import Arg, UsageError, UserError

BLACK_LEVEL, WHITE_LEVEL = utils.BLACK_LEVEL, utils.WHITE_LEVEL


def _default_orig(values):
    """true, unless restore_iter is given"""
    return values["restore_iter"] is None


ARGS = [
    Arg("model", str, "pynet", "pynet, or baseline: black level, bilinear demosaic, gray-world white balance, "
        "sRGB gamma (no network; level 0 only)", choices=("pynet", "baseline")),
    utils.level_arg(help="pyramid level whose output is scored against that level's target (0 = 448x448)"),
    Arg("orig", utils.BOOL, _default_orig, "score the authors' released weights, " + utils.ORIGINAL_CHECKPOINT),
    utils.restore_iter_arg(),
    utils.dataset_dir_arg(),
    Arg("batch_size", int, 1, "patches per forward pass (every patch is scored, whatever the size)",
        check=utils.positive),
    Arg("csv", str, "", "also write one line per patch to this CSV file"),
    Arg("use_gpu", utils.BOOL, True, "run on the GPU when there is one"),
    Arg("models_dir", str, "models/", "folder of the trained checkpoints"),
    Arg("black_level", float, BLACK_LEVEL, "model=baseline: the sensor's black level, in 10-bit code values",
        check=lambda v: None if 0 <= v < WHITE_LEVEL else
        f"a value from 0 to below {WHITE_LEVEL} (10-bit code values)"),
]

METRICS = ("psnr", "ssim", "ms_ssim")


# ---------------------------------------------------------------------------------------
# metrics

def quantise_8bit(images):
    """What a saved 8-bit picture holds: clipped to [0, 1], rounded to 1/255 as utils.to_uint."""
    return np.floor(np.clip(np.asarray(images, np.float64), 0.0, 1.0) * 255 + 0.5).astype(np.float32) / 255


def image_metrics(enhanced, target) -> dict:
    """Per-image PSNR (data range 1), SSIM and MS-SSIM (TF's defaults, losses.py) of NHWC
    batches, as float64 arrays of length B; "ms_ssim" is None when the images are smaller
    than 5-scale MS-SSIM allows (losses.ms_ssim_applicable)."""
    import tensorflow as tf

    import losses

    enhanced = tf.convert_to_tensor(np.asarray(enhanced, np.float32))
    target = tf.convert_to_tensor(np.asarray(target, np.float32))
    ms_ssim = losses.ms_ssim_per_image(enhanced, target)
    return {"psnr": losses.psnr_per_image(enhanced, target).numpy().astype(np.float64),
            "ssim": losses.ssim_per_image(enhanced, target).numpy().astype(np.float64),
            "ms_ssim": None if ms_ssim is None else ms_ssim.numpy().astype(np.float64)}


def all_metrics(enhanced, target) -> dict:
    """image_metrics of the output as it is (unclipped, the reference's protocol) and, with
    the suffix "_8bit", of the output clipped and rounded to 8 bits."""
    scores = image_metrics(enhanced, target)
    scores.update({f"{k}_8bit": v for k, v in image_metrics(quantise_8bit(enhanced), target).items()})
    return scores


# ---------------------------------------------------------------------------------------
# the classical baseline

def _mosaic_from_packed(packed):
    """(B, h, w, 4) packed [B, Gb, R, Gr] / 1020 back to (B, 2h, 2w) 10-bit code values."""
    from load_dataset import RAW_SCALE

    packed = np.asarray(packed, np.float64) * RAW_SCALE
    batch, height, width, _ = packed.shape
    mosaic = np.empty((batch, 2 * height, 2 * width))
    mosaic[:, 1::2, 1::2] = packed[..., 0]
    mosaic[:, 0::2, 1::2] = packed[..., 1]
    mosaic[:, 0::2, 0::2] = packed[..., 2]
    mosaic[:, 1::2, 0::2] = packed[..., 3]
    return mosaic


def bilinear_demosaic(mosaic):
    """Bilinear demosaic of one RGGB mosaic (R at (0, 0)), H x W -> H x W x 3. Each colour is
    its samples convolved with the bilinear kernel; borders are mirrored, which keeps the
    colour pattern's phase."""
    from scipy import ndimage

    mosaic = np.asarray(mosaic, np.float64)
    rows, cols = np.indices(mosaic.shape)
    masks = (((rows % 2) == 0) & ((cols % 2) == 0),     # R
             (rows % 2) != (cols % 2),                   # G (both)
             ((rows % 2) == 1) & ((cols % 2) == 1))      # B
    red_blue = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]]) / 4.0
    green = np.array([[0, 1, 0], [1, 4, 1], [0, 1, 0]]) / 4.0
    planes = [ndimage.convolve(mosaic * mask, kernel, mode="mirror")
              for mask, kernel in zip(masks, (red_blue, green, red_blue))]
    return np.stack(planes, axis=-1)


def srgb_gamma(linear):
    """The sRGB transfer function of linear values in [0, 1]."""
    linear = np.clip(linear, 0.0, 1.0)
    return np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * np.power(linear, 1 / 2.4) - 0.055)


def baseline_isp(packed, black_level=BLACK_LEVEL, white_level=WHITE_LEVEL):
    """A classical ISP on packed inputs (B, h, w, 4) -> (B, 2h, 2w, 3) float32 in [0, 1]:
    black level, bilinear demosaic, gray-world white balance (R and B means scaled to G's),
    sRGB gamma. No colour matrix, denoising or tone curve: the floor PyNET should beat."""
    outputs = []
    for mosaic in _mosaic_from_packed(packed):
        linear = bilinear_demosaic((mosaic - black_level) / (white_level - black_level))
        means = np.maximum(linear.reshape(-1, 3).mean(axis=0), 1e-8)
        outputs.append(srgb_gamma(linear * (means[1] / means)))
    return np.stack(outputs).astype(np.float32)


# ---------------------------------------------------------------------------------------
# evaluation

def evaluate(predict, batches, total=None, progress=True) -> dict:
    """Score ``predict`` (packed batch -> output batch) on ``batches`` of (packed, target):
    a dict of per-image arrays (see all_metrics), in the order of the patches."""
    from tqdm import tqdm

    parts = {}
    with tqdm(total=total, unit="patch", desc="evaluating", disable=None if progress else True) as bar:
        for packed, target in batches:
            packed, target = np.asarray(packed), np.asarray(target)
            enhanced = np.asarray(predict(packed))
            if enhanced.shape != target.shape:
                raise UserError(f"output of shape {enhanced.shape[1:]} does not match the target's {target.shape[1:]}")
            for name, values in all_metrics(enhanced, target).items():
                parts.setdefault(name, []).append(values)
            bar.update(len(packed))
    return {name: None if any(v is None for v in values) else np.concatenate(values)
            for name, values in parts.items()}


def summary(scores, image_side=None) -> str:
    """The reference's line "PSNR: %.4g, MS-SSIM: %.4g" and the extra metrics."""
    def fmt(name):
        values = scores.get(name)
        return "n/a" if values is None else f"{float(np.mean(values)):.4g}"

    lines = [f"PSNR: {fmt('psnr')}, MS-SSIM: {fmt('ms_ssim')}",
             f"SSIM: {fmt('ssim')}",
             f"clipped to [0, 1] and rounded to 8 bits: PSNR: {fmt('psnr_8bit')}, MS-SSIM: {fmt('ms_ssim_8bit')}, "
             f"SSIM: {fmt('ssim_8bit')}"]
    if scores.get("ms_ssim") is None:
        size = f" ({image_side}x{image_side})" if image_side else ""
        lines.append(f"MS-SSIM: n/a: the level's images{size} are too small for 5-scale MS-SSIM "
                     f"(levels 0 and 1 of 224x224 patches are large enough)")
    return "\n".join(lines)


def write_csv(path: str, names, scores) -> None:
    """One line per patch: its file name and every metric (empty where not applicable)."""
    import io

    columns = list(METRICS) + [f"{name}_8bit" for name in METRICS]
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["patch"] + columns)
    for i, name in enumerate(names):
        writer.writerow([name] + ["" if scores[c] is None else f"{scores[c][i]:.6f}" for c in columns])
    utils.write_file(path, text.getvalue().encode())


def parse_arguments(argv) -> dict:
    return utils.parse_args(argv, ARGS, "evaluate_accuracy.py", __doc__.strip().splitlines()[0])


def main(argv):
    evaluate_and_report(parse_arguments(argv))


def evaluate_and_report(params) -> dict:
    """Score the model (or the baseline) that ``params`` name on the test split, print the
    reference's lines, and return the per-patch scores (see evaluate)."""
    utils.select_cpu_kernels(training=False)
    import load_dataset

    level, baseline = params["level"], params["model"] == "baseline"
    if baseline and level != 0:
        raise UsageError(f"model=baseline renders level 0 (full resolution) only, not level={level}")
    prefix = None if baseline else checkpoints.resolve(params)[0]
    if params["csv"]:
        utils.check_output_file(params["csv"], "csv")
        utils.remove_stale_temps(os.path.dirname(params["csv"]) or ".")
    print(load_dataset.describe_dataset(params["dataset_dir"]))
    indices = load_dataset.check_dataset(params["dataset_dir"], "test", deep=True)
    dataset, log = load_dataset.test_dataset(params["dataset_dir"], level, params["batch_size"],
                                             drop_remainder=False, indices=indices)
    if baseline:
        print(f"model: classical baseline ISP (black level {params['black_level']:g}, bilinear demosaic, "
              f"gray-world white balance, sRGB gamma)")
        predict = lambda packed: baseline_isp(packed, params["black_level"])  # noqa: E731
    else:
        from test_model import configure_devices

        configure_devices(params["use_gpu"])
        from model import PyNET

        model = PyNET(level=level)
        checkpoints.load_weights(model, prefix)
        print(f"model: {prefix}, level {level}")
        from render import level_function

        predict = level_function(model, level)
    scores = evaluate(predict, load_dataset.batches(dataset, log), total=len(indices))
    print(f"{len(indices)} test patches")
    print(summary(scores, load_dataset.target_size(level)))
    if params["csv"]:
        write_csv(params["csv"], [f"{i}.png" for i in indices], scores)
        print(f"per-patch scores: {params['csv']}")
    return scores


if __name__ == "__main__":
    sys.exit(utils.run(main))
