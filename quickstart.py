"""Quick start: the whole PyNET pipeline end to end on a synthetic sample dataset, on a CPU.

    python quickstart.py

1. builds a small sample dataset in the ZRR layout from photographs scikit-image ships
   (make_sample_dataset.py; it is synthetic, NOT the ZRR dataset),
2. trains every level 5 -> 0 on a short schedule with small patches (train_model.py),
3. renders the sample's full-resolution mosaic at level 0 (test_model.py),
4. reports PSNR / MS-SSIM on the sample's test split (evaluate_accuracy.py),
and prints where everything went. Each step prints the equivalent command line of the script it
runs. Checkpoints go to models/quickstart/, away from real runs; running it again replaces them.
"""

import os
import sys
import time

import utils
from utils import Arg, UserError

ARGS = [
    Arg("dataset_dir", str, "raw_images/sample/", "where the sample dataset is built (reused if it is there)"),
    Arg("models_dir", str, "models/quickstart/", "checkpoints and logs of the quick start"),
    Arg("results_dir", str, "results/quickstart/", "visual results of training"),
    Arg("render_dir", str, "results/full-resolution/", "where the rendered photo goes"),
    Arg("vgg_dir", str, "vgg_pretrained/imagenet-vgg-verydeep-19.mat",
        "VGG-19 for the content loss of levels 3..0; trained without it (with a warning) when absent"),
    Arg("iters", int, 8, "training iterations per level", check=utils.positive),
    Arg("patch_size", int, 32, "side of the packed training crops (multiple of 16)", check=utils.positive),
    Arg("batch_size", int, 2, "training batch size", check=utils.positive),
    Arg("train", int, 48, "training patches in the sample dataset", check=utils.positive),
    Arg("test", int, 4, "test patches in the sample dataset", check=utils.positive),
    Arg("full_height", int, 256, "height of the sample's full-resolution mosaic", check=utils.positive),
    Arg("full_width", int, 384, "width of the sample's full-resolution mosaic", check=utils.positive),
]


def sample_dataset_argv(params) -> list:
    return [f"output_dir={params['dataset_dir']}", f"train={params['train']}", f"test={params['test']}", "full=1",
            f"full_height={params['full_height']}", f"full_width={params['full_width']}"]


def train_argv(params, level: int, vgg_dir: str) -> list:
    return [f"level={level}", f"dataset_dir={params['dataset_dir']}", f"models_dir={params['models_dir']}",
            f"results_dir={params['results_dir']}", f"patch_size={params['patch_size']}",
            f"batch_size={params['batch_size']}", f"train_size={params['train']}",
            f"eval_batch_size={min(params['batch_size'], params['test'])}",
            f"num_train_iters={params['iters']}", f"eval_step={params['iters']}", f"vgg_dir={vgg_dir}",
            "progress=false", "overwrite=true"]


def render_argv(params) -> list:
    return ["level=0", f"dataset_dir={params['dataset_dir']}", f"models_dir={params['models_dir']}",
            f"output_dir={params['render_dir']}"]


def evaluate_argv(params) -> list:
    return ["orig=false", "level=0", f"dataset_dir={params['dataset_dir']}", f"models_dir={params['models_dir']}"]


def announce(title: str, script: str, argv: list) -> float:
    print(f"\n=== {title}\n$ python {script} {' '.join(argv)}", flush=True)
    return time.time()


def done(start: float) -> None:
    print(f"=== done in {time.time() - start:.0f} s", flush=True)


def train_all_levels(params, vgg_dir: str) -> None:
    """Levels 5 -> 0 as train_model.py's command lines would run them, in this one process with
    one model: building the 47.5M-parameter graph and importing TensorFlow once, not six times,
    is a good share of a ten-minute budget on a small CPU."""
    import train_model
    from model import PyNET

    model = None
    for level in (5, 4, 3, 2, 1, 0):
        argv = train_argv(params, level, vgg_dir)
        start = announce(f"train level {level}", "train_model.py", argv)
        args = train_model.parse_arguments(argv)
        if model is None:
            train_model.configure(args)
            model = PyNET()
        train_model.Trainer(args, model=model).run()
        done(start)


def main(argv):
    params = utils.parse_args(argv, ARGS, "quickstart.py", __doc__.strip().splitlines()[0])
    began = time.time()
    # one process trains and then renders single photos: the choice must suit both
    utils.select_cpu_kernels(training=True, smallest_batch=1)
    vgg_dir = params["vgg_dir"]
    if not os.path.isfile(vgg_dir):
        print(f"WARNING: {vgg_dir} is absent, so levels 3 to 0 train WITHOUT the VGG-19 content loss "
              f"(vgg_dir=none), unlike the reference. See README, 'The real thing', for the file.", flush=True)
        vgg_dir = "none"

    import make_sample_dataset

    if os.path.isdir(os.path.join(params["dataset_dir"], "train")):
        print(f"\n=== reusing the sample dataset in {params['dataset_dir']}")
    else:
        start = announce("build the sample dataset", "make_sample_dataset.py", sample_dataset_argv(params))
        make_sample_dataset.main(sample_dataset_argv(params))
        done(start)

    import load_dataset

    print(load_dataset.describe_dataset(params["dataset_dir"]))
    import tensorflow as tf

    # Each level's trainer compiles its own steps in this one process, by design; TensorFlow
    # counts those as one function retraced in a loop and warns at level 1. Errors still show.
    tf.get_logger().setLevel("ERROR")
    train_all_levels(params, vgg_dir)

    import evaluate_accuracy
    import test_model

    start = announce("render the full-resolution mosaic at level 0", "test_model.py", render_argv(params))
    test_model.main(render_argv(params))
    done(start)
    start = announce("evaluate PSNR / MS-SSIM at level 0", "evaluate_accuracy.py", evaluate_argv(params))
    evaluate_accuracy.main(evaluate_argv(params))
    done(start)
    print(f"\nQuick start finished in {time.time() - began:.0f} s.\n"
          f"  sample dataset (synthetic, not ZRR): {params['dataset_dir']}\n"
          f"  checkpoints and logs.txt:            {params['models_dir']}\n"
          f"  training visuals:                    {params['results_dir']}\n"
          f"  rendered photo:                      {params['render_dir']}")


if __name__ == "__main__":
    sys.exit(utils.run(main))
