"""Quick start: the whole PyNET pipeline end to end on a synthetic sample dataset, on a CPU.

    python quickstart.py

1. builds a small sample dataset in the ZRR layout from photographs scikit-image ships
   (make_sample_dataset.py; it is synthetic, NOT the ZRR dataset),
2. trains every level 5 -> 0 on the quick start's own short schedule (train_model.py; printed
   beside the paper's),
3. renders the sample's full-resolution mosaic at level 0 (test_model.py) and writes a comparison
   beside it: classical ISP | PyNET | the original photo,
4. scores PyNET and the classical baseline ISP on the sample's test split (evaluate_accuracy.py),
and prints where everything went. Each step prints the equivalent command line of the script it
runs. Checkpoints go to models/quickstart/, away from real runs; running it again replaces them,
unless that folder holds checkpoints the quick start did not write (training continued there):
then it stops and names them (overwrite=true deletes them).
"""

import os
import sys
import time

import numpy as np
from PIL import Image, ImageDraw

import camera
import checkpoints
import cli
import evaluate_accuracy
import files
import images
import load_dataset
import make_sample_dataset
import process
import runtime
import test_model
import train_model
import utils
import vgg
from cli import Arg, UserError

# The quick start's own schedule, not the paper's (README, "The real thing", step 4): He-normal
# initial weights, the MSE loss alone, a higher learning rate, small crops, and most of the time
# at level 0, the one the photo and the PSNR come from. Levels 4 to 1 take one step each:
# train_model.py starts every level from the one above it, and training level 0 trains the
# variables of every level anyway (the whole network computes it). Level 5 first, cheap, gives
# the coarse levels a start on the global colour. Level 0 then runs in two phases, the second
# resuming the first (train_model.py resume=true): at 3e-4 the PSNR rises fastest but does not
# stay stable for long, so the rate drops to 1e-4 for the last steps, on larger crops, whose
# instance-norm statistics at levels 2 to 5 are closer to a whole patch's. Each choice was
# measured against its alternatives: benchmarks/README.md, "Quick start".
# (level, num_train_iters, packed crop side, batch size, learning rate); a level's later rows
# resume it up to their num_train_iters
QUICK_SCHEDULE = ((5, 50, 64, 8, 3e-4), (4, 0, 32, 2, 3e-4), (3, 0, 32, 2, 3e-4), (2, 0, 32, 2, 3e-4),
                  (1, 0, 32, 2, 3e-4), (0, 200, 32, 4, 3e-4), (0, 325, 64, 1, 1e-4))
# With bfloat16 units (precision=auto picks bf16 there) a step takes a fraction of its float32
# time: the time saved goes to more steps of the last phase, at its stable rate.
BF16_EXTRA_STEPS = 250
QUICK_INIT, QUICK_LOSS = "he", "mse"
PAPER_LEARNING_RATE = 5e-5

