"""Zurich RAW-to-RGB (ZRR) data: Bayer packing, level targets, validation and the tf.data readers.

Layout under ``dataset_dir`` (the reference's load_dataset.py)::

    train/huawei_raw/{i}.png   448x448 single-channel Bayer mosaic, 10-bit values, 8- or 16-bit PNG
    train/canon/{i}.jpg        448x448 RGB DSLR target
    test/huawei_raw/{i}.png, test/canon/{i}.jpg
    test/huawei_full_resolution/*.png   full-resolution mosaics (test_model.py)

Differences from the reference, all deliberate:

* Training data is streamed from disk with ``tf.data`` instead of being held in RAM as float64
  (the reference needs > 32 GB at level 0, PyNET issue #7). ``train_size`` keeps its meaning: a
  random subset of that many patches, drawn anew every ``refresh_every`` (1000) batches, batches
  drawn from it with replacement. ``whole=True`` streams every training patch, reshuffled each pass.
* Bad files raise ``DataError`` (a ``utils.UserError``) naming the file and what was expected, or,
  with ``skip_bad=True``, are skipped with a warning per file and a count.
* A ``patch`` smaller than 224 (packed pixels) crops mosaic and target at the same place.

Run ``python load_dataset.py help`` for a checker that validates a whole dataset.
"""

import os
import re
import sys
import threading
from typing import Any, NamedTuple

import numpy as np

import utils

# The reference divides 10-bit code values by 4 * 255, not by 1023.
RAW_SCALE = 4 * 255
MAX_RAW_VALUE = utils.WHITE_LEVEL  # 10-bit sensor (Sony IMX380 of the Huawei P20)
MOSAIC = 448                  # side of a ZRR training/test mosaic and of its DSLR JPEG
PATCH = MOSAIC // 2           # side of the packed network input (224)
SPLITS = ("train", "test")
RAW_FOLDER, TARGET_FOLDER, FULL_RES_FOLDER = "huawei_raw", "canon", "huawei_full_resolution"

# A dataset made by make_sample_dataset.py carries this file at its root.
MARKER_FILE = "SYNTHETIC_SAMPLE.txt"
KIND_ZRR = "ZRR"
KIND_SYNTHETIC = "synthetic sample (made by make_sample_dataset.py)"

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_RAW_NAME = re.compile(r"^(\d+)\.png$")
_TARGET_NAME = re.compile(r"^(\d+)\.jpg$")


class DataError(utils.UserError):
    """A dataset file or folder that is missing or not what PyNET expects (one-line message)."""


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# Bayer packing (THE packing function: every script uses it)

