"""PSNR, SSIM and MS-SSIM of PyNET (or of a classical ISP) on the test split.

    python evaluate_accuracy.py                                  # the released weights, level 0 (the reference)
    python evaluate_accuracy.py orig=false level=1 restore_iter=35000
    python evaluate_accuracy.py model=baseline                   # what a plain ISP scores on the same patches
    python evaluate_accuracy.py csv=results/scores.csv           # one line per test patch
    python evaluate_accuracy.py dataset_dir=raw_images/mine/ align=true   # targets not pixel-aligned

The reference protocol: every patch of {dataset_dir}/test/ (huawei_raw/{i}.png against
canon/{i}.jpg), the network's output of the level *unclipped*, PSNR with data range 1 and
MS-SSIM (tf.image.ssim_multiscale, TF's defaults) per patch, averaged over the patches. The
same metrics are also given for the output clipped to [0, 1] and rounded to 8 bits, i.e. what
a saved picture scores, plus single-scale SSIM.

``align=true`` (not the reference's protocol) first moves each target onto the output by the
sub-pixel shift that phase correlation of their luminances finds, and crops the border the
shift invalidates from both: for your own camera's data (make_dataset.py), whose targets stay
a fraction of a pixel off the RAW, so that the score says how good the picture is rather than
how well the pair was aligned.
"""

import csv
import io
import os
import sys

import numpy as np
from scipy import ndimage
from skimage.filters import window
from skimage.registration import phase_cross_correlation
from tqdm import tqdm

import camera
import checkpoints
import cli
import files
import load_dataset
import process
import runtime
import utils
from cli import Arg, UsageError, UserError


def _default_orig(values):
    """true, unless restore_iter is given"""
    return values["restore_iter"] is None


ARGS = [
    Arg("model", str, "pynet", "pynet, or baseline: black level, bilinear demosaic, gray-world white balance, "
        "sRGB gamma (no network; level 0 only)", choices=("pynet", "baseline")),
    utils.level_arg(help="pyramid level whose output is scored against that level's target (0 = 448x448)"),
    Arg("orig", cli.BOOL, _default_orig, "score the authors' released weights, " + checkpoints.ORIGINAL_CHECKPOINT),
    utils.restore_iter_arg(),
    utils.dataset_dir_arg(),
    Arg("batch_size", int, 1, "patches per forward pass (every patch is scored, whatever the size)",
        check=cli.positive),
    Arg("csv", str, "", "also write one line per patch to this CSV file"),
    Arg("use_gpu", cli.BOOL, True, "run on the GPU when there is one"),
    Arg("models_dir", str, "models/", "folder of the trained checkpoints"),
    utils.precision_arg(),
    utils.force_bf16_arg(),
    Arg("align", cli.BOOL, False, "move each target onto the output by a sub-pixel shift (phase correlation of "
        "luminances) and crop the border it invalidates before scoring, for targets not pixel-aligned with the "
        "RAW; false = the reference's protocol"),
    Arg("black_level", float, camera.BLACK_LEVEL, "model=baseline: the sensor's black level, in code values",
        check=lambda v: None if 0 <= v < camera.WHITE_LEVEL else
        f"a value from 0 to below {camera.WHITE_LEVEL} (the sensor's code values)"),
]

METRICS = ("psnr", "ssim", "ms_ssim")


# ---------------------------------------------------------------------------------------
# metrics

def quantise_8bit(images):
    """What a saved 8-bit picture holds: clipped to [0, 1], rounded to 1/255 as images.to_uint."""
    return np.floor(np.clip(np.asarray(images, np.float64), 0.0, 1.0) * 255 + 0.5).astype(np.float32) / 255


def image_metrics(enhanced, target) -> dict:
    """Per-image PSNR (data range 1), SSIM and MS-SSIM (TF's defaults, losses.py) of NHWC
    batches, as float64 arrays of length B; "ms_ssim" is None when the images are smaller
    than 5-scale MS-SSIM allows (losses.ms_ssim_applicable)."""
    import tensorflow as tf  # here: the scripts that import this module make runtime's settings first

    import losses  # as TensorFlow, above

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
# a target moved onto the output (align=true)