ARGS = [
    Arg("dataset_dir", str, "raw_images/sample/", "where the sample dataset is built (reused if it is there)"),
    Arg("models_dir", str, "models/quickstart/", "checkpoints and logs of the quick start"),
    Arg("results_dir", str, "results/quickstart/", "visual results of training"),
    Arg("render_dir", str, "results/full-resolution/", "where the rendered photo and the comparison go"),
    Arg("vgg_dir", str, "vgg_pretrained/imagenet-vgg-verydeep-19.mat",
        "VGG-19 for the content loss of levels 3..0 with loss=reference; trained without it (with a warning) "
        "when absent"),
    Arg("iters", cli.OPTIONAL_INT, None, "training iterations of every level (and of each resumed phase of "
        "level 0; 0 = none); none = the quick-start schedule's", check=cli.non_negative),
    Arg("patch_size", cli.OPTIONAL_INT, None, "side of the packed training crops (multiple of 16) at every "
        "level; none = the quick-start schedule's", check=cli.patch_size_check),
    Arg("batch_size", cli.OPTIONAL_INT, None, "training batch size at every level; none = the quick-start "
        "schedule's", check=cli.positive),
    Arg("learning_rate", cli.OPTIONAL_FLOAT, None, "Adam learning rate of every level and phase (the paper: "
        "5e-5); none = the quick-start schedule's", check=cli.positive),
    Arg("init", str, QUICK_INIT, "initial weights (train_model.py init=): he = He-normal, reference = the "
        "paper's N(0, 0.01)", choices=utils.INITS),
    Arg("loss", str, QUICK_LOSS, "loss of every level (train_model.py loss=): mse = the MSE term alone, "
        "reference = the paper's (with VGG-19 content and SSIM terms)", choices=utils.LOSSES),
    Arg("overwrite", cli.BOOL, False, "delete the checkpoints in models_dir that the quick start did not write "
        "(training continued there) instead of stopping"),
    Arg("precision", str, "auto", "compute precision of training and rendering: auto = bf16 where the CPU has "
        "bfloat16 units (then with more level-0 steps), else fp32", choices=("auto",) + utils.PRECISIONS),
    Arg("seed", int, 0, "random seed of the sample dataset and of training"),
    Arg("train", int, 64, "training patches in the sample dataset", check=cli.positive),
    Arg("test", int, 16, "test patches in the sample dataset (the PSNR is their mean)", check=cli.positive),
    Arg("full_height", int, 384, "height of the sample's full-resolution mosaic", check=cli.positive),
    Arg("full_width", int, 256, "width of the sample's full-resolution mosaic", check=cli.positive),
]


def schedule(args) -> list:
    """[(level, num_train_iters, crop, batch, learning rate, resume)]: the quick-start schedule
    with the overrides given. ``iters=N`` gives every level N iterations and each resumed phase N
    more (none when N is 0)."""
    rows, seen = [], {}
    extra = BF16_EXTRA_STEPS if args.get("precision") == "bf16" and args["iters"] is None else 0
    for number, (level, iters, patch, batch, rate) in enumerate(QUICK_SCHEDULE, 1):
        iters += extra if number == len(QUICK_SCHEDULE) else 0
        resume = level in seen
        if args["iters"] is not None:
            iters = seen.get(level, 0) + args["iters"] if resume else args["iters"]
            if resume and not args["iters"]:
                continue
        seen[level] = iters
        rows.append((level, iters, patch if args["patch_size"] is None else args["patch_size"],
                     batch if args["batch_size"] is None else args["batch_size"],
                     rate if args["learning_rate"] is None else args["learning_rate"], resume))
    return rows


def describe_schedule(args, vgg_dir: str) -> str:
    """The schedule beside the paper's, saying where and why it departs from it."""
    rows = schedule(args)
    departures = ["fewer iterations, smaller crops and batches",
                  "learning rates " + " then ".join(f"{r:g}" for r in dict.fromkeys(row[4] for row in rows))
                  + f" instead of {PAPER_LEARNING_RATE:g}"]
    if args["init"] == "he":
        departures.append("He-normal initial weights instead of N(0, 0.01)")
    if args["loss"] == "mse":
        departures.append("the MSE loss alone instead of MSE + VGG-19 content at levels 3..1 and "
                          "MSE + VGG-19 content + SSIM at level 0")
    elif vgg_dir == "none":
        departures.append("no VGG-19 content loss at levels 3..0")
    lines = [f"quick-start schedule (NOT the paper's: {'; '.join(departures)}):",
             "  level  iterations  crop (packed)  batch  learning rate  |  paper: iterations  batch  crop"]
    for level, iters, patch, batch, rate, resume in rows:
        paper_iters, paper_batch = utils.NUM_DEFAULT_TRAIN_ITERS[level], utils.REFERENCE_BATCH_SIZES[level]
        steps = f"to {iters + 1}" if resume else f"{iters + 1}"
        lines.append(f"  {level:>5}  {steps:>10}  {patch:>13}  {batch:>5}  {rate:>13g}  |  "
                     + ("(resumed)" if resume else f"{paper_iters + 1:>17}  {paper_batch:>5}  224"))
    lines.append("  (iterations as train_model.py counts them: num_train_iters + 1 steps)")
    return "\n".join(lines)


