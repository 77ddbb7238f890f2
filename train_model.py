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
count), a checkpoint on Ctrl-C / SIGTERM, a stop with a clear message on a NaN/Inf loss,
atomic checkpoints, ``tf.distribute`` (mirrored / multi-worker), gradient accumulation,
mixed precision and smaller patches.  See the README's training section.
"""

import contextlib
import os
import signal
import sys
import threading
import time

import numpy as np

import checkpoints
import cluster as cluster_module
import load_dataset
import utils
from utils import Arg, UsageError, UserError

STRATEGIES = ("auto", "one", "mirrored", "multi_worker")
NUM_VISUAL = 4  # visual results saved per evaluation, as the reference


def _default_iters(values):
    """per level: 100000, 35000, 20000, 20000, 5000, 5000 for levels 0..5"""
    return utils.NUM_DEFAULT_TRAIN_ITERS[values["level"]]


def _default_eval_batch(values):
    """batch_size / accum_steps"""
    return max(1, values["batch_size"] // max(1, values["accum_steps"]))


SPEC = [
    # the reference's arguments (reference utils.py, process_command_args)
    utils.level_arg(),
    Arg("batch_size", int, 50, "training batch size (the global batch: split over accumulation steps and "
        "replicas); the reference's commands use 50, 50, 48, 18, 12, 10 for levels 5..0", check=utils.positive),
    Arg("train_size", int, 5000, "number of training patches sampled from, redrawn every refresh_every "
        "iterations", check=utils.positive),
    Arg("learning_rate", float, 5e-5, "Adam learning rate", check=utils.positive),
    Arg("restore_iter", utils.OPTIONAL_INT, None, "iteration of the level+1 checkpoint to start from; "
        "none = its latest one", check=utils.non_negative),
    Arg("num_train_iters", int, _default_iters, "number of training iterations (the loop runs this + 1 steps)",
        check=utils.non_negative),
    utils.dataset_dir_arg(),
    Arg("vgg_dir", str, "vgg_pretrained/imagenet-vgg-verydeep-19.mat",
        "VGG-19 weights for the content loss of levels 3..0 (MatConvNet .mat, or Keras' VGG19 .h5); "
        "none = train without the content loss (not the reference's loss; a warning says so)"),
    Arg("eval_step", int, 1000, "evaluate, log and save a checkpoint every this many iterations",
        check=utils.positive),
    # additions
    Arg("patch_size", int, 224, "side of the packed training/test crops (224 = the whole ZRR patch)",
        check=utils.patch_size_check),
    Arg("init", str, "reference", "initial weights of the layers a level adds: the reference's, or he = He-normal "
        "(not the reference's; a faster start from scratch, the quick start's)", choices=utils.INITS),
    Arg("loss", str, "reference", "the level's loss: the reference's, or mse = its MSE term alone (not the "
        "reference's; the quick start's level 0)", choices=utils.LOSSES),
    Arg("whole_dataset", utils.BOOL, False, "stream every training patch (reshuffled each pass) instead of "
        "train_size patches redrawn every refresh_every iterations"),
    Arg("refresh_every", int, 1000, "iterations between redraws of the train_size subset", check=utils.positive),
    Arg("eval_batch_size", int, _default_eval_batch, "batch size of the evaluation (the reference uses "
        "batch_size)", check=utils.positive),
    Arg("resume", utils.BOOL, False, "continue this level from its latest checkpoint, with the optimizer state "
        "and iteration count (starts the level normally when there is none)"),
    Arg("overwrite", utils.BOOL, False, "when models_dir already holds checkpoints of this level from an earlier "
        "run and this one starts afresh: delete them (and the level's TensorBoard summaries) instead of stopping"),
    Arg("strategy", str, "auto", "tf.distribute strategy: auto = mirrored over all GPUs when there are several, "
        "multi_worker when TF_CONFIG names several tasks, else one device", choices=STRATEGIES),
    Arg("devices", str, "", "comma-separated devices for strategy=mirrored (default: all GPUs)"),
    Arg("cluster_timeout", float, 180.0, "multi_worker: seconds to wait for the other tasks of TF_CONFIG to "
        "answer before giving up", check=utils.positive),
    Arg("accum_steps", int, 1, "accumulate gradients over this many micro-batches of batch_size/accum_steps "
        "per update", check=utils.positive),
    Arg("mixed_precision", utils.BOOL, False, "float16 compute (mixed_float16) with float32 variables and loss"),
    Arg("xla", utils.BOOL, False, "compile the training and evaluation steps with XLA (jit_compile); for GPUs: "
        "on CPUs it is slower than the default kernels"),
    Arg("seed", int, 0, "random seed of the data sampling and augmentation"),
    Arg("deterministic", utils.BOOL, False, "deterministic TensorFlow ops (slower; for reproducible runs)"),
    Arg("skip_bad", utils.BOOL, False, "skip unreadable or malformed patches with a warning instead of stopping"),
    Arg("models_dir", str, "models/", "checkpoints, logs.txt and TensorBoard summaries"),
    Arg("results_dir", str, "results/", "visual results"),
    Arg("visual_stretch", utils.BOOL, False, "min-max stretch the visual results as the reference "
        "(scipy imsave) did, instead of clipping to [0, 1]"),
    Arg("tensorboard", utils.BOOL, True, "write TensorBoard summaries under models_dir/tensorboard/"),
    Arg("progress", utils.BOOL, True, "show a progress bar"),
]

DESCRIPTION = "Train PyNET level by level (5, 4, 3, 2, 1, 0), as the reference's train_model.py."


class TrainingStopped(UserError):
    """Ctrl-C or SIGTERM: a checkpoint was written, exit status 130."""

    exit_code = 130


# ---------------------------------------------------------------------------------------
# arguments

def parse_arguments(argv) -> dict:
    args = utils.parse_args(argv, SPEC, "train_model.py", DESCRIPTION)
    if args["batch_size"] % args["accum_steps"]:
        raise UsageError(f"batch_size={args['batch_size']} is not divisible by accum_steps={args['accum_steps']}")
    if args["resume"] and args["restore_iter"] is not None:
        raise UsageError("restore_iter picks the level+1 checkpoint a level starts from; resume=true continues "
                         "this level from its latest checkpoint: give one or the other")
    if args["devices"] and args["strategy"] != "mirrored":
        raise UsageError("devices= is for strategy=mirrored")
    return args


def micro_batch(args) -> int:
    return args["batch_size"] // args["accum_steps"]


# ---------------------------------------------------------------------------------------
# process-wide settings

def configure(args) -> None:
    """Process-wide settings that must precede building the model."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(args["seed"])
    if args["deterministic"]:
        tf.config.experimental.enable_op_determinism()
    if args["mixed_precision"]:
        keras.mixed_precision.set_global_policy("mixed_float16")


