"""Quality of precision=bf16 against fp32 (benchmarks/README.md, "bfloat16").

    python benchmarks/bench_precision.py parts=render checkpoint=models/quickstart/pynet_level_0_iteration_325.ckpt \
        dataset_dir=raw_images/sample/
    python benchmarks/bench_precision.py parts=train dataset_dir=raw_images/sample/ seeds=0,1,2

* render: a trained level-0 checkpoint renders every full-resolution mosaic of the dataset and
  its test patches in fp32 and in bf16 (render.render, as test_model.py); per picture and in all:
  the PSNR of the bf16 picture against the fp32 one, their largest difference, the share of
  8-bit pixels within one level of fp32's, and each precision's PSNR against the target where
  the dataset has one (the sample's photos, the test patches' DSLR JPEGs).
* train: levels 5 and 0 trained from the same start in fp32 and in bf16, for each seed
  (train_model.py's trainer, the reference's loss: level 0 with the VGG-19 content and SSIM
  terms, a VGG-19 of random weights in the real file's layout standing in for the .mat): the
  test loss and PSNR at every evaluation, per precision and seed, and the spread between seeds.

Everything runs in this process on this machine's CPU; without bfloat16 units bf16 is emulated
(slow, same numbers). Results are also written as JSON with ``json=``.
"""

import functools
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import cli  # noqa: E402
import files  # noqa: E402
import runtime  # noqa: E402

print = functools.partial(print, flush=True)  # noqa: A001 (long runs: show each line as it comes)

SPEC = [
    cli.Arg("parts", str, "render", "what to measure: render, train (comma-separated)"),
    cli.Arg("checkpoint", str, "", "render: a trained level-0 checkpoint (e.g. the quick start's)"),
    cli.Arg("dataset_dir", str, "raw_images/sample/", "the dataset (test/huawei_full_resolution/, test/)"),
    cli.Arg("patches", int, 16, "render: test patches rendered besides the full-resolution mosaics",
            check=cli.non_negative),
    cli.Arg("seeds", str, "0,1,2", "train: seeds (comma-separated)", check=lambda text: integers(text, None)),
    cli.Arg("steps", str, "300,150", "train: iterations at level 5 and at level 0 (0: leave the level out)",
            check=lambda text: integers(text, 2)),
    cli.Arg("eval_step", int, 25, "train: iterations between evaluations", check=cli.positive),
    cli.Arg("patch_size", int, 32, "train: packed crop side (a multiple of 16)", check=cli.patch_size_check),
    cli.Arg("json", str, "", "also write the results to this JSON file"),
]


def integers(text, count):
    """None if ``text`` is comma-separated whole numbers (``count`` of them, if given), else what is expected."""
    parts = text.split(",")
    if all(p.strip().isascii() and p.strip().isdigit() for p in parts) and count in (None, len(parts)):
        return None
    return f"{count} comma-separated whole numbers" if count else "comma-separated whole numbers"


def psnr(a, b):
    import numpy as np

    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def render_pairs(args):
    """[(name, mosaic, target or None)] the render part scores."""
    import numpy as np
    from PIL import Image

    import images
    import load_dataset
    import make_sample_dataset

    pairs = []
    full = os.path.join(args["dataset_dir"], "test", load_dataset.FULL_RES_FOLDER)
    for name in sorted(os.listdir(full)) if os.path.isdir(full) else []:
        target_path = os.path.join(args["dataset_dir"], "test", make_sample_dataset.FULL_RES_TARGET_FOLDER, name)
        target = None
        if os.path.isfile(target_path):
            with Image.open(target_path) as picture:
                target = np.asarray(picture.convert("RGB"))
        pairs.append((name, images.read_mosaic(os.path.join(full, name)), target))
    for index in load_dataset.check_dataset(args["dataset_dir"], "test", verbose=False)[:args["patches"]]:
        raw_path, target_path = load_dataset.patch_paths(args["dataset_dir"], "test", index)
        pairs.append((os.path.basename(raw_path), load_dataset.read_raw_patch(raw_path),
                      load_dataset.read_target_image(target_path)))
    return pairs


def measure_render(args):
    import numpy as np

    import checkpoints
    import images
    import render

    if not args["checkpoint"]:
        raise cli.UsageError("parts=render needs checkpoint= (a trained level-0 checkpoint)")
    models = {precision: checkpoints.load_model(0, args["checkpoint"], precision) for precision in ("fp32", "bf16")}
    rows, within, pixels = [], 0, 0
    print(f"rendering in fp32 and bf16 with {args['checkpoint']}:")
    for name, mosaic, target in render_pairs(args):
        pictures = {precision: render.render(model, mosaic, 0) for precision, model in models.items()}
        eight = {precision: images.to_uint(picture).astype(np.int16) for precision, picture in pictures.items()}
        close = int(np.count_nonzero(np.abs(eight["bf16"] - eight["fp32"]) <= 1))
        within, pixels = within + close, pixels + eight["fp32"].size
        row = {"name": name, "shape": list(mosaic.shape), "psnr_bf16_vs_fp32": psnr(pictures["bf16"], pictures["fp32"]),
               "max_difference": float(np.abs(pictures["bf16"] - pictures["fp32"]).max()),
               "within_one_level": close / eight["fp32"].size}
        if target is not None:
            for precision, picture in pictures.items():
                row[f"psnr_{precision}_vs_target"] = psnr(np.clip(picture, 0, 1), target / 255.0)
        rows.append(row)
        against = (f", against the target: fp32 {row['psnr_fp32_vs_target']:.2f} dB, bf16 "
                   f"{row['psnr_bf16_vs_target']:.2f} dB" if target is not None else "")
        print(f"  {name:<28} {mosaic.shape[1]}x{mosaic.shape[0]}: bf16 vs fp32 {row['psnr_bf16_vs_fp32']:.1f} dB, max "
              f"{row['max_difference']:.4f}, 8-bit within one level {100 * row['within_one_level']:.2f}%{against}")
    worst = min(row["psnr_bf16_vs_fp32"] for row in rows)
    print(f"  all {len(rows)} pictures: bf16 vs fp32 at least {worst:.1f} dB; 8-bit pixels within one level "
          f"{100 * within / pixels:.3f}%")
    return {"pictures": rows, "worst_psnr": worst, "within_one_level": within / pixels}