def chosen_precision(precision: str, out=print) -> str:
    """precision=auto: bf16 where this CPU has bfloat16 units, saying so; else fp32. A precision
    given is checked as the scripts check it (runtime.check_precision)."""
    if precision == "auto":
        units = runtime.bf16_units()
        if units:
            out(f"precision: bf16 (this CPU has bfloat16 units, {units}): faster, so level 0 takes "
                f"{BF16_EXTRA_STEPS} more steps")
        return "bf16" if units else "fp32"
    runtime.check_precision(precision, out=out)
    return precision


def training_vgg(args, out=print) -> str:
    """The vgg_dir= the levels train with: none when the loss has no content term, or (with a
    warning) when the file is absent."""
    if args["loss"] != "reference":
        return "none"
    try:
        return vgg.weights_file(args["vgg_dir"])  # a folder holding the file counts as the file
    except cli.UserError:
        out(f"WARNING: {args['vgg_dir']} is absent, so levels 3 to 0 train WITHOUT the VGG-19 content loss "
            f"(vgg_dir=none), unlike the reference. See README, 'The real thing', for the file.")
        return "none"


# ---------------------------------------------------------------------------------------
# what the quick start wrote in its models_dir, so that running it again deletes nothing else

RECORD = ".quickstart"  # in models_dir: lines "level iteration", how far the quick start trained each level


def recorded_extent(models_dir: str) -> dict:
    """{level: the last iteration the quick start trained it to in ``models_dir``}."""
    path = os.path.join(models_dir, RECORD)
    if not files.exists(path):
        return {}
    extent = {}
    for line in files.read_bytes(path).decode("utf-8", "replace").splitlines():
        fields = line.split()
        if len(fields) == 2 and all(f.isdigit() for f in fields):
            extent[int(fields[0])] = max(extent.get(int(fields[0]), -1), int(fields[1]))
    return extent


def record_extent(models_dir: str, level: int, iteration: int) -> None:
    """Note, before it trains, that the quick start trains ``level`` up to ``iteration``: its
    checkpoints, even those of a run killed on the way, are then the quick start's own."""
    extent = recorded_extent(models_dir)
    extent[level] = max(extent.get(level, -1), iteration)
    text = "".join(f"{lvl} {it}\n" for lvl, it in sorted(extent.items()))
    files.write_file(os.path.join(models_dir, RECORD), text.encode())


def foreign_checkpoints(models_dir: str) -> list:
    """The checkpoints in ``models_dir`` beyond what the quick start recorded training there."""
    extent = recorded_extent(models_dir)
    return [os.path.basename(checkpoints.checkpoint_prefix(models_dir, level, i)) for level in utils.LEVELS
            for i in checkpoints.checkpoint_iterations(level, models_dir) if i > extent.get(level, -1)]


def check_models_dir(args) -> None:
    """Every level's run deletes the level's checkpoints in models_dir (overwrite=true): refuse,
    naming them, when some are not the quick start's, unless the user says overwrite=true."""
    foreign = foreign_checkpoints(args["models_dir"])
    if foreign and not args["overwrite"]:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UserError(f"{args['models_dir']} holds checkpoints the quick start did not write ({shown}): training "
                        f"continued there, which running the quick start again would delete; move them to another "
                        f"folder to keep them, or give overwrite=true to delete them and start afresh")


def sample_dataset_argv(args) -> list:
    return [f"output_dir={args['dataset_dir']}", f"train={args['train']}", f"test={args['test']}", "full=1",
            f"full_height={args['full_height']}", f"full_width={args['full_width']}", f"seed={args['seed']}"]