# ---------------------------------------------------------------------------------------
# data

def check_eval_batch(args, num_test):
    if num_test < args["eval_batch_size"]:
        raise UserError(f"eval_batch_size={args['eval_batch_size']} is larger than the {num_test} test patches of "
                        f"{args['dataset_dir']}: the evaluation uses full batches only (as the reference); lower "
                        f"batch_size or eval_batch_size")


def train_data(args, start_step: int = 0, shard=(0, 1), replica_batch=None, indices=None):
    """The training stream, positioned after ``start_step`` optimizer steps (for resume=true).
    The plan is that of optimizer steps of batch_size samples (subset redraws included), cut
    into accum_steps micro-batches; ``shard=(i, n)`` keeps input pipeline i's share of each
    micro-batch, before any file is read, in batches of ``replica_batch`` (default: the share).
    Returns (dataset, error log)."""
    return load_dataset.train_dataset(
        args["dataset_dir"], args["level"], args["batch_size"], train_size=args["train_size"],
        whole=args["whole_dataset"], patch=args["patch_size"], seed=args["seed"], skip_bad=args["skip_bad"],
        refresh_every=args["refresh_every"], start_batch=start_step, micro_batches=args["accum_steps"],
        shard=shard, out_batch=replica_batch, indices=indices)


def test_data(args):
    """The test split (checked file by file) in batches of eval_batch_size, its error log and
    the indices of its usable patches."""
    indices = load_dataset.check_dataset(args["dataset_dir"], "test", skip_bad=args["skip_bad"], deep=True)
    ds, log = load_dataset.test_dataset(args["dataset_dir"], args["level"], args["eval_batch_size"],
                                        patch=args["patch_size"], skip_bad=args["skip_bad"], indices=indices)
    check_eval_batch(args, len(indices))
    return ds, log, indices