LUMA = np.array([0.299, 0.587, 0.114])  # Rec. 601
ALIGN_PRECISION = 20  # phase correlation refined to 1/20 pixel
ALIGN_REACH = 8  # a shift beyond 1/8 of the side is no misalignment but a mismatch: left unaligned


def align_target(enhanced, target):
    """(output, target, shift) of one H x W x 3 image: the target moved onto the output by the
    sub-pixel shift (dy, dx) that phase correlation of their luminances finds (cubic spline),
    then both cropped by ceil(largest |shift|) pixels on every side, the border the shift
    invalidates. A shift beyond 1/ALIGN_REACH of the side leaves both as they are, shift NaN."""

    enhanced, target = np.asarray(enhanced, np.float64), np.asarray(target, np.float64)
    # A plain cross-correlation (whitening, normalization="phase", lets the outputs' noise outvote
    # their picture) of Hann-windowed luminances: the DFT's correlation is circular, and the
    # mismatch of opposite borders would pull the shift towards 0.
    taper = window("hann", target.shape[:2])
    lum = [(image @ LUMA - np.mean(image @ LUMA)) * taper for image in (enhanced, target)]
    shift = phase_cross_correlation(*lum, upsample_factor=ALIGN_PRECISION, normalization=None)[0]
    if np.abs(shift).max() > min(target.shape[:2]) / ALIGN_REACH:
        return enhanced, target, np.full(2, np.nan)
    moved = ndimage.shift(target, (*shift, 0), order=3, mode="nearest")
    border = int(np.ceil(np.abs(shift).max()))
    inside = (slice(border, target.shape[0] - border), slice(border, target.shape[1] - border))
    return enhanced[inside], moved[inside], shift


# ---------------------------------------------------------------------------------------
# evaluation

def evaluate(predict, batches, total=None, progress=True, align=False) -> dict:
    """Score ``predict`` (packed batch -> output batch) on ``batches`` of (packed, target):
    a dict of per-image arrays (see all_metrics), in the order of the patches; ``align``: each
    target moved onto its output first (align_target), the shifts under "shift" (N x 2)."""
    parts = {}
    with tqdm(total=total, unit="patch", desc="evaluating", disable=None if progress else True) as bar:
        for packed, target in batches:
            packed, target = np.asarray(packed), np.asarray(target)
            enhanced = np.asarray(predict(packed))
            if enhanced.shape != target.shape:
                raise UserError(f"output of shape {enhanced.shape[1:]} does not match the target's {target.shape[1:]}")
            pairs = [(enhanced, target)]
            if align:  # one image at a time: the crops differ
                moved = [align_target(e, t) for e, t in zip(enhanced, target)]
                pairs = [(e[None], t[None]) for e, t, _ in moved]
                parts.setdefault("shift", []).append(np.array([s for _, _, s in moved]))
            for output, goal in pairs:
                for name, values in all_metrics(output, goal).items():
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
    if "shift" in scores:
        lines.append(alignment_line(scores["shift"]))
    return "\n".join(lines)


def alignment_line(shifts) -> str:
    """What align=true did: the shifts found and the patches left as they were."""
    found = np.hypot(*np.asarray(shifts, np.float64).reshape(-1, 2).T)
    moved = found[np.isfinite(found)]
    line = ("align=true (not the reference's protocol): each target moved onto its output by a sub-pixel shift "
            "(phase correlation) and the border it invalidates cropped from both; ")
    line += f"shift mean {moved.mean():.2f} px, largest {moved.max():.2f} px" if moved.size else "no patch moved"
    unmoved = len(found) - len(moved)
    return line + (f"; {unmoved} patch(es) left unaligned (shift above 1/{ALIGN_REACH} of the side: output and "
                   f"target do not correspond)" if unmoved else "")


