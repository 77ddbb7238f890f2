"""The tf.data streams of the dataset's splits: training batches drawn as the reference draws
them, test batches in order, bad files reported in one line.

``train_dataset`` / ``test_dataset`` return a ``Stream``: the tf.data dataset and the
``ErrorLog`` of the files its readers met; iterate with ``batches(dataset, log)`` so that a
bad file that ended a stream becomes its one-line DataError.
"""

import os
import threading
from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf

import cli
from load_dataset import (
    PATCH,
    DataError,
    check_dataset,
    check_level,
    check_patch,
    crop_step,
    load_pair,
    patch_paths,
    target_size,
    warn,
)


class ErrorLog:
    """Errors met while a pipeline reads files (shared by its worker threads); ``first`` is the
    first one, which ``batches`` raises once the stream it ended is exhausted."""

    def __init__(self, skip_bad: bool):
        self.skip_bad = skip_bad
        self.first = None
        self.bad = set()
        self._lock = threading.Lock()

    def record(self, message: str, path_key: str) -> None:
        with self._lock:
            if self.first is None:
                self.first = message
            if path_key in self.bad:
                return
            self.bad.add(path_key)
            count = len(self.bad)
        if self.skip_bad:
            warn(f"skipping: {message} ({count} bad patch(es) skipped so far)")


class Stream(NamedTuple):
    """What train_dataset and test_dataset return."""

    dataset: Any  # tf.data.Dataset of (raw, target) batches
    log: ErrorLog