def visual_crops(args, test_indices):
    """The fixed test crops shown at every evaluation: NUM_VISUAL random test patches (with
    replacement, as the reference's randint), centre-cropped like the test split."""
    rs = np.random.RandomState(args["seed"])
    chosen = [test_indices[j] for j in rs.randint(0, len(test_indices), NUM_VISUAL)]
    patch, level = args["patch_size"], args["level"]
    step = load_dataset.crop_step(level)
    offset = (load_dataset.PATCH - patch) // 2 // step * step
    pairs = [load_dataset.load_pair(args["dataset_dir"], "test", i, level, patch, offset=(offset, offset))
             for i in chosen]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def next_batch(iterator, log):
    """Next element of a pipeline; a bad file that ended it becomes its one-line DataError."""
    try:
        return next(iterator)
    except StopIteration:
        if log is not None and log.first is not None:
            raise load_dataset.DataError(log.first) from None
        raise UserError("the training data stream ended unexpectedly") from None


# ---------------------------------------------------------------------------------------
# model, optimizer, steps

def reference_adam(**kwargs):
    """Keras' Adam whose update is TensorFlow's fused ResourceApplyAdam kernel, the one the
    reference's tf.train.AdamOptimizer ran. Keras 3 spells the update as some ten element-wise
    ops per variable, each a pass over the weights: at level 0 that is a few percent of the
    step on a CPU. Same formula (epsilon added to sqrt(v), the bias correction folded into
    the step size), same state variables, so checkpoints and resume are unchanged."""
    import keras
    import tensorflow as tf

    class ReferenceAdam(keras.optimizers.Adam):
        def update_step(self, gradient, variable, learning_rate):
            if self.amsgrad or isinstance(gradient, tf.IndexedSlices):
                return super().update_step(gradient, variable, learning_rate)
            index = self._get_variable_index(variable)
            var, m, v = (x.value if isinstance(x, keras.Variable) else x
                         for x in (variable, self._momentums[index], self._velocities[index]))
            dtype = var.dtype
            step = tf.cast(self.iterations + 1, dtype)
            beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
            tf.raw_ops.ResourceApplyAdam(var=var.handle, m=m.handle, v=v.handle, beta1_power=tf.pow(beta_1, step),
                                         beta2_power=tf.pow(beta_2, step), lr=tf.cast(learning_rate, dtype),
                                         beta1=beta_1, beta2=beta_2, epsilon=tf.cast(self.epsilon, dtype),
                                         grad=tf.cast(gradient, dtype))

    return ReferenceAdam(**kwargs)


def build_optimizer(args):
    """Adam as the reference's tf.train.AdamOptimizer: beta1 0.9, beta2 0.999, epsilon 1e-8."""
    import keras

    optimizer = reference_adam(learning_rate=args["learning_rate"], beta_1=0.9, beta_2=0.999, epsilon=1e-8)
    if args["mixed_precision"]:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def base_optimizer(optimizer):
    """The Adam inside a LossScaleOptimizer (its state is what a checkpoint keeps)."""
    return getattr(optimizer, "inner_optimizer", optimizer)


