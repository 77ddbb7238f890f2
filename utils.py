"""Shared plumbing of every PyNET script: `key=value` arguments, user-facing errors,
checkpoint discovery and atomic file writes.

Scripts call ``utils.run(main)``; ``main`` raises ``UserError`` (exit 1) or
``UsageError`` (exit 2) for anything a user can get wrong, and ``run`` turns it
into a single ``error: ...`` line on stderr, without a traceback.
"""

import contextlib
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# TensorFlow's C++ start-up notes (CPU features, absl) drown the scripts' own output; errors still show.
# Every script imports this module before TensorFlow, so the default takes effect; a user's value wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

LEVELS = (0, 1, 2, 3, 4, 5)

# PyNET's input range: the Huawei P20's Sony IMX380 in 10-bit code values. ZRR does not document
# the sensor's black level (pedestal); 64 is the usual black level of 10-bit Sony IMX sensors (256
# at 12 bits), taken as an assumption by the baseline ISP, the synthetic sample and dng_to_png.
BLACK_LEVEL = 64
WHITE_LEVEL = 1023

# Reference defaults, indexed by level (the reference's utils.py, process_command_args), and the
# batch sizes its README's training commands pass.
NUM_DEFAULT_TRAIN_ITERS = (100000, 35000, 20000, 20000, 5000, 5000)
REFERENCE_BATCH_SIZES = (10, 12, 18, 48, 50, 50)


class UserError(Exception):
    """Something the user can fix: printed as one line, exit status 1."""

    exit_code = 1


class UsageError(UserError):
    """A bad command-line argument: printed as one line, exit status 2."""

    exit_code = 2


class HelpRequested(Exception):
    """Raised by the parser after printing the help text (exit status 0)."""