def write_csv(path: str, names, scores) -> None:
    """One line per patch: its file name and every metric (empty where not applicable)."""
    columns = list(METRICS) + [f"{name}_8bit" for name in METRICS]
    shifts = scores.get("shift")
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["patch"] + columns + (["shift_y", "shift_x"] if shifts is not None else []))
    for i, name in enumerate(names):
        row = [name] + ["" if scores[c] is None else f"{scores[c][i]:.6f}" for c in columns]
        writer.writerow(row + ([f"{v:.3f}" for v in shifts[i]] if shifts is not None else []))
    files.write_file(path, text.getvalue().encode())


def parse_arguments(argv) -> dict:
    """The arguments, refusing those that do not apply to the model chosen."""
    args = cli.parse_args(argv, ARGS, "evaluate_accuracy.py", __doc__.strip().splitlines()[0])
    if args["model"] == "baseline":
        if args["level"] != 0:
            raise UsageError(f"model=baseline renders level 0 (full resolution) only, not level={args['level']}")
        for key, default in (("restore_iter", None), ("models_dir", "models/"), ("precision", "fp32")):
            if args[key] != default:
                raise UsageError(f"{key}={cli.shown(str(args[key]))}: applies to the network, which model=baseline "
                                 f"does not use")
    elif args["black_level"] != camera.BLACK_LEVEL:
        raise UsageError(f"black_level={args['black_level']:g}: applies to model=baseline only (the network "
                         f"learned its own)")
    return args


def main(argv):
    evaluate_and_report(parse_arguments(argv))


def predictor(args):
    """The function scored, packed batch -> output batch: the baseline ISP, or the checkpoint's
    network. Imports TensorFlow's modules: runs after runtime's settings."""
    if args["model"] == "baseline":
        print(f"model: classical baseline ISP (black level {args['black_level']:g}, bilinear demosaic, "
              f"gray-world white balance, sRGB gamma)")
        return lambda packed: process.baseline_isp(packed, args["black_level"])
    from render import level_function  # here: it starts TensorFlow, after runtime's settings

    prefix = checkpoints.resolve(args)[0]
    runtime.configure_devices(args["use_gpu"])
    runtime.check_precision(args["precision"], args["force_bf16"])
    model = checkpoints.load_model(args["level"], prefix, args["precision"])
    print(f"model: {prefix}, level {args['level']}, precision {args['precision']}")
    return level_function(model, args["level"])


def evaluate_and_report(args) -> dict:
    """Score the model (or the baseline) that ``args`` name on the test split, print the
    reference's lines, and return the per-patch scores (see evaluate)."""
    level = args["level"]
    if args["model"] != "baseline":
        checkpoints.resolve(args)  # a missing checkpoint is said before anything is read
    if args["csv"]:
        files.check_output_file(args["csv"], "csv")
        files.remove_stale_temps(os.path.dirname(args["csv"]) or ".")
    runtime.select_cpu_kernels(training=False)
    runtime.start_tensorflow()
    import data_pipeline  # here: it starts TensorFlow, after runtime's settings

    print(load_dataset.describe_dataset(args["dataset_dir"]))
    indices = load_dataset.check_dataset(args["dataset_dir"], "test", deep=True)
    dataset, log = data_pipeline.test_dataset(args["dataset_dir"], level, args["batch_size"],
                                              drop_remainder=False, indices=indices)
    predict = predictor(args)
    scores = evaluate(predict, data_pipeline.batches(dataset, log), total=len(indices), align=args["align"])
    print(f"{len(indices)} test patches")
    print(summary(scores, load_dataset.target_size(level)))
    if args["csv"]:
        write_csv(args["csv"], [f"{i}.png" for i in indices], scores)
        print(f"per-patch scores: {args['csv']}")
    return scores


if __name__ == "__main__":
    sys.exit(cli.run(main))