class Steps:
    """The compiled training step (with optional gradient accumulation) and evaluation step.

    Under a strategy each replica's loss is the sum of its per-image losses divided by the
    GLOBAL batch size (batch_size), so that the all-reduced (summed) gradient, and the sum over
    accumulation steps, equal the gradient of the batch mean on one device. On one device
    the steps call the replica function directly: no strategy.run / reduce in the graph.
    """

    def __init__(self, strategy, view, optimizer, level, vgg, batch_size, accum_steps, mixed_precision, xla=False,
                 distributed=None, loss_kind="reference"):
        import tensorflow as tf

        import losses

        self.strategy, self.view, self.optimizer = strategy, view, optimizer
        self.level, self.vgg, self.accum_steps = level, vgg, accum_steps
        self.global_batch = float(batch_size)
        self.mixed = mixed_precision
        self.trainable = view.trainable_variables
        self.accumulators = None
        if distributed is None:
            distributed = strategy.num_replicas_in_sync > 1 or cluster_module.task_count() > 1
        if accum_steps > 1:
            with strategy.scope():
                # one local sum per replica (ON_READ), all-reduced by the optimizer when applied
                self.accumulators = [
                    tf.Variable(tf.zeros(v.shape, tf.float32), trainable=False,
                                synchronization=tf.VariableSynchronization.ON_READ,
                                aggregation=tf.VariableAggregation.SUM, name=f"accum_{i}")
                    for i, v in enumerate(self.trainable)]
        sum_ = tf.distribute.ReduceOp.SUM

        def loss_and_grads(raw, target):
            with tf.GradientTape() as tape:
                enhanced = view(raw, training=True)
                per_image, _ = losses.level_loss_per_image(level, enhanced, target, vgg, vgg is not None,
                                                           loss_kind)
                loss = tf.reduce_sum(per_image) / self.global_batch
                scaled = optimizer.scale_loss(loss) if self.mixed else loss
            return loss, tape.gradient(scaled, self.trainable)

        def replica_step(raw, target):
            loss, grads = loss_and_grads(raw, target)
            optimizer.apply_gradients(zip(grads, self.trainable))
            return loss

        def replica_accumulate(raw, target):
            loss, grads = loss_and_grads(raw, target)
            for acc, grad in zip(self.accumulators, grads):
                acc.assign_add(grad)
            return loss

        def replica_apply():
            grads = [acc.read_value() for acc in self.accumulators]
            optimizer.apply_gradients(zip(grads, self.trainable))
            with tf.control_dependencies(grads):
                for acc in self.accumulators:
                    acc.assign(tf.zeros_like(acc))

        def compiled(fn):
            return tf.function(fn, jit_compile=xla or None)

        if distributed:
            step = compiled(lambda batch: strategy.reduce(sum_, strategy.run(replica_step, args=batch), axis=None))
            accumulate = compiled(
                lambda batch: strategy.reduce(sum_, strategy.run(replica_accumulate, args=batch), axis=None))
            apply = compiled(lambda: strategy.run(replica_apply))
        else:
            step = compiled(lambda batch: replica_step(*batch))
            accumulate = compiled(lambda batch: replica_accumulate(*batch))
            apply = compiled(replica_apply)

        @compiled
        def evaluate(raw, target):
            enhanced = tf.cast(view(raw, training=False), tf.float32)
            total, parts = losses.level_loss(level, enhanced, target, vgg, vgg is not None, loss_kind)
            out = {"loss": total, "mse": parts["mse"], "psnr": losses.psnr_from_mse(parts["mse"])}
            if vgg is not None:
                out["content"] = parts["content"] if "content" in parts else losses.content_loss(vgg, enhanced, target)
            ms = losses.ms_ssim(enhanced, target)
            if ms is not None:
                out["ms_ssim"] = ms
            return out

        self._step, self._accumulate, self._apply = step, accumulate, apply
        self.evaluate = evaluate

    def train_step(self, next_input):
        """One optimizer step; ``next_input()`` returns the next (distributed) micro-batch.
        Returns (loss of the batch as a float, seconds spent waiting for input)."""
        waited, total = 0.0, 0.0
        if self.accumulators is None:
            t0 = time.perf_counter()
            batch = next_input()
            waited += time.perf_counter() - t0
            return float(self._step(batch)), waited
        for _ in range(self.accum_steps):
            t0 = time.perf_counter()
            batch = next_input()
            waited += time.perf_counter() - t0
            total += float(self._accumulate(batch))
        self._apply()
        return total, waited


# ---------------------------------------------------------------------------------------
# outputs: log line, visual results

def format_log(i, training, metrics) -> str:
    """The reference's log line; content is "n/a" at levels 5 and 4 when VGG is not loaded."""
    content = f"{metrics['content']:.4g}" if "content" in metrics else "n/a"
    line = (f"step {i} | training: {training:.4g}, test: {metrics['loss']:.4g} | content: {content}, "
            f"mse: {metrics['mse']:.4g}, psnr: {metrics['psnr']:.4g}")
    if "ms_ssim" in metrics:
        line += f", ms-ssim: {metrics['ms_ssim']:.4g}"
    return line