def run(main: Callable[[list], Any], argv=None) -> int:
    """Run a script's ``main(argv)`` and map user errors to one line and an exit code."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        main(argv)
    except HelpRequested:
        return 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`... help | head`): stop quietly, as command-line tools do;
        # stdout is pointed at /dev/null so that Python's exit-time flush does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as err:
        # the file system refused (a full disk, no permission...): the writers have removed
        # their temporary files, so one line says what and where
        if err.errno is None:
            raise
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------------------
# key=value arguments

def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ValueError("expected true or false")


def _parse_optional_int(text: str):
    return None if text.lower() == "none" else int(text)


def _parse_optional_float(text: str):
    return None if text.lower() == "none" else float(text)


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", _parse_bool: "true or false",
               _parse_optional_int: "an integer or none", _parse_optional_float: "a number or none"}

BOOL = _parse_bool
OPTIONAL_INT = _parse_optional_int
OPTIONAL_FLOAT = _parse_optional_float

# Choices of train_model.py's init= and loss= (model.PyNET(init=), losses.level_loss(loss=)),
# here so that the scripts' argument specs need no TensorFlow.
INITS = ("reference", "he")
LOSSES = ("reference", "mse")


@dataclass
class Arg:
    """One ``key=value`` argument.

    ``default`` may be a callable of the already parsed values (per-level defaults);
    ``check`` returns an error text for a parsed value that is out of range, or None.
    """

    name: str
    type: Callable = str
    default: Any = None
    help: str = ""
    choices: tuple = ()
    check: Callable[[Any], Any] = None

    def describe_default(self) -> str:
        if callable(self.default):
            return getattr(self.default, "__doc__", None) or "depends on other arguments"
        return str(self.default).lower() if isinstance(self.default, bool) else str(self.default)

    def convert(self, text: str):
        try:
            value = self.type(text)
        except ValueError:
            raise UsageError(f"{self.name}={text}: expected {_TYPE_NAMES.get(self.type, 'a valid value')}") from None
        if self.choices and value not in self.choices:
            allowed = ", ".join(str(c) for c in self.choices)
            raise UsageError(f"{self.name}={text}: expected one of {allowed}")
        if self.check is not None and value is not None:
            problem = self.check(value)
            if problem:
                raise UsageError(f"{self.name}={text}: expected {problem}")
        return value


def positive(value):
    return None if value > 0 else "a value greater than 0"


def non_negative(value):
    return None if value >= 0 else "a value of 0 or more"


def patch_size_check(value):
    """A side of packed crops the network takes: its four poolings need multiples of 16, and a
    ZRR patch packs to 224."""
    return None if 16 <= value <= 224 and value % 16 == 0 else "a multiple of 16 from 16 to 224"


def format_help(prog: str, description: str, spec) -> str:
    width = max(len(a.name) for a in spec) + 2
    lines = [f"usage: python {prog} [key=value ...]", "", description, "", "arguments (default in brackets):"]
    for a in spec:
        stop = "" if not a.help or a.help.endswith(".") else "."
        choices = f"{stop} One of: {', '.join(str(c) for c in a.choices)}." if a.choices else ""
        lines.append(f"  {a.name:<{width}}{a.help}{choices} [{a.describe_default()}]")
    return "\n".join(lines)


def parse_args(argv, spec, prog: str, description: str = "", positional: str = None) -> dict:
    """Parse ``key=value`` tokens against ``spec`` (a list of ``Arg``).

    Tokens without ``=`` are collected under the key named by ``positional``
    (for example the DNG files of dng_to_png.py); without it they are an error.
    ``help``, ``-h`` and ``--help`` print the arguments and raise ``HelpRequested``.
    """
    by_name = {a.name: a for a in spec}
    values, given = {}, set()
    loose = []
    for token in argv:
        if token in ("help", "-h", "--help"):
            print(format_help(prog, description, spec))
            raise HelpRequested()
        key, sep, text = token.partition("=")
        if not sep:
            if positional is None:
                raise UsageError(f"{token}: expected key=value (see: python {prog} help)")
            loose.append(token)
            continue
        if key not in by_name:
            raise UsageError(f"unknown argument '{key}' (see: python {prog} help)")
        if key in given:
            raise UsageError(f"{key} given twice")
        values[key] = by_name[key].convert(text)
        given.add(key)
    for a in spec:  # plain defaults first, so callable defaults can look at them
        if a.name not in values and not callable(a.default):
            values[a.name] = a.default
    for a in spec:
        if a.name not in values:
            values[a.name] = a.default(values)
    if positional is not None:
        values[positional] = loose
    return values


def parse_size(text: str, multiple: int = 1):
    """(height, width) of a ``HEIGHTxWIDTH`` text, both positive multiples of ``multiple``, or
    None: callers word the error for their own argument."""
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        return None
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        return None
    return height, width


def print_args(values: dict, stream=None) -> None:
    stream = stream or sys.stdout
    for key, value in values.items():
        print(f"  {key}: {value}", file=stream)


def level_arg(default=0, help="pyramid level: 5, 4, 3, 2, 1 or 0 (full resolution)") -> Arg:
    return Arg("level", int, default, help, choices=LEVELS)


def dataset_dir_arg() -> Arg:
    return Arg("dataset_dir", str, "raw_images/", "folder of the ZRR dataset (train/, test/)")


def restore_iter_arg() -> Arg:
    return Arg("restore_iter", OPTIONAL_INT, None,
               "iteration of the checkpoint to load; none = the latest one", check=non_negative)


# ---------------------------------------------------------------------------------------
# files: local paths through os, URLs (gs://, s3://, hdfs://, ram://...) through tf.io.gfile
#
# Local paths keep os: its errors carry errno (a full disk is one line naming the file) and
# nothing imports TensorFlow before select_cpu_kernels has run. Every file the scripts read
# or write goes through these helpers, so dataset_dir=, models_dir=, results_dir= ... may be
# any filesystem TensorFlow knows.

def is_url(path) -> bool:
    return "://" in str(path)


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


def exists(path) -> bool:
    return _gfile().exists(path) if is_url(path) else os.path.exists(path)


def isdir(path) -> bool:
    return _gfile().isdir(path) if is_url(path) else os.path.isdir(path)


def isfile(path) -> bool:
    if is_url(path):
        return _gfile().exists(path) and not _gfile().isdir(path)
    return os.path.isfile(path)


def listdir(path) -> list:
    return [name.rstrip("/") for name in _gfile().listdir(path)] if is_url(path) else os.listdir(path)


def makedirs(path) -> None:
    if is_url(path):
        _gfile().makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def remove(path, missing_ok: bool = False) -> None:
    """Remove a file or a folder tree. ``missing_ok`` (clean-up after a failure): a path already
    gone is no error, and a tree is removed as far as it can be."""
    if is_url(path):
        if not missing_ok or _gfile().exists(path):
            (_gfile().rmtree if _gfile().isdir(path) else _gfile().remove)(path)
    elif os.path.isdir(path) and not os.path.islink(path):
        import shutil

        shutil.rmtree(path, ignore_errors=missing_ok)
    elif not missing_ok or os.path.lexists(path):
        os.remove(path)


def rename(source, target) -> None:
    """Rename ``source`` to ``target``, replacing it (atomic on local and RAM filesystems; on
    object stores such as gs:// a copy whose result appears only once complete)."""
    if is_url(source) or is_url(target):
        _gfile().rename(source, target, overwrite=True)
    else:
        os.replace(source, target)


def open_file(path, mode="rb"):
    return _gfile().GFile(path, mode) if is_url(path) else open(path, mode)


def read_bytes(path) -> bytes:
    with open_file(path, "rb") as handle:
        return handle.read()


def append_text(path, text) -> None:
    """Append to a text file (a log): object stores cannot append, so there the file is
    rewritten whole, atomically."""
    if is_url(path):
        old = read_bytes(path) if exists(path) else b""
        write_file(path, old + text.encode())
    else:
        with open(path, "a") as handle:
            handle.write(text)


# ---------------------------------------------------------------------------------------
# checkpoints on disk

ORIGINAL_CHECKPOINT = "models/original/pynet_level_0.ckpt"


def original_checkpoint() -> str:
    """The authors' released weights, or a one-line error saying how to get them."""
    if not os.path.exists(ORIGINAL_CHECKPOINT + ".index"):
        raise UserError(f"{ORIGINAL_CHECKPOINT}: the authors' released weights are not there; put "
                        f"pynet_level_0.ckpt.index and .data-00000-of-00001 from their release into models/original/ "
                        f"(README, 'The real thing'), or use your own checkpoints with orig=false")
    return ORIGINAL_CHECKPOINT


def checkpoint_prefix(models_dir: str, level: int, iteration) -> str:
    return os.path.join(models_dir, f"pynet_level_{level}_iteration_{iteration}.ckpt")


_CHECKPOINT_NAME = re.compile(r"^pynet_level_(\d+)_iteration_(\d+)\.ckpt$")


def parse_checkpoint_prefix(prefix: str):
    """(level, iteration) of a prefix named ``pynet_level_{L}_iteration_{I}.ckpt``, or None."""
    match = _CHECKPOINT_NAME.match(os.path.basename(prefix))
    return (int(match.group(1)), int(match.group(2))) if match else None


def checkpoint_iterations(level: int, models_dir: str = "models/", suffix: str = "") -> list:
    """Sorted iterations of the complete ``pynet_level_{level}_iteration_{i}.ckpt{suffix}`` checkpoints
    (those with an ``.index``) in ``models_dir``."""
    found = []
    if isdir(models_dir):
        for name in listdir(models_dir):
            if name.endswith(suffix + ".index"):
                parsed = parse_checkpoint_prefix(name[: -len(suffix + ".index")])
                if parsed is not None and parsed[0] == level:
                    found.append(parsed[1])
    return sorted(found)


def get_last_iter(level: int, models_dir: str = "models/"):
    """Largest iteration of a complete ``pynet_level_{level}_iteration_{i}.ckpt`` in ``models_dir``, or None."""
    found = checkpoint_iterations(level, models_dir)
    return found[-1] if found else None


# ---------------------------------------------------------------------------------------
# output paths, checked before the work starts

def _first_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _check_writable_below(path: str, name: str, given: str, what: str) -> None:
    existing = _first_existing(path)
    if not os.path.isdir(existing):
        raise UserError(f"{name}={given}: cannot {what}, {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{name}={given}: cannot {what}, {existing} is not writable")


def check_output_dir(path: str, name: str) -> None:
    """UserError unless ``path`` is a folder or can be made one (argument ``name``)."""
    if exists(path) and not isdir(path):
        raise UserError(f"{name}={path}: is a file, not a folder")
    if is_url(path):
        return  # a remote store says whether it can be written only when it is
    _check_writable_below(path, name, path, "make this folder")


def check_output_file(path: str, name: str) -> None:
    """UserError unless ``path`` can be written as a file (argument ``name``)."""
    if isdir(path) or path.endswith(("/", os.sep)):
        raise UserError(f"{name}={path}: is a folder, expected a file name")
    if is_url(path):
        return
    _check_writable_below(os.path.dirname(os.path.abspath(path)), name, path, "write there")


# ---------------------------------------------------------------------------------------
# atomic writes

@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary name beside ``path``; rename it to ``path`` only if the block succeeds.

    A crash or an error inside the block leaves any existing ``path`` untouched.
    The temporary name keeps the extension, so writers that look at it still work.
    """
    folder, name = os.path.split(path)
    stem, ext = os.path.splitext(name)
    tmp = os.path.join(folder, f".{stem}.tmp{os.getpid()}{ext}")
    try:
        yield tmp
        rename(tmp, path)
    except OSError as err:  # a full disk...: said of the file the user asked for
        if err.errno is None:
            raise
        raise OSError(err.errno, err.strerror, path) from None
    finally:
        if exists(tmp):
            remove(tmp)


# Temporary names of this project's writers, with the writer's process id: atomic_path's
# ".{stem}.tmp{pid}{ext}", the checkpoints' "{prefix}.tmp{pid}.*" and TensorFlow's
# "{prefix}.tmp{pid}_temp/" beside them, make_sample_dataset's ".building-{pid}/".
_TEMP_NAME = re.compile(r"^(?:\..+\.tmp(?P<a>\d+)(?:\.\w+)?"
                        r"|pynet_level_\d+_iteration_\d+\.ckpt(?:\.train_state)?\.tmp(?P<b>\d+)(?:\..+|_temp)"
                        r"|\.building-(?P<c>\d+))$")


def temp_owner(name: str):
    """Process id in a temporary name of this project's writers, or None for other names."""
    match = _TEMP_NAME.match(name)
    return int(next(g for g in match.groups() if g)) if match else None


def is_hidden(name: str) -> bool:
    """A dotfile or a writer's temporary file: never taken as an input."""
    return name.startswith(".") or temp_owner(name) is not None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temps(folder: str) -> list:
    """Remove the temporary files and folders that writers of this project left in ``folder``
    when they were killed (their process is gone); returns the names removed."""
    removed = []
    if is_url(folder) or not os.path.isdir(folder):
        return removed  # on shared storage a writer's process id says nothing: only local folders
    for name in sorted(os.listdir(folder)):
        pid = temp_owner(name)
        if pid is None or pid == os.getpid() or _alive(pid):
            continue
        try:
            remove(os.path.join(folder, name))
        except FileNotFoundError:
            continue
        removed.append(name)
    if removed:
        print(f"note: removed {len(removed)} temporary file(s) left in {folder} by an interrupted run "
              f"({', '.join(removed[:3])}{', ...' if len(removed) > 3 else ''})", file=sys.stderr)
    return removed


# ---------------------------------------------------------------------------------------
# image files

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*")  # a DNG is a TIFF
_PNG_COLOUR_TYPES = {0: "greyscale", 2: "RGB", 3: "palette", 4: "greyscale+alpha", 6: "RGBA"}


def _not_png(path: str, head: bytes) -> str:
    if path.lower().endswith(".dng") or head[:4] in _TIFF_SIGNATURES:
        return (f"{path}: a DNG/TIFF raw file, not a PNG mosaic: convert it first with "
                f"python dng_to_png.py {path} (see its help for rggb= and normalize=)")
    return f"{path}: not a PNG file (expected a single-channel PNG Bayer mosaic)"


def png_header(path: str, data: bytes = None) -> dict:
    """Width, height, bit depth and colour type of a PNG from its IHDR chunk, without decoding;
    a one-line UserError for a missing file, a DNG (pointing to dng_to_png.py) or anything not a PNG."""
    import struct

    if data is None:
        if not isfile(path):
            raise UserError(f"{path}: file not found")
        with open_file(path, "rb") as handle:
            data = handle.read(33)
    if data[:8] != PNG_SIGNATURE:
        raise UserError(_not_png(path, data[:8]))
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise UserError(f"{path}: cannot read the PNG (no IHDR header): the file is corrupt or truncated")
    width, height, bits, colour = struct.unpack(">IIBB", data[16:26])
    return {"width": width, "height": height, "bits": bits, "colour": colour,
            "kind": _PNG_COLOUR_TYPES.get(colour, f"colour type {colour}")}


def mosaic_header(path: str, data: bytes = None) -> dict:
    """png_header, refusing anything but a single-channel 8- or 16-bit PNG."""
    header = png_header(path, data)
    if header["colour"] != 0 or header["bits"] not in (8, 16):
        raise UserError(f"{path}: expected a single-channel Bayer mosaic (8- or 16-bit greyscale PNG), found a "
                        f"PNG of type {header['kind']}, {header['bits']}-bit")
    return header


def _check_png_chunks(path: str, data: bytes) -> None:
    """Every chunk's CRC, up to IEND: corrupt data that a decoder might let through is refused."""
    import struct
    import zlib

    pos = 8
    while True:
        if pos + 12 > len(data):
            raise UserError(f"{path}: cannot read the PNG (it ends before its IEND chunk): the file is truncated")
        length, kind = struct.unpack(">I4s", data[pos: pos + 8])
        end = pos + 12 + length
        if end > len(data):
            raise UserError(f"{path}: cannot read the PNG (chunk {kind!r} at byte {pos} runs past the end of "
                            f"the file): the file is truncated")
        (crc,) = struct.unpack(">I", data[end - 4: end])
        if zlib.crc32(data[pos + 4: end - 4]) != crc:
            raise UserError(f"{path}: cannot read the PNG (chunk {kind.decode('latin-1')!r} at byte {pos} fails its "
                            f"CRC check): the file is corrupt")
        if kind == b"IEND":
            return
        pos = end


def read_mosaic(path: str):
    """Read a single-channel Bayer mosaic PNG (8- or 16-bit container) as a 2-D uint16 array.

    One reader for every script: the PNG signature, header and every chunk's CRC are checked
    before Pillow decodes it, each failure a one-line UserError naming the file."""
    import io

    import numpy as np
    from PIL import Image

    if not isfile(path):
        raise UserError(f"{path}: file not found")
    data = read_bytes(path)
    mosaic_header(path, data)
    _check_png_chunks(path, data)
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            image.load()
            raw = np.asarray(image)
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... for bad files
        reason = str(exc) or exc.__class__.__name__
        raise UserError(f"{path}: cannot read the PNG ({reason}): the file is corrupt or truncated") from None
    if raw.ndim != 2:
        raise UserError(f"{path}: expected a single-channel Bayer mosaic, found an image of shape {raw.shape}")
    return raw.astype(np.uint16)


def read_jpeg(path: str, data: bytes = None):
    """Decode a JPEG strictly, as H x W x 3 uint8 RGB (the same pixels as Pillow's decoder);
    ``data``: the file's bytes when the caller has read them already.

    Pillow and TensorFlow decode a JPEG whose data are corrupt with at most a warning on
    stderr; libjpeg-turbo through simplejpeg with ``strict=True`` refuses it, naming the file."""
    import simplejpeg

    if data is None:
        if not isfile(path):
            raise UserError(f"{path}: file not found")
        data = read_bytes(path)
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=False, fastupsample=False, strict=True)
    except ValueError as exc:
        reason = str(exc).strip() or exc.__class__.__name__
        raise UserError(f"{path}: cannot decode the JPEG ({reason}): the file is corrupt or truncated") from None


