"""The training of one level: what train_model.py runs once its arguments are checked.

``Trainer(args, strategy)`` sets everything up (preflight.check's cheap checks first, unless
train_model.py made them before TensorFlow started) and ``run()`` trains: the reference's
loop, evaluation, log line, visual results and checkpoints, plus resume, Ctrl-C / SIGTERM and
several workers (through a coordinator, coordination.py, that does nothing for one process).
"""

import os
import signal
import sys
import threading
import time
import weakref

import numpy as np
import tensorflow as tf
from tqdm import tqdm

import checkpoints
import coordination
import data_pipeline
import files
import images
import load_dataset
import preflight
import resume
import train_state
import utils
import vgg
from cli import UsageError, UserError
from model import PyNET, level_model, precision_of
from render import level_function
from steps import Steps, base_optimizer, build_optimizer


def micro_batch(args) -> int:
    """The images of one forward pass: batch_size / accum_steps (train_model.parse_arguments
    checks that it divides)."""
    return args["batch_size"] // args["accum_steps"]


class TrainingStopped(UserError):
    """Ctrl-C or SIGTERM: a checkpoint was written, exit status 130."""

    exit_code = 130


# ---------------------------------------------------------------------------------------
# data

def train_data(args, start_step: int = 0, shard=(0, 1), replica_batch=None, indices=None):
    """The training stream, positioned after ``start_step`` optimizer steps (for resume=true).
    The plan is that of optimizer steps of batch_size samples (subset redraws included), cut
    into accum_steps micro-batches; ``shard=(i, n)`` keeps input pipeline i's share of each
    micro-batch, before any file is read, in batches of ``replica_batch`` (default: the share).
    Returns (dataset, error log)."""
    return data_pipeline.train_dataset(
        args["dataset_dir"], args["level"], args["batch_size"], train_size=args["train_size"],
        whole=args["whole_dataset"], patch=args["patch_size"], seed=args["seed"], skip_bad=args["skip_bad"],
        refresh_every=args["refresh_every"], start_batch=start_step, micro_batches=args["accum_steps"],
        shard=shard, out_batch=replica_batch, indices=indices)


def test_data(args, indices):
    """The test split's usable patches ``indices`` in batches of eval_batch_size, and its error log."""
    return data_pipeline.test_dataset(args["dataset_dir"], args["level"], args["eval_batch_size"],
                                      patch=args["patch_size"], skip_bad=args["skip_bad"], indices=indices)


def visual_crops(args, test_indices):
    """The fixed test crops shown at every evaluation: utils.NUM_VISUAL random test patches (with
    replacement, as the reference's randint), centre-cropped like the test split."""
    rs = np.random.RandomState(args["seed"])
    chosen = [test_indices[j] for j in rs.randint(0, len(test_indices), utils.NUM_VISUAL)]
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
    return [images.to_uint(np.hstack((p, t)), 8, stretch) for p, t in zip(predictions, targets)]


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


# ---------------------------------------------------------------------------------------
# the trainer