def visual_images(predictions, targets, stretch):
    """uint8 [prediction | target] images, clipped (or min-max stretched as the reference)."""
    return [utils.to_uint(np.hstack((p, t)), 8, stretch) for p, t in zip(predictions, targets)]


# ---------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM

class StopRequest:
    """Set by SIGINT/SIGTERM (or a test); the loop saves a checkpoint and stops after the
    current step. A second signal stops at once."""

    def __init__(self):
        self.reason = None

    def request(self, reason):
        self.reason = reason

    def install(self):
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def handler(signum, frame):
            if self.reason is not None:
                raise KeyboardInterrupt
            self.reason = signal.Signals(signum).name
            print(f"\n{self.reason} received: saving a checkpoint after the current step "
                  f"(send it again to stop at once)", file=sys.stderr, flush=True)

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return lambda: [signal.signal(s, h) for s, h in previous.items()]


NO_VGG_WARNING = ("WARNING: vgg_dir=none: level {level} trains WITHOUT the VGG-19 content loss that the "
                  "reference uses at levels 3 to 0; results will differ from the paper's")


def departures(args, resumed=False) -> list:
    """Notes for the options that leave the reference's training (init=, loss=); a resumed
    level initialises nothing."""
    import losses

    notes = []
    if args["init"] != "reference" and not resumed:
        notes.append(f"NOTE: init={args['init']}: the layers level {args['level']} adds start from He-normal "
                     f"weights, not the reference's N(0, 0.01)")
    if args["loss"] != "reference" and losses.LEVEL_WEIGHTS[args["level"]][1:] != (0.0, 0.0):
        notes.append(f"NOTE: loss={args['loss']}: level {args['level']} trains on its MSE term alone, not the "
                     f"reference's loss")
    return notes


# ---------------------------------------------------------------------------------------
# the trainer

