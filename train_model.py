"""Train PyNET one pyramid level at a time, as the reference's train_model.py.

    python train_model.py level=5                      # from scratch
    python train_model.py level=4                      # starts from level 5's latest checkpoint
    python train_model.py level=3 batch_size=48 num_train_iters=20000
    ...
    python train_model.py level=0 batch_size=10 num_train_iters=100000

Faithful to the reference: the arguments and their defaults, the loss of each level
(reference train_model.py, lines 60-92), Adam at 5e-5 restarted at every level, the data
sampling and augmentation (load_dataset.py), num_train_iters + 1 steps, an evaluation over
the test split every ``eval_step`` iterations (i = 0 included) with the reference's log line
appended to models/logs.txt, visual results [prediction | target] in results/ and a checkpoint
models/pynet_level_{L}_iteration_{I}.ckpt holding all 437 variables under the reference's keys.

Added: a progress bar, TensorBoard summaries, ``resume=true`` (optimizer state and iteration
count), ``init_from=`` (fine-tuning from given weights), one run per models_dir, a checkpoint
on Ctrl-C / SIGTERM, a stop with a clear message on a NaN/Inf loss,
atomic checkpoints, ``tf.distribute`` (mirrored / multi-worker), gradient accumulation,
mixed precision and smaller patches.  See the README's training section.
"""

import re
import sys

import cli
import cluster as cluster_module
import files
import load_dataset
import preflight
import runtime
import utils
from cli import Arg, UsageError

STRATEGIES = ("auto", "one", "mirrored", "multi_worker")


def _default_iters(values):
    """per level: 100000, 35000, 20000, 20000, 5000, 5000 for levels 0..5"""
    return utils.NUM_DEFAULT_TRAIN_ITERS[values["level"]]


def _checkpoint_prefix(text):
    """A checkpoint as its prefix: "none" (or nothing) is None, and a file of it named instead
    (tab completion gives pynet_level_0.ckpt.index) stands for its prefix."""
    if text.lower() in ("", "none"):
        return None
    return re.sub(r"\.(index|data-\d{5}-of-\d{5})$", "", text)