def measure_train(args):
    """Levels 5 then 0, per seed and precision, from the same start; the logged test curves."""
    import tempfile

    import numpy as np

    import checkpoints
    import train_model
    import trainer
    from helpers import random_vgg_weights, write_matconvnet_vgg
    from model import PyNET

    seeds = [int(s) for s in args["seeds"].split(",")]
    steps5, steps0 = (int(s) for s in args["steps"].split(","))
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_precision_") as folder:
        vgg = os.path.join(folder, "imagenet-vgg-verydeep-19.mat")
        write_matconvnet_vgg(vgg, random_vgg_weights(0))
        for precision in ("fp32", "bf16"):
            model = PyNET(precision=precision)
            start = [v.numpy() for v in PyNET().weights]  # the reference's initial weights, the same for all
            for seed in seeds:
                model.set_weights(start)
                run = os.path.join(folder, f"{precision}_{seed}")
                curves = {}
                for level, iters in ((5, steps5), (0, steps0)):
                    if iters == 0:  # steps=N,0: level 5 alone (level 0 in emulated bf16 takes hours)
                        continue
                    argv = [f"level={level}", f"dataset_dir={args['dataset_dir']}", f"models_dir={run}/models",
                            f"results_dir={run}/results", f"patch_size={args['patch_size']}", "batch_size=2",
                            "eval_batch_size=2",
                            f"num_train_iters={iters}", f"eval_step={args['eval_step']}", f"seed={seed}",
                            f"vgg_dir={vgg}", f"precision={precision}", "force_bf16=true", "progress=false",
                            "tensorboard=false", "learning_rate=1e-4"]
                    if level == 0:  # straight from level 5 (the levels between are not the question here)
                        argv.append(f"init_from={checkpoints.checkpoint_prefix(f'{run}/models', 5, steps5)}")
                    job = trainer.Trainer(train_model.parse_arguments(argv), model=model, out=lambda *a: None)
                    job.run()
                    curves[level] = read_curve(os.path.join(run, "models", "logs.txt"))
                results.append({"precision": precision, "seed": seed, "curves": curves})
                finals = ", ".join(f"level {level}: test loss {c[-1]['test']:.4g}, PSNR {c[-1]['psnr']:.2f} dB"
                                   for level, c in curves.items())
                print(f"  {precision} seed {seed}: {finals}")
    for level in (level for level, iters in ((5, steps5), (0, steps0)) if iters):
        for precision in ("fp32", "bf16"):
            final = [r["curves"][level][-1]["psnr"] for r in results if r["precision"] == precision]
            print(f"  level {level} {precision}: final PSNR {np.mean(final):.2f} dB, seeds from {min(final):.2f} "
                  f"to {max(final):.2f}")
    return results


def read_curve(path):
    """[{"step", "test", "psnr"}] of a logs.txt (the reference's line)."""
    import re

    curve = []
    for line in open(path):
        match = re.match(r"step (\d+) \| training: \S+, test: (\S+) \| .*psnr: ([\d.]+)", line)
        if match:
            curve.append({"step": int(match.group(1)), "test": float(match.group(2)), "psnr": float(match.group(3))})
    return curve


def main(argv):
    args = cli.parse_args(argv, SPEC, "benchmarks/bench_precision.py", __doc__.strip().splitlines()[0])
    parts = [p.strip() for p in args["parts"].split(",") if p.strip()]
    if not parts or set(parts) - {"render", "train"}:
        raise cli.UsageError(f"parts={args['parts']}: expected render and/or train")
    runtime.select_cpu_kernels(training="train" in parts, smallest_batch=1)
    tf = runtime.start_tensorflow()
    import keras

    print(f"machine: {runtime.cpu_model()}, {os.cpu_count()} cores, bfloat16 units "
          f"{runtime.bf16_units() or 'none (bf16 emulated)'}, TensorFlow {tf.__version__}, Keras {keras.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}")
    results = {}
    if "render" in parts:
        results["render"] = measure_render(args)
    if "train" in parts:
        results["train"] = measure_train(args)
    if args["json"]:
        files.write_file(args["json"], json.dumps(results, indent=1).encode())


if __name__ == "__main__":
    sys.exit(cli.run(main))
