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
* Bad files raise ``DataError`` (a ``cli.UserError``) naming the file and what was expected, or,
  with ``skip_bad=True``, are skipped with a warning per file and a count.
* A ``patch`` smaller than 224 (packed pixels) crops mosaic and target at the same place.

Run ``python load_dataset.py help`` for a checker that validates a whole dataset.
"""

import os
import re
import sys

import numpy as np
from PIL import Image

import camera
import cli
import files
import images
import utils

MOSAIC = 448                  # side of a ZRR training/test mosaic and of its DSLR JPEG
PATCH = MOSAIC // 2           # side of the packed network input (224)
SPLITS = ("train", "test")
RAW_FOLDER, TARGET_FOLDER, FULL_RES_FOLDER = "huawei_raw", "canon", "huawei_full_resolution"

# A dataset made by make_sample_dataset.py carries this file at its root, one made by
# make_dataset.py from your own camera's pairs the other.
MARKER_FILE = "SYNTHETIC_SAMPLE.txt"
OWN_MARKER_FILE = "MADE_BY_MAKE_DATASET.txt"
KIND_ZRR = "ZRR"
KIND_SYNTHETIC = "synthetic sample (made by make_sample_dataset.py)"
KIND_OWN = "your camera's dataset (made by make_dataset.py)"

_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_RAW_NAME = re.compile(r"^(\d+)\.png$")
_TARGET_NAME = re.compile(r"^(\d+)\.jpg$")


class DataError(cli.UserError):
    """A dataset file or folder that is missing or not what PyNET expects (one-line message)."""


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# sizes per level

def check_level(level) -> int:
    if level not in utils.LEVELS:
        raise cli.UserError(f"level={level}: expected one of {', '.join(map(str, utils.LEVELS))}")
    return int(level)


def dslr_scale(level) -> float:
    """The reference's DSLR_SCALE = 1 / 2**(level-1): 2, 1, .5, .25, .125, .0625 for levels 0..5."""
    return 1.0 / 2 ** (check_level(level) - 1)


def target_size(level, patch=PATCH) -> int:
    """Side of the level's output/target for a packed input of side ``patch``: int(patch * DSLR_SCALE)."""
    return int(patch * dslr_scale(level))


def check_patch(patch) -> int:
    """A packed patch side the model accepts: a multiple of 16 between 16 and 224."""
    if isinstance(patch, bool) or not isinstance(patch, (int, np.integer)) or cli.patch_size_check(patch):
        raise cli.UserError(f"patch={patch}: expected a multiple of 16 between 16 and {PATCH} (packed pixels)")
    return int(patch)


def crop_step(level) -> int:
    """Grid of crop offsets (packed pixels) that map to whole target pixels at ``level``.

    A packed offset o is 2·o mosaic pixels and o·2**(1-level) target pixels.
    """
    return max(1, 2 ** (check_level(level) - 1))


# ---------------------------------------------------------------------------------------
# reading one file

def _read(reader, path, *args):
    """``reader(path, *args)`` (images' readers and checks), its one-line errors as DataError."""
    try:
        return reader(path, *args)
    except cli.UserError as err:
        raise DataError(str(err)) from None


def read_raw_patch(path: str, size=MOSAIC) -> np.ndarray:
    """A ZRR mosaic PNG as a 2-D uint16 array, checked: single channel, 8- or 16-bit container,
    ``size`` x ``size`` (None: any size), values <= 1023, not blank (camera.check_not_blank)."""
    raw = _read(images.read_mosaic, path)
    if size is not None and raw.shape != (size, size):
        raise DataError(f"{path}: expected a {size}x{size} mosaic, "
                        f"found {raw.shape[1]}x{raw.shape[0]} (width x height)")
    top = int(raw.max()) if raw.size else 0
    if top > camera.WHITE_LEVEL:
        raise DataError(f"{path}: expected 10-bit values (<= {camera.WHITE_LEVEL}), found a maximum of {top}")
    _read(lambda p: camera.check_not_blank(raw, p), path)
    return raw


def read_target_image(path: str, size=MOSAIC) -> np.ndarray:
    """A DSLR JPEG as a uint8 H x W x 3 array, checked: RGB, ``size`` x ``size`` (None: any size),
    and decoded strictly: corrupt data is an error, not a warning (images.read_jpeg)."""
    if not files.isfile(path):
        raise DataError(f"{path}: file not found")
    data = files.read_bytes(path)  # read once: Pillow checks the header, simplejpeg decodes
    fmt, mode, image_size = _read(images.pillow_header, path, "JPEG", data)
    if fmt != "JPEG":
        raise DataError(f"{path}: expected a JPEG file, found {fmt or 'an unknown format'}")
    if mode != "RGB":
        raise DataError(f"{path}: expected an RGB JPEG, found mode {mode}")
    if size is not None and image_size != (size, size):
        raise DataError(f"{path}: expected a {size}x{size} image, found {image_size[0]}x{image_size[1]}")
    return _read(images.read_jpeg, path, data)


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
    packed = camera.extract_bayer_channels(read_raw_patch(raw_path))
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
    """"ZRR", or the label of the tool whose marker file is present (make_sample_dataset.py's,
    make_dataset.py's)."""
    if files.isfile(os.path.join(dataset_dir, MARKER_FILE)):
        return KIND_SYNTHETIC
    return KIND_OWN if files.isfile(os.path.join(dataset_dir, OWN_MARKER_FILE)) else KIND_ZRR


