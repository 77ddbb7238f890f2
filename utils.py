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
from dataclasses import dataclass
from typing import Any, Callable

# TensorFlow's C++ start-up notes (CPU features, absl) drown the scripts' own output; errors still show.
# Every script imports this module before TensorFlow, so the default takes effect; a user's value wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

LEVELS = (0, 1, 2, 3, 4, 5)

# Reference defaults, indexed by level (§3.1 of the reference notes).
NUM_DEFAULT_TRAIN_ITERS = (100000, 35000, 20000, 20000, 5000, 5000)


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


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", _parse_bool: "true or false",
               _parse_optional_int: "an integer or none"}

BOOL = _parse_bool
OPTIONAL_INT = _parse_optional_int


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


def get_last_iter(level: int, models_dir: str = "models/"):
    """Largest iteration of a complete ``pynet_level_{level}_iteration_{i}.ckpt`` in ``models_dir``, or None."""
    pattern = re.compile(rf"^pynet_level_{level}_iteration_(\d+)\.ckpt\.index$")
    found = []
    if os.path.isdir(models_dir):
        for name in os.listdir(models_dir):
            match = pattern.match(name)
            if match:
                found.append(int(match.group(1)))
    return max(found) if found else None


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
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ---------------------------------------------------------------------------------------
# image files

def read_mosaic(path: str):
    """Read a single-channel Bayer mosaic PNG (8- or 16-bit container) as a 2-D uint16 array."""
    import imageio.v3 as iio
    import numpy as np

    if not os.path.isfile(path):
        raise UserError(f"{path}: file not found")
    try:
        raw = iio.imread(path)
    except Exception as exc:  # imageio raises many types for corrupt files
        raise UserError(f"{path}: cannot read the PNG ({exc.__class__.__name__}: {exc})") from None
    if raw.ndim != 2:
        raise UserError(f"{path}: expected a single-channel Bayer mosaic, found an image of shape {raw.shape}")
    if raw.dtype not in (np.uint8, np.uint16):
        raise UserError(f"{path}: expected an 8- or 16-bit PNG, found {raw.dtype}")
    return raw.astype(np.uint16)


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


def write_png(path: str, image) -> None:
    """Write an HxW or HxWxC uint8/uint16 array as PNG, atomically.

    tf.io.encode_png is used because Pillow cannot write 16-bit RGB PNGs.
    """
    import numpy as np
    import tensorflow as tf

    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    data = tf.io.encode_png(image).numpy()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)


def write_jpeg(path: str, image, quality: int = 95) -> None:
    """Write an HxWx3 uint8 array as JPEG, atomically."""
    from PIL import Image

    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="JPEG", quality=quality)


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
    run, once. Must run before TensorFlow is imported: afterwards it only reports."""
    user = os.environ.get(ONEDNN_VARIABLE)
    if user is not None:
        choice, why = user.strip().lower() in ("1", "true", "yes", "on"), f"{ONEDNN_VARIABLE}={user}"
    elif "tensorflow" in sys.modules:
        return  # too late to choose (a caller in this process already started TensorFlow)
    else:
        choice, why = choose_onednn(training, smallest_batch)
        if choice is not None:
            os.environ[ONEDNN_VARIABLE] = "1" if choice else "0"
    what = "TensorFlow's default" if choice is None else ("oneDNN" if choice else "TensorFlow's own (Eigen)")
    out(f"CPU kernels: {what} ({why})")