class Trainer:
    """Everything a run needs, set up in ``__init__`` (cheap checks first), run by ``run()``.

    ``model`` may be passed in (a full PyNET built in ``strategy``'s scope) to reuse one across
    runs; ``stop`` is a StopRequest; ``on_step(i, loss)`` is called after each step (tests);
    ``plan`` is preflight.check's result when the caller made the checks. The writing process
    holds models_dir (run_lock) from the checks until run() ends, the setup fails or the
    Trainer is dropped.
    """

    def __init__(self, args, strategy=None, model=None, stop=None, on_step=None, out=print, plan=None):
        self.args, self.out = args, out
        self.level = args["level"]
        self.strategy = strategy or tf.distribute.get_strategy()
        self.team = coordination.coordinator(self.strategy)
        self.chief = self.team.chief
        self.stop = stop or StopRequest()
        self.on_step = on_step
        self.replicas = self.strategy.num_replicas_in_sync
        self.distributed = self.replicas > 1 or self.team.tasks > 1
        self.plan = plan
        try:
            self.team.agree_on_start(lambda: self.prepare(plan), args)
            self.build(model)
            self.restore_start()
        except BaseException:
            self.release()
            raise
        # a Trainer set up but never run (tests, benchmarks) gives the folder up when dropped
        weakref.finalize(self, self.plan.release)

    def prepare(self, plan=None):
        """The checks (preflight.check, unless their ``plan`` is given), those that need the
        strategy, and the input pipelines of one device; returns the start point."""
        args = self.args
        self.plan = plan or preflight.check(args, writer=self.chief, out=self.out)
        self.start = self.plan.start
        if micro_batch(args) % self.replicas:
            raise UsageError(f"batch_size / accum_steps = {micro_batch(args)} is not divisible by the {self.replicas} "
                             f"replicas of the strategy")
        self.test_ds, self.test_log = test_data(args, self.plan.test_indices)
        if not self.distributed:  # under a strategy, each input pipeline is built in run() for its share
            self.train_ds, self.train_log = train_data(args, self.start.iteration + 1,
                                                       indices=self.plan.train_indices)
        return self.start

    def build(self, model):
        """The model (``model``, or a new PyNET), the level's view of it, the VGG-19 of the
        content loss, a fresh Adam, the loop's counters and the compiled steps."""
        args = self.args
        with self.strategy.scope():
            self.vgg = vgg.load_vgg(args["vgg_dir"]) if self.plan.needs_vgg else None
            if model is None:
                model = PyNET(instance_norm=True, instance_norm_level_1=False, init=args["init"],
                              precision=args["precision"])
            elif precision_of(model) != args["precision"]:
                raise ValueError(f"the model given computes in {precision_of(model)}, not {args['precision']}")
            self.model = model
            self.view = level_model(self.model, self.level)
            self.optimizer = build_optimizer(args)
            base_optimizer(self.optimizer).build(self.view.trainable_variables)
            if args["precision"] == "fp16":  # the LossScaleOptimizer's own state
                self.optimizer.build(self.view.trainable_variables)
            self.counters = {"iteration": tf.Variable(-1, dtype=tf.int64, trainable=False),
                             "loss_sum": tf.Variable(0.0, dtype=tf.float64, trainable=False),
                             "loss_count": tf.Variable(0, dtype=tf.int64, trainable=False)}
        self.steps = Steps(self.strategy, self.view, self.optimizer, self.level, self.vgg, args["batch_size"],
                           args["accum_steps"], args["precision"], args["xla"], self.distributed,
                           loss_kind=args["loss"])

    def restore_start(self):
        """Load the weights the run starts from (and, resuming, the training state); say what
        they are."""
        start = self.start
        self.last_good = start.prefix if start.kind == "resume" else None  # a checkpoint with finite weights
        if start.kind == "init_from":
            # any checkpoint, named by no run of this folder: no earlier intact one to point to
            checkpoints.load_checkpoint(self.model, start.prefix)
        with checkpoints.naming_intact(start.prefix or "", resume=start.kind == "resume"):
            if start.kind in ("handover", "resume"):
                checkpoints.load_checkpoint(self.model, start.prefix)
            if start.kind == "resume":
                train_state.restore_state(base_optimizer(self.optimizer), self.counters, start.prefix)
        if start.kind == "resume":
            base_optimizer(self.optimizer).learning_rate = self.args["learning_rate"]
            if int(self.counters["iteration"].numpy()) != start.iteration:
                raise UserError(f"{checkpoints.state_prefix(start.prefix)}: holds iteration "
                                f"{int(self.counters['iteration'].numpy())}, expected {start.iteration}")
        what = {"scratch": "from scratch", "handover": f"from {start.prefix}",
                "init_from": f"from {start.prefix} (init_from)",
                "resume": f"resuming after iteration {start.iteration} ({start.prefix})"}[start.kind]
        self.out(f"level {self.level}: {what}")

    def release(self):
        """Give models_dir up (idempotent)."""
        if self.plan is not None:
            self.plan.release()

    # -- evaluation ------------------------------------------------------------------------

    def evaluate(self, test_ds, test_log):
        sums, count = {}, 0
        for raw, target in data_pipeline.batches(test_ds, test_log):
            values = self.steps.evaluate(raw, target)
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            count += 1
        if count == 0:
            raise UserError("the evaluation found no complete test batch")
        return {key: value / count for key, value in sums.items()}

    def save_visuals(self, i, crops, writer):
        raw, targets = crops
        predict = level_function(self.model, self.level, xla=self.args["xla"])
        predictions = predict(raw).numpy().astype(np.float32)
        pictures = visual_images(predictions, targets, self.args["visual_stretch"])
        for idx, picture in enumerate(pictures):
            name = f"pynet_img_{idx}_level_{self.level}_iter_{i}.jpg"
            images.write_jpeg(os.path.join(self.args["results_dir"], name), picture)
        if writer is not None:
            with writer.as_default(step=i):
                tf.summary.image("visual/prediction_target", np.stack(visual_images(predictions, targets, False)),
                                 max_outputs=len(pictures))

    # -- the loop ----------------------------------------------------------------------------

    def run(self):
        """Train; returns the last good checkpoint (the last one this task wrote, else the one it
        resumed from), None when there is none. models_dir is given up at the end."""
        try:
            return self._run()
        finally:
            self.release()

    def _run(self):
        args, level = self.args, self.level
        last_iter = args["num_train_iters"]
        first = int(self.counters["iteration"].numpy()) + 1  # 0, or the step after the resumed one
        if self.chief:
            self.open_folders()
        if first > last_iter:
            self.out(f"level {level} already has {first} of {last_iter + 1} steps: nothing to do")
            return self.last_good

        crops = visual_crops(args, self.plan.test_indices)
        iterator, train_log = self.train_input(first)
        writer = None
        if args["tensorboard"] and self.chief:
            writer = tf.summary.create_file_writer(resume.summaries_dir(args["models_dir"], level))
        restore_handlers = self.stop.install()
        bar = None
        try:
            bar = tqdm(total=last_iter + 1, initial=first, unit="it", desc=f"level {level}", file=sys.stderr,
                       disable=not args["progress"], dynamic_ncols=True)
            self.loop(first, last_iter, lambda: next_batch(iterator, train_log), crops, writer, bar)
        finally:
            if bar is not None:
                bar.close()
            restore_handlers()
            if writer is not None:
                writer.close()
        return self.last_good

    def open_folders(self):
        """The writer's folders: temporaries of killed runs and (overwrite=true) the level's
        earlier checkpoints removed; logs.txt emptied, as the reference does at every run, or on
        resume cut back to the checkpoint it continues (resume.trim_log says why)."""
        args = self.args
        resume.prepare_folders(args, self.start.kind, log=self.out)
        files.makedirs(args["models_dir"])
        files.makedirs(args["results_dir"])
        logs = os.path.join(args["models_dir"], "logs.txt")
        if self.start.kind == "resume" and files.exists(logs):
            resume.trim_log(logs, self.start.iteration)
        else:
            files.write_file(logs, b"")

    def loop(self, first, last_iter, next_input, crops, writer, bar):
        """Iterations ``first`` to ``last_iter``: a step, its counters, and at each eval_step the
        evaluation and checkpoint; a stop request saves and stops after the current step."""
        level = self.level
        wait_total, step_total = 0.0, 0.0
        for i in range(first, last_iter + 1):
            t0 = time.perf_counter()
            with self.team.lost_peer(f"during iteration {i} of level {level}"):
                loss, waited = self.steps.train_step(next_input)
                self.stop.reason = self.team.agreed_stop(self.stop.reason)
            step_total += time.perf_counter() - t0
            wait_total += waited
            self.count(i, loss, writer)
            count = int(self.counters["loss_count"].numpy())
            bar.set_postfix(loss=f"{float(self.counters['loss_sum'].numpy()) / count:.4g}",
                            input_wait=f"{100 * wait_total / max(step_total, 1e-9):.0f}%", refresh=False)
            bar.update(1)
            if self.on_step is not None:
                self.on_step(i, loss)
            if i % self.args["eval_step"] == 0 or i == last_iter:
                self.checkpoint(i, crops, writer, bar)
            elif self.stop.reason is not None:
                self.save(i)
            if self.stop.reason is not None and i < last_iter:
                self.team.barrier(f"after iteration {i} of level {level}")
                raise self.stopped(i)
        self.team.barrier(f"after iteration {last_iter} of level {level}")

    def count(self, i, loss, writer):
        """Step ``i``'s loss into the counters (and TensorBoard); a non-finite one stops the run."""
        if not np.isfinite(loss):
            raise self.nonfinite_stop(f"the training loss became {loss}", i)
        self.counters["iteration"].assign(i)
        self.counters["loss_sum"].assign_add(loss)
        self.counters["loss_count"].assign_add(1)
        if writer is not None:
            with writer.as_default(step=i):
                tf.summary.scalar("train/loss", loss)

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
                                 indices=self.plan.train_indices)
            logs.append(log)
            return ds

        dist = self.strategy.distribute_datasets_from_function(dataset_fn)
        return iter(dist), logs[0]

    def checkpoint(self, i, crops, writer, bar):
        """Evaluate, log, save the visual results and the checkpoint (the reference's eval block)."""
        metrics = self.evaluate(self.test_ds, self.test_log)
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
        files.append_text(os.path.join(self.args["models_dir"], "logs.txt"), line + "\n")
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
        if not self.chief:
            return
        prefix = checkpoints.checkpoint_prefix(self.args["models_dir"], self.level, i)
        try:
            train_state.save_training_checkpoint(self.model, base_optimizer(self.optimizer), self.counters, prefix)
        except checkpoints.NonFiniteWeights as err:
            raise self.nonfinite_stop(f"the weights became NaN or Inf ({err.count} values)", i) from None
        self.last_good = prefix

    def stopped(self, i):
        """The one line of a run stopped by Ctrl-C / SIGTERM after iteration ``i``."""
        saved = f"saved {self.last_good}" if self.chief else \
            f"the chief ({self.team.chief_name}) saved iteration {i} in its models_dir"
        return TrainingStopped(f"stopped by {self.stop.reason} after iteration {i} of level {self.level}; "
                               f"{saved}: continue with resume=true")

    def nonfinite_stop(self, what, i):
        """The one-line error that stops a run gone non-finite; only a checkpoint with finite
        weights is named as good (see save_checkpoint)."""
        where = f"the last good checkpoint is {self.last_good}" if self.last_good else "no checkpoint was written"
        if not self.chief:
            where = f"the chief ({self.team.chief_name}) keeps the last good one"
        return UserError(f"{what} at iteration {i} of level {self.level}: stopping without saving ({where}); "
                         f"try a lower learning_rate")