def to_uint(image, bits: int = 8, stretch: bool = False):
    """Float RGB in [0, 1] to uint8/uint16: clipped, or min-max stretched per image as the
    reference's ``scipy.misc.imsave`` did (``stretch=True``)."""
    import numpy as np

    image = np.asarray(image, dtype=np.float64)
    if stretch:
        low, high = image.min(), image.max()
        image = (image - low) / (high - low) if high > low else np.zeros_like(image)
    top = 255 if bits == 8 else 65535
    # floor(x + 0.5), as scipy's bytescale rounded, rather than numpy's round-half-to-even
    return np.floor(np.clip(image, 0.0, 1.0) * top + 0.5).astype(np.uint8 if bits == 8 else np.uint16)


def write_file(path: str, data: bytes) -> None:
    """Write encoded bytes to ``path`` atomically, making its folder; encoders run before this,
    in memory, so that a failed write (a full disk) is one OSError naming ``path`` and leaves
    nothing behind (no temporary file, no half-closed handle of a library)."""
    folder = os.path.dirname(path)
    if folder:
        makedirs(folder)
    with atomic_path(path) as tmp:
        with open_file(tmp, "wb") as handle:
            handle.write(data)


def write_png(path: str, image) -> None:
    """Write an HxW or HxWxC uint8/uint16 array as PNG, atomically.

    tf.io.encode_png is used because Pillow cannot write 16-bit RGB PNGs.
    """
    import numpy as np
    import tensorflow as tf

    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if not image.size:
        raise UserError(f"{path}: not written: the image is empty ({image.shape[1]}x{image.shape[0]})")
    write_file(path, tf.io.encode_png(image).numpy())


