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
import io
import os
import sys

import numpy as np
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
# evaluation

def evaluate(predict, batches, total=None, progress=True) -> dict:
    """Score ``predict`` (packed batch -> output batch) on ``batches`` of (packed, target):
    a dict of per-image arrays (see all_metrics), in the order of the patches."""
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
    columns = list(METRICS) + [f"{name}_8bit" for name in METRICS]
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["patch"] + columns)
    for i, name in enumerate(names):
        writer.writerow([name] + ["" if scores[c] is None else f"{scores[c][i]:.6f}" for c in columns])
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
    from render import level_function

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
    scores = evaluate(predict, data_pipeline.batches(dataset, log), total=len(indices))
    print(f"{len(indices)} test patches")
    print(summary(scores, load_dataset.target_size(level)))
    if args["csv"]:
        write_csv(args["csv"], [f"{i}.png" for i in indices], scores)
        print(f"per-patch scores: {args['csv']}")
    return scores


if __name__ == "__main__":
    sys.exit(cli.run(main))