def _default_eval_batch(values):
    """batch_size / accum_steps"""
    return max(1, values["batch_size"] // max(1, values["accum_steps"]))


SPEC = [
    # the reference's arguments (reference utils.py, process_command_args)
    utils.level_arg(),
    Arg("batch_size", int, 50, "training batch size (the global batch: split over accumulation steps and "
        "replicas); the reference's commands use 50, 50, 48, 18, 12, 10 for levels 5..0", check=cli.positive),
    Arg("train_size", int, 5000, "number of training patches sampled from, redrawn every refresh_every "
        "iterations", check=cli.positive),
    Arg("learning_rate", float, 5e-5, "Adam learning rate", check=cli.positive),
    Arg("restore_iter", cli.OPTIONAL_INT, None, "iteration of the level+1 checkpoint to start from; "
        "none = its latest one", check=cli.non_negative),
    Arg("init_from", _checkpoint_prefix, None, "checkpoint the level starts from instead of the level above's "
        "(fine-tuning): ours of any level or the authors' models/original/pynet_level_0.ckpt; none = the level "
        "above's"),
    Arg("num_train_iters", int, _default_iters, "number of training iterations (the loop runs this + 1 steps)",
        check=cli.non_negative),
    utils.dataset_dir_arg(),
    Arg("vgg_dir", str, "vgg_pretrained/imagenet-vgg-verydeep-19.mat",
        "VGG-19 weights for the content loss of levels 3..0 (MatConvNet .mat, or Keras' VGG19 .h5); "
        "none = train without the content loss (not the reference's loss; a warning says so)"),
    Arg("eval_step", int, 1000, "evaluate, log and save a checkpoint every this many iterations",
        check=cli.positive),
    # additions
    Arg("patch_size", int, 224, "side of the packed training/test crops (224 = the whole ZRR patch)",
        check=cli.patch_size_check),
    Arg("init", str, "reference", "initial weights of the layers a level adds: the reference's, or he = He-normal "
        "(not the reference's; a faster start from scratch, the quick start's)", choices=utils.INITS),
    Arg("loss", str, "reference", "the level's loss: the reference's, or mse = its MSE term alone (not the "
        "reference's; the quick start's level 0)", choices=utils.LOSSES),
    Arg("whole_dataset", cli.BOOL, False, "stream every training patch (reshuffled each pass) instead of "
        "train_size patches redrawn every refresh_every iterations"),
    Arg("refresh_every", int, 1000, "iterations between redraws of the train_size subset", check=cli.positive),
    Arg("eval_batch_size", int, _default_eval_batch, "batch size of the evaluation (the reference uses "
        "batch_size)", check=cli.positive),
    Arg("resume", cli.BOOL, False, "continue this level from its latest checkpoint, with the optimizer state "
        "and iteration count (starts the level normally when there is none)"),
    Arg("overwrite", cli.BOOL, False, "when models_dir already holds checkpoints of this level from an earlier "
        "run and this one starts afresh: delete them (and the level's TensorBoard summaries) instead of stopping"),
    Arg("strategy", str, "auto", "tf.distribute strategy: auto = mirrored over all GPUs when there are several, "
        "multi_worker when TF_CONFIG names several tasks, else one device", choices=STRATEGIES),
    Arg("devices", str, "", "comma-separated devices for strategy=mirrored (default: all GPUs)"),
    Arg("cluster_timeout", float, 180.0, "multi_worker: seconds to wait for the other tasks of TF_CONFIG to "
        "answer before giving up", check=cli.positive),
    Arg("accum_steps", int, 1, "accumulate gradients over this many micro-batches of batch_size/accum_steps "
        "per update", check=cli.positive),
    utils.precision_arg(),
    utils.force_bf16_arg(),
    Arg("mixed_precision", cli.BOOL, False, "the earlier spelling of precision=fp16"),
    Arg("xla", cli.BOOL, False, "compile the training and evaluation steps with XLA (jit_compile); for GPUs: "
        "on CPUs it is slower than the default kernels"),
    Arg("seed", int, 0, "random seed of the data sampling and augmentation"),
    Arg("deterministic", cli.BOOL, False, "deterministic TensorFlow ops (slower; for reproducible runs)"),
    Arg("skip_bad", cli.BOOL, False, "skip unreadable or malformed patches with a warning instead of stopping"),
    Arg("models_dir", str, "models/", "checkpoints, logs.txt and TensorBoard summaries"),
    Arg("results_dir", str, "results/", "visual results"),
    Arg("visual_stretch", cli.BOOL, False, "min-max stretch the visual results as the reference "
        "(scipy imsave) did, instead of clipping to [0, 1]"),
    Arg("tensorboard", cli.BOOL, True, "write TensorBoard summaries under models_dir/tensorboard/"),
    Arg("progress", cli.BOOL, True, "show a progress bar"),
]

DESCRIPTION = "Train PyNET level by level (5, 4, 3, 2, 1, 0), as the reference's train_model.py."


# ---------------------------------------------------------------------------------------
# arguments

def parse_arguments(argv) -> dict:
    args = cli.parse_args(argv, SPEC, "train_model.py", DESCRIPTION)
    if args["batch_size"] % args["accum_steps"]:
        raise UsageError(f"batch_size={args['batch_size']} is not divisible by accum_steps={args['accum_steps']}")
    if args["resume"] and args["restore_iter"] is not None:
        raise UsageError("restore_iter picks the level+1 checkpoint a level starts from; resume=true continues "
                         "this level from its latest checkpoint: give one or the other")
    if args["init_from"] is not None and args["restore_iter"] is not None:
        raise UsageError("init_from gives the weights the level starts from; restore_iter picks the level+1 "
                         "checkpoint it starts from otherwise: give one or the other")
    if args["devices"] and args["strategy"] != "mirrored":
        raise UsageError("devices= is for strategy=mirrored")
    if args["mixed_precision"]:
        if args["precision"] not in ("fp32", "fp16"):
            raise UsageError(f"mixed_precision=true is precision=fp16, not precision={args['precision']}: give one")
        args["precision"] = "fp16"
    return args


# ---------------------------------------------------------------------------------------
# process-wide settings

def configure(args) -> None:
    """Process-wide settings that must precede building the model."""
    import keras  # here: after runtime's settings, as every TensorFlow import of a script
    import tensorflow as tf

    keras.utils.set_random_seed(args["seed"])
    if args["deterministic"]:
        tf.config.experimental.enable_op_determinism()


# ---------------------------------------------------------------------------------------

def smallest_batch(args) -> int:
    """The fewest images one call of the network sees in this run (per replica): a micro-batch,
    an evaluation batch or the visual results."""
    per_worker = args["batch_size"] // args["accum_steps"] // max(1, cluster_module.task_count())
    return max(1, min(per_worker, args["eval_batch_size"], utils.NUM_VISUAL))


def checks_before_tensorflow(args) -> bool:
    """Whether preflight's checks can run before TensorFlow starts, so that a mistake is one line
    at once: not in a cluster, where they run in the Trainer so that a task's failure reaches
    the others (which would wait for it otherwise), nor on paths only TensorFlow reads (gs://...)."""
    paths = [args[name] for name in ("dataset_dir", "models_dir", "results_dir", "init_from") if args[name]]
    return cluster_module.task_count() == 0 and not any(files.is_url(path) for path in paths)


def main(argv):
    args = parse_arguments(argv)
    print("parameters:")
    cli.print_args({a.name: args[a.name] for a in SPEC})
    early = checks_before_tensorflow(args)
    if early:
        print(load_dataset.describe_dataset(args["dataset_dir"]))
    plan = preflight.check(args) if early else None
    try:
        runtime.select_cpu_kernels(training=True, smallest_batch=smallest_batch(args))
        runtime.start_tensorflow()
        runtime.check_precision(args["precision"], args["force_bf16"])
        if not early:
            print(load_dataset.describe_dataset(args["dataset_dir"]))
        strategy = cluster_module.make_strategy(args["strategy"], args["devices"], args["cluster_timeout"])
        configure(args)
        print(f"strategy: {type(strategy).__name__}, {strategy.num_replicas_in_sync} replica(s)")
        from trainer import Trainer  # here: it starts TensorFlow, after runtime's settings

        Trainer(args, strategy, plan=plan).run()
    finally:
        if plan is not None:
            plan.release()


if __name__ == "__main__":
    sys.exit(cli.run(main))