def decode_threads() -> int:
    """Threads that read and decode patches: one per four CPU cores, as decoding is a small
    share of a training step's work (benchmarks/README.md, "Data pipeline")."""
    return max(1, (os.cpu_count() or 1) // 4)


def _pipeline(plan_dataset, dataset_dir, split, level, patch, batch_size, skip_bad, drop_remainder):
    side = target_size(level, patch)
    log = ErrorLog(skip_bad)

    def load(plan):
        index, k, flip, oy, ox = (int(v) for v in plan)
        try:
            raw, target = load_pair(dataset_dir, split, index, level, patch, k, flip, (oy, ox))
            return raw, target, np.bool_(True)
        except DataError as err:
            log.record(str(err), str(index))
        except Exception as exc:  # never let a reader crash the pipeline without naming the patch
            log.record(f"{patch_paths(dataset_dir, split, index)[0]}: cannot read this patch "
                       f"({exc.__class__.__name__}: {exc})", str(index))
        return (np.zeros((patch, patch, 4), np.float32), np.zeros((side, side, 3), np.float32), np.bool_(False))

    @tf.autograph.experimental.do_not_convert
    def load_op(plan):
        raw, target, ok = tf.numpy_function(load, [plan], (tf.float32, tf.float32, tf.bool), stateful=False)
        raw.set_shape((patch, patch, 4))
        target.set_shape((side, side, 3))
        ok.set_shape(())
        return raw, target, ok

    @tf.autograph.experimental.do_not_convert
    def is_good(raw, target, ok):
        return ok

    @tf.autograph.experimental.do_not_convert
    def drop_flag(raw, target, ok):
        return raw, target

    ds = plan_dataset.map(load_op, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    # A bad file either ends the stream (the error is raised by batches()) or is dropped.
    ds = ds.filter(is_good) if skip_bad else ds.take_while(is_good)
    ds = ds.map(drop_flag)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    ds = ds.prefetch(2)  # two batches ready ahead of the training step: bounded memory
    # Decoding runs on its own few threads (one per four cores) rather than TensorFlow's
    # shared pool: it keeps two batches ready while leaving the cores to the training step.
    options = tf.data.Options()
    options.threading.private_threadpool_size = decode_threads()
    options.threading.max_intra_op_parallelism = 1
    return Stream(ds.with_options(options), log)


def _check_positive(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise cli.UserError(f"{name}={value}: expected a positive integer")
    return int(value)


def train_plan(indices, batch_size, train_size=5000, whole=False, patch=PATCH, level=0, seed=0,
               refresh_every=1000, augment=True):
    """Infinite generator of (index, k, flip, crop_y, crop_x), one per training sample.

    ``whole=False`` (the reference): ``train_size`` distinct patches drawn without replacement,
    each batch drawn from them with replacement; redrawn after the first batch and then every
    ``refresh_every`` batches (the reference redraws at i % 1000 == 0, i.e. also right after
    step 0). ``whole=True``: every patch once per pass, reshuffled each pass.
    Rotation k = randint(1, 100) % 4 and flip = randint(1, 100) % 2 (numpy RandomState, drawn
    as the reference: k=0 has probability 24/99, k=1..3 25/99 each; flip 50/99).
    """
    rs = np.random.RandomState(seed)
    indices = np.asarray(indices, dtype=np.int64)
    train_size = min(train_size, len(indices))
    step = crop_step(level)
    positions = (PATCH - patch) // step + 1

    def sample(index):
        k = rs.randint(1, 100) % 4 if augment else 0
        flip = rs.randint(1, 100) % 2 if augment else 0
        oy = rs.randint(0, positions) * step if patch < PATCH else 0
        ox = rs.randint(0, positions) * step if patch < PATCH else 0
        return np.array((index, k, flip, oy, ox), dtype=np.int64)

    if whole:
        while True:
            for index in rs.permutation(indices):
                yield sample(index)
    batches_in_subset = 1
    while True:
        subset = indices[rs.choice(len(indices), train_size, replace=False)]
        for _ in range(batches_in_subset):
            for j in rs.randint(0, train_size, batch_size):
                yield sample(subset[j])
        batches_in_subset = refresh_every


class PlanBatches:
    """``train_plan``'s stream cut into batches, given by batch number, for a tf.data map.

    Not ``tf.data.Dataset.from_generator``: building its kernel on Python 3.11 makes TensorFlow
    fix glibc's mmap threshold at 128 KiB for the whole process (ApplyPython311MemoryPatch), so
    every map, weight reorder and gradient of the training step is then a fresh mmap whose pages
    fault in again each step: 170,000 page faults per level-3 step instead of 4,400, and steps
    15-40% slower at levels 3 to 0 (benchmarks/README.md, "Training step"). Numbers asked in
    order continue the stream; an earlier number (a new iterator) restarts it, so every
    iterator sees the same stream.
    """

    def __init__(self, make_plan, batch_size):
        self.make_plan, self.batch_size = make_plan, batch_size
        self.plan, self.next_number = None, None
        # two live iterators (one still prefetching) call from tf.data's threads at once: one
        # batch is cut at a time, or they would draw from the shared stream in between
        self.lock = threading.Lock()

    def batch(self, number):
        number = int(number)
        with self.lock:
            if self.plan is None or number < self.next_number:
                self.plan, self.next_number = self.make_plan(), 0
            for _ in range((number - self.next_number) * self.batch_size):  # skipped: drawn, never read
                next(self.plan)
            self.next_number = number + 1
            return np.stack([next(self.plan) for _ in range(self.batch_size)])


def train_dataset(dataset_dir, level, batch_size, train_size=5000, whole=False, patch=PATCH, seed=0,
                  skip_bad=False, refresh_every=1000, augment=True, verbose=True, start_batch=0,
                  micro_batches=1, shard=(0, 1), out_batch=None, indices=None):
    """Infinite stream of training batches (raw [B, patch, patch, 4], target [B, T, T, 3]), float32.

    Files are read from disk as needed (parallel decode, 2 batches prefetched), so memory does
    not grow with ``train_size``. See ``train_plan`` for the sampling and augmentation; a patch
    below 224 is a random crop, the same on RAW and target. Iterate with ``batches(dataset, log)`` so that a
    bad file met on the way becomes a one-line DataError (without it the stream just ends).
    A ``train_size`` larger than the dataset is reduced to it, with a warning. ``start_batch=n``
    resumes the same stream after its first n batches without reading their files.
    Returns a Stream: the tf.data dataset and its ErrorLog.

    For accumulation and several input pipelines (tf.distribute), the plan of each batch of
    ``batch_size`` is cut into ``micro_batches`` consecutive micro-batches, and ``shard=(i, n)``
    keeps the i-th of n equal consecutive parts of each micro-batch, before any file is read,
    so that a worker decodes only its own samples; the stream is then batched by ``out_batch``
    (default: the part). ``indices``: the usable patches, when check_dataset already ran.
    """
    level, patch = check_level(level), check_patch(patch)
    batch_size = _check_positive("batch_size", batch_size)
    train_size = _check_positive("train_size", train_size)
    refresh_every = _check_positive("refresh_every", refresh_every)
    micro = batch_size // _check_positive("micro_batches", micro_batches)
    shard_index, shards = (int(v) for v in shard)
    if micro * micro_batches != batch_size or micro % shards or not 0 <= shard_index < shards:
        raise cli.UserError(f"batch_size={batch_size}: cannot be cut into micro_batches={micro_batches} equal "
                              f"micro-batches of {shards} equal parts each")
    part = micro // shards
    out_batch = _check_positive("out_batch", out_batch if out_batch is not None else part)
    if indices is None:
        indices = check_dataset(dataset_dir, "train", skip_bad=skip_bad, verbose=verbose)
    if not whole and train_size > len(indices):
        if verbose:
            warn(f"train_size={train_size} is larger than the {len(indices)} training patches "
                 f"of {dataset_dir}: using all {len(indices)}")
        train_size = len(indices)

    stream = PlanBatches(lambda: train_plan(indices, batch_size, train_size, whole, patch, level, seed,
                                            refresh_every, augment), batch_size)
    plans = tf.data.Dataset.range(int(start_batch), np.iinfo(np.int64).max).map(
        lambda number: tf.ensure_shape(tf.numpy_function(stream.batch, [number], tf.int64, stateful=True),
                                       (batch_size, 5))).unbatch()
    if shards > 1:
        @tf.autograph.experimental.do_not_convert
        def own_part(micro_plan):
            return micro_plan[shard_index * part: (shard_index + 1) * part]

        plans = plans.batch(micro, drop_remainder=True).map(own_part).unbatch()
    return _pipeline(plans, dataset_dir, "train", level, patch, out_batch, skip_bad, drop_remainder=True)


def test_dataset(dataset_dir, level, batch_size, patch=PATCH, drop_remainder=True, skip_bad=False, verbose=True,
                 indices=None):
    """The test split in index order, finite: (raw [B, patch, patch, 4], target [B, T, T, 3]).

    As the reference's evaluation, the last incomplete batch is dropped (``drop_remainder``).
    Every test file is decoded and checked once here (the split is small), so a bad file is a
    DataError now rather than a short evaluation later; ``indices``: the usable patches, when
    the caller ran that check (check_dataset with deep=True). A patch below 224 is a centre crop.
    Returns a Stream: the tf.data dataset and its ErrorLog.
    """
    level, patch = check_level(level), check_patch(patch)
    batch_size = _check_positive("batch_size", batch_size)
    if indices is None:
        indices = check_dataset(dataset_dir, "test", skip_bad=skip_bad, deep=True, verbose=verbose)
    step = crop_step(level)
    offset = (PATCH - patch) // 2 // step * step
    plans = np.array([(i, 0, 0, offset, offset) for i in indices], dtype=np.int64)
    return _pipeline(tf.data.Dataset.from_tensor_slices(plans), dataset_dir, "test", level, patch,
                     batch_size, skip_bad, drop_remainder)


def batches(dataset, log):
    """Iterate a pipeline's dataset (or one derived from it: ``ds.take(n)``...); if a bad file
    ended it early, raise ``log``'s one-line DataError."""
    yield from dataset
    if log.first is not None and not log.skip_bad:
        raise DataError(log.first)