def describe_dataset(dataset_dir) -> str:
    """The line every script prints about the data it reads."""
    kind = dataset_kind(dataset_dir)
    if kind == KIND_SYNTHETIC:
        return f"dataset: {dataset_dir} is a {kind}, NOT the Zurich RAW-to-RGB dataset (see {MARKER_FILE})"
    if kind == KIND_OWN:
        return f"dataset: {dataset_dir} is {kind}, in the ZRR layout (see {OWN_MARKER_FILE})"
    return f"dataset: {dataset_dir} ({kind} layout)"


def split_dir(dataset_dir, split) -> str:
    if split not in SPLITS:
        raise cli.UserError(f"split={split}: expected train or test")
    return os.path.join(dataset_dir, split)


def patch_paths(dataset_dir, split, index):
    folder = split_dir(dataset_dir, split)
    return (os.path.join(folder, RAW_FOLDER, f"{int(index)}.png"),
            os.path.join(folder, TARGET_FOLDER, f"{int(index)}.jpg"))


def _require_folder(path: str, what: str) -> None:
    if not files.isdir(path):
        hint = (" (get the ZRR dataset, see README, or make a sample: python make_sample_dataset.py)"
                if what == "dataset folder" else "")
        raise DataError(f"{path}: {what} not found{hint}")


def _indexed_files(folder: str, pattern) -> dict:
    """{index: name} of the patch files in ``folder``; names with leading zeros (07.png) are not
    ZRR's (see _misnamed_files) and left out, so that no index stands for two names."""
    found = {}
    for name in files.listdir(folder):
        match = pattern.match(name)
        if match and match.group(1) == str(int(match.group(1))):
            found[int(match.group(1))] = name
    return found


def _misnamed_files(folder: str, pattern) -> list:
    """A one-line error for each patch file named with leading zeros: every reader builds a
    patch's path from its index (patch_paths), which would name another file (7.png for 07.png)."""
    problems = []
    for name in sorted(files.listdir(folder)):
        match = pattern.match(name)
        if match and match.group(1) != str(int(match.group(1))):
            expected = f"{int(match.group(1))}{os.path.splitext(name)[1]}"
            problems.append(f"{os.path.join(folder, name)}: not a ZRR patch name (ZRR names them 0.png, 1.png, ... "
                            f"without leading zeros): rename it {expected}")
    return problems


def num_patches(dataset_dir, split) -> int:
    """Number of {i}.png mosaics in ``split/huawei_raw`` (the reference counts this folder)."""
    _require_folder(dataset_dir, "dataset folder")
    folder = os.path.join(split_dir(dataset_dir, split), RAW_FOLDER)
    _require_folder(folder, "folder of RAW mosaics")
    return len(_indexed_files(folder, _RAW_NAME))


def _tail(path: str, count: int) -> bytes:
    with files.open_file(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        handle.seek(max(0, handle.tell() - count))
        return handle.read()


def check_files_quick(raw_path: str, target_path: str) -> None:
    """Cheap per-pair check (headers and file ends, no decoding): format, mode, 448x448,
    and truncation. The full decode (corrupt data, values > 1023) happens when a file is read."""
    for path, kind in ((raw_path, "PNG"), (target_path, "JPEG")):
        if not files.isfile(path):
            raise DataError(f"{path}: file not found")
        fmt, mode, size = _read(images.pillow_header, path, kind)
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
    misnamed = _misnamed_files(raw_folder, _RAW_NAME) + _misnamed_files(target_folder, _TARGET_NAME)
    if not raws and not targets and not misnamed:
        raise DataError(f"{folder}: no patches found (expected {RAW_FOLDER}/0.png, {TARGET_FOLDER}/0.jpg, ...)")

    bad = []

    def reject(message):
        if not skip_bad:
            raise DataError(message)
        bad.append(message)
        if verbose:
            warn(f"skipping: {message}")

    for message in misnamed:
        reject(message)

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
# command line: validate a dataset

SPEC = [
    utils.dataset_dir_arg(),
    cli.Arg("split", str, "both", "which split to check.", choices=("train", "test", "both")),
    cli.Arg("deep", cli.BOOL, True, "decode every file (corrupt data, values above 1023); false = headers only"),
    cli.Arg("skip_bad", cli.BOOL, False, "report every bad file and a count instead of stopping at the first"),
]


def main(argv):
    args = cli.parse_args(argv, SPEC, "load_dataset.py",
                            "Check a ZRR-layout dataset: folders, file pairs, sizes, formats, 10-bit values.")
    _require_folder(args["dataset_dir"], "dataset folder")
    print(describe_dataset(args["dataset_dir"]))
    splits = SPLITS if args["split"] == "both" else (args["split"],)
    for split in splits:
        total = len(_indexed_files(os.path.join(split_dir(args["dataset_dir"], split), RAW_FOLDER), _RAW_NAME)) \
            if files.isdir(os.path.join(split_dir(args["dataset_dir"], split), RAW_FOLDER)) else 0
        good = check_dataset(args["dataset_dir"], split, skip_bad=args["skip_bad"], deep=args["deep"])
        print(f"{split}: {len(good)} usable patches ({total} mosaics found)")
    full = os.path.join(args["dataset_dir"], "test", FULL_RES_FOLDER)
    if files.isdir(full):
        print(f"test/{FULL_RES_FOLDER}: {sum(n.lower().endswith('.png') for n in files.listdir(full))} PNG files")


if __name__ == "__main__":
    sys.exit(cli.run(main))