def train_argv(args, row, vgg_dir: str) -> list:
    """train_model.py's arguments for one row of schedule()."""
    level, iters, patch, batch, rate, resume = row
    return [f"level={level}", f"dataset_dir={args['dataset_dir']}", f"models_dir={args['models_dir']}",
            f"results_dir={args['results_dir']}", f"patch_size={patch}", f"batch_size={batch}",
            f"train_size={args['train']}", f"eval_batch_size={min(batch, args['test'])}",
            f"learning_rate={rate:g}", f"num_train_iters={iters}", f"eval_step={max(iters, 1)}",
            f"seed={args['seed']}", f"init={args['init']}", f"loss={args['loss']}", f"vgg_dir={vgg_dir}",
            f"precision={args['precision']}", "progress=false", "resume=true" if resume else "overwrite=true"]


def render_argv(args) -> list:
    return ["level=0", f"dataset_dir={args['dataset_dir']}", f"models_dir={args['models_dir']}",
            f"output_dir={args['render_dir']}", f"precision={args['precision']}"]


def evaluate_argv(args, model: str = "pynet") -> list:
    if model == "baseline":
        return ["model=baseline", f"dataset_dir={args['dataset_dir']}"]
    return ["orig=false", "level=0", f"dataset_dir={args['dataset_dir']}", f"models_dir={args['models_dir']}",
            f"precision={args['precision']}"]


LABEL_HEIGHT = 24  # pixels of the caption band above each panel of the comparison