class Trainer:
    """Everything a run needs, set up in ``__init__`` (cheap checks first), run by ``run()``.

    ``model`` may be passed in (a full PyNET built in ``strategy``'s scope) to reuse one across
    runs; ``stop`` is a StopRequest; ``on_step(i, loss)`` is called after each step (tests).
    """

    def __init__(self, args, strategy=None, model=None, stop=None, on_step=None, out=print):
        import tensorflow as tf

        self.args, self.out = args, out
        self.level = args["level"]
        self.strategy = strategy or tf.distribute.get_strategy()
        self.cluster = cluster_module.multi_worker_cluster(self.strategy)
        self.chief = self.cluster.is_chief if self.cluster is not None else cluster_module.is_chief()
        self.stop = stop or StopRequest()
        self.on_step = on_step
        self.replicas = self.strategy.num_replicas_in_sync
        self.distributed = self.replicas > 1 or self.cluster is not None

        failure = None
        try:
            self.prepare()
        except UserError as err:
            if self.cluster is None:
                raise
            failure = err  # said after the others learn of it, so that no task waits for this one
        if self.cluster is not None:
            self.agree_on_start(failure)

        import model as pynet
        import vgg

        with self.strategy.scope():
            self.vgg = vgg.load_vgg(args["vgg_dir"]) if self.needs_vgg else None
            if model is None:
                model = pynet.PyNET(instance_norm=True, instance_norm_level_1=False, init=args["init"])
            self.model = model
            self.view = pynet.level_model(self.model, self.level)
            self.optimizer = build_optimizer(args)
            base_optimizer(self.optimizer).build(self.view.trainable_variables)
            if args["mixed_precision"]:
                self.optimizer.build(self.view.trainable_variables)
            self.counters = {"iteration": tf.Variable(-1, dtype=tf.int64, trainable=False),
                             "loss_sum": tf.Variable(0.0, dtype=tf.float64, trainable=False),
                             "loss_count": tf.Variable(0, dtype=tf.int64, trainable=False)}
        self.steps = Steps(self.strategy, self.view, self.optimizer, self.level, self.vgg, args["batch_size"],
                           args["accum_steps"], args["mixed_precision"], args["xla"], self.distributed,
                           loss_kind=args["loss"])
        self.restore_start()

    def prepare(self):
        """The cheap checks, in order: output folders, the VGG file, the start point, the data."""
        import losses
        import vgg

        args, out = self.args, self.out
        for name in ("models_dir", "results_dir"):
            utils.check_output_dir(args[name], name)
        self.needs_vgg = losses.uses_content(self.level) and args["loss"] == "reference"
        if self.needs_vgg and args["vgg_dir"].lower() == "none":
            out(NO_VGG_WARNING.format(level=self.level))
            self.needs_vgg = False
        if self.needs_vgg and not utils.isfile(args["vgg_dir"]):
            raise UserError(vgg.missing_file_message(args["vgg_dir"]))
        self.start = checkpoints.find_start(args, log=out)
        for line in departures(args, resumed=self.start.kind == "resume"):
            out(line)
        if micro_batch(args) % self.replicas:
            raise UsageError(f"batch_size / accum_steps = {micro_batch(args)} is not divisible by the {self.replicas} "
                             f"replicas of the strategy")
        self.test_ds, self.test_log, self.test_indices = test_data(args)
        self.train_indices = load_dataset.check_dataset(args["dataset_dir"], "train", skip_bad=args["skip_bad"])
        if not self.distributed:  # under a strategy, each input pipeline is built in run() for its share
            self.train_ds, self.train_log = train_data(args, self.start.iteration + 1, indices=self.train_indices)

    def agree_on_start(self, failure):
        """Every task must start from what the chief starts from (same kind, checkpoint files and
        settings): compared across the tasks before anything is built or written; on a
        difference every task stops with one line."""
        row = cluster_module.start_row(self.args, None if failure is not None else self.start)
        with self.lost_peer("before training"):
            rows = cluster_module.exchange(self.strategy, self.cluster, row)
        if failure is not None:
            raise failure
        problem = cluster_module.start_disagreement(rows, self.cluster, self.args)
        if problem:
            raise UserError(problem)

    def restore_start(self):
        import model as pynet

        start = self.start
        self.last_good = start.prefix if start.kind == "resume" else None  # a checkpoint with finite weights
        with checkpoints.naming_intact(start.prefix or "", resume=start.kind == "resume"):
            if start.kind in ("handover", "resume"):
                pynet.load_checkpoint(self.model, start.prefix)
            if start.kind == "resume":
                checkpoints.restore_state(base_optimizer(self.optimizer), self.counters, start.prefix)
        if start.kind == "resume":
            base_optimizer(self.optimizer).learning_rate = self.args["learning_rate"]
            if int(self.counters["iteration"].numpy()) != start.iteration:
                raise UserError(f"{checkpoints.state_prefix(start.prefix)}: holds iteration "
                                f"{int(self.counters['iteration'].numpy())}, expected {start.iteration}")
        what = {"scratch": "from scratch", "handover": f"from {start.prefix}",
                "resume": f"resuming after iteration {start.iteration} ({start.prefix})"}[start.kind]
        self.out(f"level {self.level}: {what}")

    # -- evaluation ------------------------------------------------------------------------

    def evaluate(self, test_ds, test_log):
        sums, count = {}, 0
        for raw, target in load_dataset.batches(test_ds, test_log):
            values = self.steps.evaluate(raw, target)
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            count += 1
        if count == 0:
            raise UserError("the evaluation found no complete test batch")
        return {key: value / count for key, value in sums.items()}

    def save_visuals(self, i, crops, writer):
        import tensorflow as tf

        from render import level_function

        raw, targets = crops
        predict = level_function(self.model, self.level, xla=self.args["xla"])
        predictions = predict(raw).numpy().astype(np.float32)  # float16 under mixed precision
        images = visual_images(predictions, targets, self.args["visual_stretch"])
        for idx, image in enumerate(images):
            utils.write_jpeg(os.path.join(self.args["results_dir"], f"pynet_img_{idx}_level_{self.level}_iter_{i}.jpg"),
                       image)
        if writer is not None:
            with writer.as_default(step=i):
                tf.summary.image("visual/prediction_target", np.stack(visual_images(predictions, targets, False)),
                                 max_outputs=len(images))

    # -- the loop ----------------------------------------------------------------------------

    def run(self):
        """Train; returns the last good checkpoint (the last one this task wrote, else the one it
        resumed from), None when there is none."""
        import tensorflow as tf

        args, level = self.args, self.level
        models_dir = args["models_dir"]
        last_iter = args["num_train_iters"]
        first = int(self.counters["iteration"].numpy()) + 1  # 0, or the step after the resumed one
        if self.chief:
            checkpoints.prepare_folders(args, self.start.kind, log=self.out)
            utils.makedirs(models_dir)
            utils.makedirs(args["results_dir"])
            # The reference truncates logs.txt at the start of every run; resuming appends.
            logs = os.path.join(models_dir, "logs.txt")
            if self.start.kind != "resume" or not utils.exists(logs):
                utils.write_file(logs, b"")
        if first > last_iter:
            self.out(f"level {level} already has {first} of {last_iter + 1} steps: nothing to do")
            return self.last_good

        test_ds, test_log = self.test_ds, self.test_log
        crops = visual_crops(args, self.test_indices)
        iterator, train_log = self.train_input(first)
        writer = None
        if args["tensorboard"] and self.chief:
            writer = tf.summary.create_file_writer(os.path.join(models_dir, "tensorboard", f"level_{level}"))

        restore_handlers = self.stop.install()
        bar = None
        try:
            from tqdm import tqdm

            bar = tqdm(total=last_iter + 1, initial=first, unit="it", desc=f"level {level}", file=sys.stderr,
                       disable=not args["progress"], dynamic_ncols=True)
            wait_total, step_total = 0.0, 0.0
            for i in range(first, last_iter + 1):
                t0 = time.perf_counter()
                with self.lost_peer(f"during iteration {i} of level {level}"):
                    loss, waited = self.steps.train_step(lambda: next_batch(iterator, train_log))
                    if self.cluster is not None:
                        self.stop.reason = self.agreed_stop()
                step_total += time.perf_counter() - t0
                wait_total += waited
                if not np.isfinite(loss):
                    raise self.nonfinite_stop(f"the training loss became {loss}", i)
                self.counters["iteration"].assign(i)
                self.counters["loss_sum"].assign_add(loss)
                self.counters["loss_count"].assign_add(1)
                if writer is not None:
                    with writer.as_default(step=i):
                        tf.summary.scalar("train/loss", loss)
                count = int(self.counters["loss_count"].numpy())
                bar.set_postfix(loss=f"{float(self.counters['loss_sum'].numpy()) / count:.4g}",
                                input_wait=f"{100 * wait_total / max(step_total, 1e-9):.0f}%", refresh=False)
                bar.update(1)
                if self.on_step is not None:
                    self.on_step(i, loss)
                if i % args["eval_step"] == 0 or i == last_iter:
                    self.checkpoint(i, test_ds, test_log, crops, writer, bar)
                elif self.stop.reason is not None:
                    self.save(i)
                if self.stop.reason is not None and i < last_iter:
                    self.barrier(f"after iteration {i} of level {level}")
                    saved = f"saved {self.last_good}" if self.chief else \
                        f"the chief ({self.cluster.chief.name}) saved iteration {i} in its models_dir"
                    raise TrainingStopped(f"stopped by {self.stop.reason} after iteration {i} of level {level}; "
                                          f"{saved}: continue with resume=true")
            self.barrier(f"after iteration {last_iter} of level {level}")
        finally:
            if bar is not None:
                bar.close()
            restore_handlers()
            if writer is not None:
                writer.close()
        return self.last_good

    def barrier(self, when):
        """With several tasks, wait until every task is here (the chief has saved) before
        leaving; see cluster.leave_together."""
        if self.cluster is not None:
            with self.lost_peer(when):
                cluster_module.leave_together(self.strategy, self.cluster)

    def train_input(self, first):
        """An iterator over the training batches from step ``first`` on, and its error log. Under
        a strategy each input pipeline (a worker) reads and decodes only its own share of every
        micro-batch, each replica getting batch_size / accum_steps / replicas samples: the same
        samples per step as on one device, so losses and resume are unchanged."""
        if not self.distributed:
            return iter(self.train_ds), self.train_log
        logs = []

        def dataset_fn(context):
            ds, log = train_data(self.args, first, shard=(context.input_pipeline_id, context.num_input_pipelines),
                                 replica_batch=context.get_per_replica_batch_size(micro_batch(self.args)),
                                 indices=self.train_indices)
            logs.append(log)
            return ds

        dist = self.strategy.distribute_datasets_from_function(dataset_fn)
        return iter(dist), logs[0]

    def agreed_stop(self):
        """The stop every task agrees on after a step: a Ctrl-C / SIGTERM on any task stops all of
        them after the same iteration (one small all-reduce per step), naming where it came from."""
        mine = self.stop.reason
        code = 0 if mine is None else getattr(signal.Signals, str(mine), signal.SIGTERM).value
        codes = cluster_module.exchange(self.strategy, self.cluster, [code])[:, 0]
        for task, value in zip(self.cluster.tasks, codes):
            if value:
                return f"{signal.Signals(int(value)).name} on {task.name}"
        return None

    @contextlib.contextmanager
    def lost_peer(self, when):
        """A collective that failed because another task went away, as one line."""
        try:
            yield
        except Exception as exc:
            message = cluster_module.lost_peer(exc, self.cluster, when)
            if message is None:
                raise
            raise UserError(message) from None

    def checkpoint(self, i, test_ds, test_log, crops, writer, bar):
        """Evaluate, log, save the visual results and the checkpoint (the reference's eval block)."""
        import tensorflow as tf

        metrics = self.evaluate(test_ds, test_log)
        count = int(self.counters["loss_count"].numpy())
        training = float(self.counters["loss_sum"].numpy()) / max(count, 1)
        line = format_log(i, training, metrics)
        bar.write(line) if bar is not None and not bar.disable else self.out(line)
        if not np.isfinite(metrics["loss"]):
            raise self.nonfinite_stop(f"the test loss became {metrics['loss']}", i)
        self.counters["loss_sum"].assign(0.0)
        self.counters["loss_count"].assign(0)
        if not self.chief:
            return
        utils.append_text(os.path.join(self.args["models_dir"], "logs.txt"), line + "\n")
        if writer is not None:
            with writer.as_default(step=i):
                tf.summary.scalar("train/loss_since_last_eval", training)
                for key in ("loss", "content", "mse", "psnr", "ms_ssim"):
                    if key in metrics:
                        tf.summary.scalar(f"test/{key}", metrics[key])
        self.save_visuals(i, crops, writer)
        if writer is not None:
            writer.flush()
        self.save(i)

    def save(self, i):
        """Write the checkpoint of iteration ``i`` (the chief; the other tasks write nothing)."""
        prefix = utils.checkpoint_prefix(self.args["models_dir"], self.level, i)
        if not self.chief:
            return
        try:
            checkpoints.save_training_checkpoint(self.model, base_optimizer(self.optimizer), self.counters, prefix)
        except checkpoints.NonFiniteWeights as err:
            raise self.nonfinite_stop(f"the weights became NaN or Inf ({err.count} values)", i) from None
        self.last_good = prefix

    def nonfinite_stop(self, what, i):
        """The one-line error that stops a run gone non-finite; only a checkpoint with finite
        weights is named as good (see save_checkpoint)."""
        where = f"the last good checkpoint is {self.last_good}" if self.last_good else "no checkpoint was written"
        if not self.chief:
            where = f"the chief ({self.cluster.chief.name if self.cluster else 'worker 0'}) keeps the last good one"
        return UserError(f"{what} at iteration {i} of level {self.level}: stopping without saving ({where}); "
                         f"try a lower learning_rate")


# ---------------------------------------------------------------------------------------

def smallest_batch(args) -> int:
    """The fewest images one call of the network sees in this run (per replica): a micro-batch,
    an evaluation batch or the visual results."""
    per_worker = micro_batch(args) // max(1, cluster_module.task_count())
    return max(1, min(per_worker, args["eval_batch_size"], NUM_VISUAL))


def main(argv):
    args = parse_arguments(argv)
    print("parameters:")
    utils.print_args({a.name: args[a.name] for a in SPEC})
    utils.select_cpu_kernels(training=True, smallest_batch=smallest_batch(args))
    print(load_dataset.describe_dataset(args["dataset_dir"]))
    strategy = cluster_module.make_strategy(args["strategy"], args["devices"], args["cluster_timeout"])
    configure(args)
    print(f"strategy: {type(strategy).__name__}, {strategy.num_replicas_in_sync} replica(s)")
    Trainer(args, strategy).run()


if __name__ == "__main__":
    sys.exit(utils.run(main))