def write_jpeg(path: str, image, quality: int = 95) -> None:
    """Write an HxWx3 uint8 array as JPEG, atomically."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    write_file(path, buffer.getvalue())


# ---------------------------------------------------------------------------------------
# CPU kernels: oneDNN or TensorFlow's own (Eigen), chosen before TensorFlow starts

ONEDNN_VARIABLE = "TF_ENABLE_ONEDNN_OPTS"
_AVX512_CORE = {"avx512f", "avx512bw", "avx512dq", "avx512vl"}


def cpu_flags() -> set:
    """The instruction-set flags of this CPU (Linux), limited by ONEDNN_MAX_CPU_ISA when it
    caps oneDNN below AVX-512; an empty set where they cannot be read."""
    flags = set()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        return set()
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).upper()
    if cap and not cap.startswith(("AVX512", "AVX10", "AMX", "ALL", "DEFAULT")):
        flags = {f for f in flags if not f.startswith("avx512")}
    return flags


def choose_onednn(training: bool, smallest_batch: int, flags=None):
    """(use oneDNN?, why) for this process, or (None, why) to keep TensorFlow's own default.

    Measured on 2-core AMD EPYC machines (benchmarks/README.md): with AVX-512, oneDNN is the
    faster backend for training and inference; with AVX2 only, it halves a training step, but
    for a batch of ONE image oneDNN finds no optimised convolution for the large kernels of
    levels 1 and 0 (a 9x9 convolution of 96 maps at 64x64: 30 s instead of 0.02 s, its
    ``ref:any`` fallback), so a process that runs single images (rendering, evaluation or
    training with batches of one) keeps TensorFlow's own kernels there.
    """
    flags = cpu_flags() if flags is None else flags
    if not flags:
        return None, "TensorFlow's default (CPU features unknown)"
    if _AVX512_CORE <= flags:
        return True, "AVX-512 CPU"
    if {"avx2", "fma"} <= flags:
        if training and smallest_batch >= 2:
            return True, "AVX2 CPU, training with batches of 2 or more"
        return False, "AVX2 CPU without AVX-512: oneDNN has no fast convolution for single images there"
    return False, "CPU without AVX2"


def select_cpu_kernels(training: bool, smallest_batch: int = 1, out=print) -> None:
    """Set TF_ENABLE_ONEDNN_OPTS for this process (a user's value wins) and say which kernels
    run, once. Must run before TensorFlow is imported: afterwards it does nothing (a caller in
    the same process, such as quickstart.py, made the choice)."""
    user = os.environ.get(ONEDNN_VARIABLE)
    if user is not None:
        choice, why = user.strip().lower() in ("1", "true", "yes", "on"), f"{ONEDNN_VARIABLE}={user}"
    elif "tensorflow" in sys.modules:
        return
    else:
        choice, why = choose_onednn(training, smallest_batch)
        if choice is not None:
            os.environ[ONEDNN_VARIABLE] = "1" if choice else "0"
    what = "TensorFlow's default" if choice is None else ("oneDNN" if choice else "TensorFlow's own (Eigen)")
    out(f"CPU kernels: {what} ({why})")


# ---------------------------------------------------------------------------------------
# Memory pages: glibc's malloc on transparent huge pages, chosen before the process starts

HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb"
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path=_THP_SETTING) -> str:
    """The kernel's transparent huge page mode (always, madvise or never); "" where unknown."""
    try:
        with open(path) as handle:
            text = handle.read()
    except OSError:
        return ""
    match = re.search(r"\[(\w+)\]", text)
    return match.group(1) if match else ""


def huge_pages_environment(environ=None, libc=None, thp=None):
    """The environment under which glibc's malloc backs its large blocks with transparent huge
    pages (GLIBC_TUNABLES=glibc.malloc.hugetlb=1), or None to leave the process as it is: not
    Linux with glibc 2.35 or later (older ones ignore the tunable), huge pages turned off in
    the kernel, or GLIBC_TUNABLES already naming the tunable (a user's value wins).

    Why: rendering in strips frees and allocates tens of GB of feature-map blocks, each one
    mapped afresh, and faulting them in 4 KiB pages is what made a 12 MP frame in strips
    slower than the whole frame (benchmarks/README.md, "Inference")."""
    environ = os.environ if environ is None else environ
    if libc is None:
        import platform

        libc = platform.libc_ver() if sys.platform.startswith("linux") else ("", "")
    name, version = libc
    numbers = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if name != "glibc" or numbers < (2, 35):
        return None
    if (thp if thp is not None else thp_mode()) not in ("always", "madvise"):
        return None
    if HUGE_PAGES_TUNABLE in environ.get("GLIBC_TUNABLES", ""):
        return None
    return {**environ, "GLIBC_TUNABLES": tunables_with_huge_pages(1, environ)}


def tunables_with_huge_pages(value: int, environ=None) -> str:
    """GLIBC_TUNABLES of ``environ`` with glibc.malloc.hugetlb=``value`` added (the last wins)."""
    tunables = (os.environ if environ is None else environ).get("GLIBC_TUNABLES", "")
    return ":".join(filter(None, [tunables, f"{HUGE_PAGES_TUNABLE}={value}"]))


def run_with_huge_pages() -> None:
    """Start this script again, same interpreter and arguments, with glibc's malloc on huge
    pages where huge_pages_environment says so (glibc reads its tunables only at start-up);
    otherwise return. Call first thing in ``__main__``, before anything is printed."""
    environment = huge_pages_environment()
    if environment is None:
        return
    try:
        sys.stdout.flush()
        os.execve(sys.executable, list(getattr(sys, "orig_argv", [sys.executable] + sys.argv)), environment)
    except OSError:
        return  # no re-exec: the run goes on with 4 KiB pages


def huge_pages_note(environ=None) -> str:
    """One line saying whether malloc runs on huge pages in this process, for the scripts' log."""
    environ = os.environ if environ is None else environ
    match = re.search(rf"{re.escape(HUGE_PAGES_TUNABLE)}=(\d+)", environ.get("GLIBC_TUNABLES", ""))
    if match and match.group(1) != "0":
        return (f"Memory: malloc on transparent huge pages (GLIBC_TUNABLES={HUGE_PAGES_TUNABLE}="
                f"{match.group(1)}; {HUGE_PAGES_TUNABLE}=0 turns it off)")
    return "Memory: malloc on 4 KiB pages"