def labelled_row(panels):
    """[(caption, H x W x 3 uint8)] of one size -> one uint8 image: the panels side by side,
    each under a white band with its caption (Pillow's default font)."""
    height, width = panels[0][1].shape[:2]
    canvas = Image.new("RGB", (width * len(panels), height + LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (caption, image) in enumerate(panels):
        canvas.paste(Image.fromarray(image), (k * width, LABEL_HEIGHT))
        draw.text((k * width + 4, 4), caption, fill="black")
    return np.asarray(canvas)


def photo_psnr(image, target) -> float:
    """PSNR of one 8-bit picture against another (data range 1), as evaluate_accuracy scores."""
    return float(evaluate_accuracy.image_metrics(image[None] / 255.0, target[None] / 255.0)["psnr"][0])


def write_comparison(mosaic_path: str, rendered_path: str, target_path: str) -> str:
    """classical ISP | PyNET | target of one full-resolution mosaic, each with its PSNR against
    the target, written beside the rendered photo. Returns its path."""
    mosaic = test_model.read_checked_mosaic(mosaic_path)
    classical = images.to_uint(process.baseline_isp(camera.extract_bayer_channels(mosaic)[None])[0])
    with Image.open(rendered_path) as image:
        pynet = np.asarray(image.convert("RGB"))
    with Image.open(target_path) as image:
        target = np.asarray(image.convert("RGB"))
    row = labelled_row([(f"classical ISP: {photo_psnr(classical, target):.2f} dB", classical),
                        (f"PyNET: {photo_psnr(pynet, target):.2f} dB", pynet),
                        ("target (the original photo)", target)])
    path = os.path.splitext(rendered_path)[0] + "_comparison.png"
    images.write_png(path, row)
    return path


def compare_renders(args) -> list:
    """write_comparison for each full-resolution mosaic of the sample that was rendered; the
    paths written."""
    iteration = checkpoints.get_last_iter(0, args["models_dir"])
    folder = os.path.join(args["dataset_dir"], "test", load_dataset.FULL_RES_FOLDER)
    written = []
    for mosaic_path in test_model.list_mosaics(folder):
        name = os.path.basename(mosaic_path)
        target = os.path.join(args["dataset_dir"], "test", make_sample_dataset.FULL_RES_TARGET_FOLDER, name)
        if not os.path.isfile(target):
            print(f"note: {target} is absent (a sample made by an older make_sample_dataset.py): no comparison "
                  f"for {name}; delete {args['dataset_dir']} to rebuild it")
            continue
        rendered = test_model.output_path(args["render_dir"], mosaic_path, 0, iteration)
        written.append(write_comparison(mosaic_path, rendered, target))
    return written


def announce(title: str, script: str, argv: list) -> float:
    print(f"\n=== {title}\n$ python {script} {' '.join(argv)}", flush=True)
    return time.time()


def done(start: float) -> None:
    print(f"=== done in {time.time() - start:.0f} s", flush=True)


def train_all_levels(args, vgg_dir: str) -> None:
    """Levels 5 -> 0 as train_model.py's command lines would run them, in this one process with
    one model: building the 47.5M-parameter graph and importing TensorFlow once, not six times,
    is a good share of a ten-minute budget on a small CPU."""
    import trainer  # here, as the model: they start TensorFlow, after runtime's settings
    from model import PyNET

    model = None
    for row in schedule(args):
        argv = train_argv(args, row, vgg_dir)
        start = announce(f"train level {row[0]}" + (" (resumed)" if row[5] else ""), "train_model.py", argv)
        level_args = train_model.parse_arguments(argv)
        record_extent(args["models_dir"], row[0], row[1])
        if model is None:
            train_model.configure(level_args)
            model = PyNET(init=args["init"], precision=args["precision"])
        trainer.Trainer(level_args, model=model).run()
        done(start)


def main(argv):
    args = cli.parse_args(argv, ARGS, "quickstart.py", __doc__.strip().splitlines()[0])
    began = time.time()
    check_models_dir(args)
    # one process trains and then renders single photos: the choice must suit both
    runtime.select_cpu_kernels(training=True, smallest_batch=1)
    runtime.start_tensorflow()
    args["precision"] = chosen_precision(args["precision"])
    vgg_dir = training_vgg(args)

    if os.path.isdir(os.path.join(args["dataset_dir"], "train")):
        print(f"\n=== reusing the sample dataset in {args['dataset_dir']}")
    else:
        start = announce("build the sample dataset", "make_sample_dataset.py", sample_dataset_argv(args))
        make_sample_dataset.main(sample_dataset_argv(args))
        done(start)

    print(load_dataset.describe_dataset(args["dataset_dir"]))
    import tensorflow as tf  # started by runtime.start_tensorflow above

    # Each level's trainer compiles its own steps in this one process, by design; TensorFlow
    # counts those as one function retraced in a loop and warns at level 1. Errors still show.
    tf.get_logger().setLevel("ERROR")
    print("\n" + describe_schedule(args, vgg_dir), flush=True)
    train_all_levels(args, vgg_dir)

    start = announce("render the full-resolution mosaic at level 0", "test_model.py", render_argv(args))
    test_model.main(render_argv(args))
    comparisons = compare_renders(args)
    done(start)
    scores = {}
    for model, what in (("pynet", "PyNET"), ("baseline", "the classical baseline ISP")):
        start = announce(f"evaluate {what} at level 0 on the test split", "evaluate_accuracy.py",
                         evaluate_argv(args, model))
        scores[model] = float(evaluate_accuracy.evaluate_and_report(
            evaluate_accuracy.parse_arguments(evaluate_argv(args, model)))["psnr"].mean())
        done(start)
    print(summary(args, time.time() - began, comparisons, scores))


def summary(args, seconds: float, comparisons: list, scores: dict) -> str:
    lines = [f"\nQuick start finished in {seconds:.0f} s.",
             f"  sample dataset (synthetic, not ZRR): {args['dataset_dir']}",
             f"  checkpoints and logs.txt:            {args['models_dir']}",
             f"  training visuals:                    {args['results_dir']}",
             f"  rendered photo:                      {args['render_dir']}"]
    lines += [f"  comparison (classical ISP | PyNET | target): {path}" for path in comparisons]
    lines.append(f"  PSNR on the sample's test split at level 0: PyNET {scores['pynet']:.2f} dB, "
                 f"classical baseline ISP {scores['baseline']:.2f} dB")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(cli.run(main))