def extract_bayer_channels(raw):
    """Pack an RGGB mosaic (H x W) into the network's (H/2) x (W/2) x 4 input, divided by 1020.

    Channel order is the reference's [B, Gb, R, Gr], taken at the mosaic positions
    (1,1), (0,1), (0,0), (1,0); "Gb" is the green on the red rows, as the reference names it.
    """
    raw = np.asarray(raw)
    # An odd row or column has no partner in its 2x2 cell: drop it, as the packing cannot use it.
    raw = raw[: raw.shape[0] // 2 * 2, : raw.shape[1] // 2 * 2]
    ch_b = raw[1::2, 1::2]
    ch_gb = raw[0::2, 1::2]
    ch_r = raw[0::2, 0::2]
    ch_gr = raw[1::2, 0::2]
    packed = np.stack((ch_b, ch_gb, ch_r, ch_gr), axis=-1).astype(np.float32)
    return packed / RAW_SCALE


# ---------------------------------------------------------------------------------------
# sizes per level

def _check_level(level) -> int:
    if level not in utils.LEVELS:
        raise utils.UserError(f"level={level}: expected one of {', '.join(map(str, utils.LEVELS))}")
    return int(level)


def dslr_scale(level) -> float:
    """The reference's DSLR_SCALE = 1 / 2**(level-1): 2, 1, .5, .25, .125, .0625 for levels 0..5."""
    return 1.0 / 2 ** (_check_level(level) - 1)


def target_size(level, patch=PATCH) -> int:
    """Side of the level's output/target for a packed input of side ``patch``: int(patch * DSLR_SCALE)."""
    return int(patch * dslr_scale(level))


def check_patch(patch) -> int:
    """A packed patch side the model accepts: a multiple of 16 between 16 and 224."""
    if isinstance(patch, bool) or not isinstance(patch, (int, np.integer)) or utils.patch_size_check(patch):
        raise utils.UserError(f"patch={patch}: expected a multiple of 16 between 16 and {PATCH} (packed pixels)")
    return int(patch)


def crop_step(level) -> int:
    """Grid of crop offsets (packed pixels) that map to whole target pixels at ``level``.

    A packed offset o is 2·o mosaic pixels and o·2**(1-level) target pixels.
    """
    return max(1, 2 ** (_check_level(level) - 1))


# ---------------------------------------------------------------------------------------
# reading one file

def _read(reader, path):
    """utils' readers, their one-line errors as DataError."""
    try:
        return reader(path)
    except utils.UserError as err:
        raise DataError(str(err)) from None


def read_raw_patch(path: str, size=MOSAIC) -> np.ndarray:
    """A ZRR mosaic PNG as a 2-D uint16 array, checked: single channel, 8- or 16-bit container,
    ``size`` x ``size`` (None: any size), values <= 1023."""
    raw = _read(utils.read_mosaic, path)
    if size is not None and raw.shape != (size, size):
        raise DataError(f"{path}: expected a {size}x{size} mosaic, "
                        f"found {raw.shape[1]}x{raw.shape[0]} (width x height)")
    top = int(raw.max()) if raw.size else 0
    if top > MAX_RAW_VALUE:
        raise DataError(f"{path}: expected 10-bit values (<= {MAX_RAW_VALUE}), found a maximum of {top}")
    return raw


def read_target_image(path: str, size=MOSAIC) -> np.ndarray:
    """A DSLR JPEG as a uint8 H x W x 3 array, checked: RGB, ``size`` x ``size`` (None: any size),
    and decoded strictly: corrupt data is an error, not a warning (utils.read_jpeg)."""
    import io

    from PIL import Image

    if not utils.isfile(path):
        raise DataError(f"{path}: file not found")
    data = utils.read_bytes(path)  # read once: Pillow checks the header, simplejpeg decodes
    try:
        with Image.open(io.BytesIO(data)) as image:  # the header only
            fmt, mode, image_size = image.format, image.mode, image.size
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... for bad files
        reason = str(exc) or exc.__class__.__name__
        raise DataError(f"{path}: cannot decode the JPEG ({reason}): the file is corrupt or truncated") from None
    if fmt != "JPEG":
        raise DataError(f"{path}: expected a JPEG file, found {fmt or 'an unknown format'}")
    if mode != "RGB":
        raise DataError(f"{path}: expected an RGB JPEG, found mode {mode}")
    if size is not None and image_size != (size, size):
        raise DataError(f"{path}: expected a {size}x{size} image, found {image_size[0]}x{image_size[1]}")
    return _read(lambda p: utils.read_jpeg(p, data), path)


def load_target(path, level, patch_mosaic=MOSAIC) -> np.ndarray:
    """The level's target from a DSLR JPEG, as the reference computes it (its load_dataset.py, lines 45-46).

    Pillow BICUBIC resize of the uint8 image by DSLR_SCALE/2 to int(patch_mosaic * factor) pixels
    (what ``scipy.misc.imresize(img, DSLR_SCALE/2, 'bicubic')`` did; level 0 leaves it unchanged),
    then float16(image) / 255 as the reference (its targets carry float16 rounding, <= 2.4e-4),
    returned as float32 H x W x 3 in [0, 1].
    """
    return target_to_float(_target_uint8(path, level, patch_mosaic))


# float16(v) / float16(255) for the 256 uint8 values: the reference's arithmetic, tabulated.
_TARGET_LUT = (np.arange(256, dtype=np.float16) / np.float16(255)).astype(np.float32)


def target_to_float(image_uint8) -> np.ndarray:
    """uint8 -> float32 as the reference (float16 division by 255); contiguous output."""
    return _TARGET_LUT[np.asarray(image_uint8, dtype=np.uint8)]


def _target_uint8(path, level, patch_mosaic=MOSAIC) -> np.ndarray:
    from PIL import Image

    image = read_target_image(path, patch_mosaic)
    side = int(patch_mosaic * (dslr_scale(level) / 2))
    if side != patch_mosaic:
        image = np.asarray(Image.fromarray(image).resize((side, side), Image.BICUBIC))
    return image


def augment(image, k, flip):
    """The reference's augmentation of one sample: np.rot90 by k on H, W, then flipud if ``flip``.

    The same call is applied to the packed RAW and to the target; the Bayer channel order is
    not corrected afterwards (the CFA phase change is part of the augmentation, as in the reference).
    Returns a view.
    """
    image = np.rot90(image, int(k))
    return np.flipud(image) if flip else image


def load_pair(dataset_dir, split, index, level, patch=PATCH, k=0, flip=False, offset=(0, 0)):
    """One (packed RAW [patch, patch, 4], target [T, T, 3]) float32 pair, cropped at the packed
    ``offset`` (multiples of crop_step(level)) and augmented with (k, flip)."""
    raw_path, target_path = patch_paths(dataset_dir, split, index)
    packed = extract_bayer_channels(read_raw_patch(raw_path))
    target = _target_uint8(target_path, level)  # cropped and turned as uint8, converted last
    oy, ox = (int(v) for v in offset)
    if patch < PATCH:
        packed = packed[oy: oy + patch, ox: ox + patch]
        scale = 2.0 ** (1 - level)
        side = target_size(level, patch)
        ty, tx = int(oy * scale), int(ox * scale)
        target = target[ty: ty + side, tx: tx + side]
    return np.ascontiguousarray(augment(packed, k, flip)), target_to_float(augment(target, k, flip))


# ---------------------------------------------------------------------------------------
# dataset layout

def dataset_kind(dataset_dir) -> str:
    """"ZRR", or the synthetic-sample label when make_sample_dataset.py's marker file is present."""
    return KIND_SYNTHETIC if utils.isfile(os.path.join(dataset_dir, MARKER_FILE)) else KIND_ZRR


def describe_dataset(dataset_dir) -> str:
    """The line every script prints about the data it reads."""
    kind = dataset_kind(dataset_dir)
    if kind == KIND_SYNTHETIC:
        return f"dataset: {dataset_dir} is a {kind}, NOT the Zurich RAW-to-RGB dataset (see {MARKER_FILE})"
    return f"dataset: {dataset_dir} ({kind} layout)"


def split_dir(dataset_dir, split) -> str:
    if split not in SPLITS:
        raise utils.UserError(f"split={split}: expected train or test")
    return os.path.join(dataset_dir, split)


def patch_paths(dataset_dir, split, index):
    folder = split_dir(dataset_dir, split)
    return (os.path.join(folder, RAW_FOLDER, f"{int(index)}.png"),
            os.path.join(folder, TARGET_FOLDER, f"{int(index)}.jpg"))


def _require_folder(path: str, what: str) -> None:
    if not utils.isdir(path):
        hint = (" (get the ZRR dataset, see README, or make a sample: python make_sample_dataset.py)"
                if what == "dataset folder" else "")
        raise DataError(f"{path}: {what} not found{hint}")


def _indexed_files(folder: str, pattern) -> dict:
    found = {}
    for name in utils.listdir(folder):
        match = pattern.match(name)
        if match:
            found[int(match.group(1))] = name
    return found


def num_patches(dataset_dir, split) -> int:
    """Number of {i}.png mosaics in ``split/huawei_raw`` (the reference counts this folder)."""
    _require_folder(dataset_dir, "dataset folder")
    folder = os.path.join(split_dir(dataset_dir, split), RAW_FOLDER)
    _require_folder(folder, "folder of RAW mosaics")
    return len(_indexed_files(folder, _RAW_NAME))


def _tail(path: str, count: int) -> bytes:
    with utils.open_file(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        handle.seek(max(0, handle.tell() - count))
        return handle.read()


def check_files_quick(raw_path: str, target_path: str) -> None:
    """Cheap per-pair check (headers and file ends, no decoding): format, mode, 448x448,
    and truncation. The full decode (corrupt data, values > 1023) happens when a file is read."""
    from PIL import Image

    for path, kind in ((raw_path, "PNG"), (target_path, "JPEG")):
        if not utils.isfile(path):
            raise DataError(f"{path}: file not found")
        try:
            with utils.open_file(path, "rb") as handle, Image.open(handle) as image:
                fmt, mode, size = image.format, image.mode, image.size
        except Exception as exc:
            raise DataError(f"{path}: not a readable {kind} ({str(exc) or exc.__class__.__name__})") from None
        if fmt != kind:
            raise DataError(f"{path}: expected a {kind} file, found {fmt}")
        if kind == "PNG" and mode not in ("L", "I;16", "I;16B", "I;16L"):
            raise DataError(f"{path}: expected a single-channel 8- or 16-bit Bayer mosaic, found a PNG of mode {mode}")
        if kind == "JPEG" and mode != "RGB":
            raise DataError(f"{path}: expected an RGB JPEG, found mode {mode}")
        if size != (MOSAIC, MOSAIC):
            what = "mosaic" if kind == "PNG" else "image"
            raise DataError(f"{path}: expected a {MOSAIC}x{MOSAIC} {what}, found {size[0]}x{size[1]}")
        tail = _tail(path, 64)
        complete = (_PNG_IEND if kind == "PNG" else b"\xff\xd9") in tail
        if not complete:
            end = "IEND chunk" if kind == "PNG" else "end-of-image marker"
            raise DataError(f"{path}: truncated {kind} (no {end} at the end of the file)")


def check_files_deep(raw_path: str, target_path: str) -> None:
    """Decode both files and check them as the training pipeline does."""
    read_raw_patch(raw_path)
    read_target_image(target_path)


def check_dataset(dataset_dir, split, skip_bad=False, deep=False, verbose=True) -> list:
    """Validate ``split`` of the dataset and return the sorted indices of its usable patches.

    Checks: the folders exist; every {i}.png has its {i}.jpg and vice versa (same counts);
    every file's header (PNG: single channel, 8/16-bit, 448x448; JPEG: RGB, 448x448) and end
    (truncation). ``deep=True`` also decodes every file (corrupt data, values > 1023); otherwise
    that is checked as each file is read. Raises DataError naming the first bad file, or with
    ``skip_bad`` warns once per bad file, drops it and prints the count at the end.
    """
    _require_folder(dataset_dir, "dataset folder")
    folder = split_dir(dataset_dir, split)
    _require_folder(folder, f"'{split}' split folder")
    raw_folder, target_folder = os.path.join(folder, RAW_FOLDER), os.path.join(folder, TARGET_FOLDER)
    _require_folder(raw_folder, "folder of RAW mosaics (huawei_raw)")
    _require_folder(target_folder, "folder of DSLR targets (canon)")
    raws, targets = _indexed_files(raw_folder, _RAW_NAME), _indexed_files(target_folder, _TARGET_NAME)
    if not raws and not targets:
        raise DataError(f"{folder}: no patches found (expected {RAW_FOLDER}/0.png, {TARGET_FOLDER}/0.jpg, ...)")

    bad = []

    def reject(message):
        if not skip_bad:
            raise DataError(message)
        bad.append(message)
        if verbose:
            warn(f"skipping: {message}")

    if len(raws) != len(targets) or raws.keys() != targets.keys():
        only_raw, only_target = sorted(raws.keys() - targets.keys()), sorted(targets.keys() - raws.keys())
        first = (os.path.join(target_folder, f"{only_raw[0]}.jpg") if only_raw
                 else os.path.join(raw_folder, f"{only_target[0]}.png"))
        summary = (f"{folder}: {len(raws)} RAW mosaics in {RAW_FOLDER}/ but {len(targets)} DSLR targets in "
                   f"{TARGET_FOLDER}/, expected one {{i}}.jpg for each {{i}}.png")
        if not skip_bad:
            raise DataError(f"{summary} ({first} is missing)")
        warn(summary)
        for i in only_raw:
            reject(f"{os.path.join(target_folder, f'{i}.jpg')}: file not found (its mosaic {i}.png has no target)")
        for i in only_target:
            reject(f"{os.path.join(raw_folder, f'{i}.png')}: file not found (its target {i}.jpg has no mosaic)")

    check = check_files_deep if deep else check_files_quick
    good = []
    for i in sorted(raws.keys() & targets.keys()):
        raw_path, target_path = patch_paths(dataset_dir, split, i)
        try:
            check(raw_path, target_path)
        except DataError as err:
            reject(str(err))
            continue
        good.append(i)
    if bad and verbose:
        warn(f"{folder}: skipped {len(bad)} bad file(s); {len(good)} usable patches remain")
    if not good:
        raise DataError(f"{folder}: no usable patches")
    return good


# ---------------------------------------------------------------------------------------
# tf.data pipelines

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


class Pipeline(NamedTuple):
    """What train_dataset and test_dataset return."""

    dataset: Any  # tf.data.Dataset of (raw, target) batches
    log: ErrorLog


def decode_threads() -> int:
    """Threads that read and decode patches: one per four CPU cores (17 ms per level-5
    sample on one core, a few % of a training step's work)."""
    return max(1, (os.cpu_count() or 1) // 4)


def _pipeline(plan_dataset, dataset_dir, split, level, patch, batch_size, skip_bad, drop_remainder):
    import tensorflow as tf

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
    return Pipeline(ds.with_options(options), log)


def _check_positive(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise utils.UserError(f"{name}={value}: expected a positive integer")
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
    Returns a Pipeline: the tf.data dataset and its ErrorLog.

    For accumulation and several input pipelines (tf.distribute), the plan of each batch of
    ``batch_size`` is cut into ``micro_batches`` consecutive micro-batches, and ``shard=(i, n)``
    keeps the i-th of n equal consecutive parts of each micro-batch, before any file is read,
    so that a worker decodes only its own samples; the stream is then batched by ``out_batch``
    (default: the part). ``indices``: the usable patches, when check_dataset already ran.
    """
    import tensorflow as tf

    level, patch = _check_level(level), check_patch(patch)
    batch_size = _check_positive("batch_size", batch_size)
    train_size = _check_positive("train_size", train_size)
    refresh_every = _check_positive("refresh_every", refresh_every)
    micro = batch_size // _check_positive("micro_batches", micro_batches)
    shard_index, shards = (int(v) for v in shard)
    if micro * micro_batches != batch_size or micro % shards or not 0 <= shard_index < shards:
        raise utils.UserError(f"batch_size={batch_size}: cannot be cut into micro_batches={micro_batches} equal "
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
    Returns a Pipeline: the tf.data dataset and its ErrorLog.
    """
    import tensorflow as tf

    level, patch = _check_level(level), check_patch(patch)
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


# ---------------------------------------------------------------------------------------
# command line: validate a dataset

SPEC = [
    utils.dataset_dir_arg(),
    utils.Arg("split", str, "both", "which split to check.", choices=("train", "test", "both")),
    utils.Arg("deep", utils.BOOL, True, "decode every file (corrupt data, values above 1023); false = headers only"),
    utils.Arg("skip_bad", utils.BOOL, False, "report every bad file and a count instead of stopping at the first"),
]


def main(argv):
    args = utils.parse_args(argv, SPEC, "load_dataset.py",
                            "Check a ZRR-layout dataset: folders, file pairs, sizes, formats, 10-bit values.")
    _require_folder(args["dataset_dir"], "dataset folder")
    print(describe_dataset(args["dataset_dir"]))
    splits = SPLITS if args["split"] == "both" else (args["split"],)
    for split in splits:
        total = len(_indexed_files(os.path.join(split_dir(args["dataset_dir"], split), RAW_FOLDER), _RAW_NAME)) \
            if utils.isdir(os.path.join(split_dir(args["dataset_dir"], split), RAW_FOLDER)) else 0
        good = check_dataset(args["dataset_dir"], split, skip_bad=args["skip_bad"], deep=args["deep"])
        print(f"{split}: {len(good)} usable patches ({total} mosaics found)")
    full = os.path.join(args["dataset_dir"], "test", FULL_RES_FOLDER)
    if utils.isdir(full):
        print(f"test/{FULL_RES_FOLDER}: {sum(n.lower().endswith('.png') for n in utils.listdir(full))} PNG files")


if __name__ == "__main__":
    sys.exit(utils.run(main))
