"""Checkpoint files: their names, read whole and verified, written all or nothing, and the
mapping of PyNET's variables to the reference's TF1 keys.

* Names: ``pynet_level_{L}_iteration_{I}.ckpt`` in models_dir, the released weights in
  models/original/; ``resolve(args)`` is the checkpoint test_model.py, evaluate_accuracy.py
  and export_model.py load.
* ``read_verified(prefix)`` reads every tensor of a TensorFlow checkpoint (TensorFlow checks
  each one's checksum), checks it against the dtype and shape its index records and that it
  is finite; a damaged or non-finite checkpoint is a one-line ``DamagedCheckpoint`` naming the
  damaged file, and ``naming_intact`` adds which earlier checkpoint of the level is intact.
* ``all_or_nothing(prefix)`` wraps the writing of a checkpoint's files: on any failure the
  temporaries and whatever was already renamed are removed, and a refused write (a full
  disk...) is one line.
* ``load_weights`` / ``save_weights``: a PyNET's variables under the reference's keys
  (generator/Variable, generator/Variable_1, ... in the reference's creation order), so the
  authors' released checkpoint loads and ours load in the reference's code.

TensorFlow and the model are imported by the functions that use them (``_tf``, ``load_model``),
not at the top: the scripts import this module before runtime.py's settings are made.
"""

import contextlib
import os
import re

import numpy as np

import files
from cli import UsageError, UserError

TF1_VARIABLE_COUNT = 437
TF1_SCOPE = "generator"
STATE_SUFFIX = ".train_state"  # optimizer state + iteration, beside a training checkpoint


def _tf():
    import tensorflow as tf

    return tf


# ---------------------------------------------------------------------------------------
# names

ORIGINAL_CHECKPOINT = "models/original/pynet_level_0.ckpt"
RELEASED_ITERATION = -1  # the "iteration" of the released weights in an export; file names say "None"


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
    if files.isdir(models_dir):
        for name in files.listdir(models_dir):
            if name.endswith(suffix + ".index"):
                parsed = parse_checkpoint_prefix(name[: -len(suffix + ".index")])
                if parsed is not None and parsed[0] == level:
                    found.append(parsed[1])
    return sorted(found)


def get_last_iter(level: int, models_dir: str = "models/"):
    """Largest iteration of a complete ``pynet_level_{level}_iteration_{i}.ckpt`` in ``models_dir``, or None."""
    found = checkpoint_iterations(level, models_dir)
    return found[-1] if found else None


def state_prefix(model_prefix: str) -> str:
    return model_prefix + STATE_SUFFIX


# ---------------------------------------------------------------------------------------
# reading, verified

class DamagedCheckpoint(UserError):
    """A checkpoint that cannot be used (unreadable, truncated, missing data, non-finite)."""


class NonFiniteWeights(UserError):
    """Weights holding NaN or Inf, refused before anything is written."""

    def __init__(self, message, count=0):
        super().__init__(message)
        self.count = count


def _reason(exc) -> str:
    """A short reason from an exception: TensorFlow's "{{function_node ...}} path; No space left
    on device [Op:SaveV2]" becomes "No space left on device"."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = (getattr(exc, "message", None) or str(exc) or "").strip()
    text = re.sub(r"\s*\[Op:\w+\]$", "", re.sub(r"^\{\{.*?\}\}\s*", "", text.splitlines()[0] if text else ""))
    if "; " in text:
        text = text.rsplit("; ", 1)[1]
    return text[:200] or exc.__class__.__name__


def _data_problem(prefix: str, what: str, exc) -> str:
    """The one line for a tensor that cannot be read: which data file, missing or damaged."""
    match = re.search(r"\.data-\d+-of-\d+", _reason(exc))
    if match:
        data = prefix + match.group(0)
    else:
        shards = sorted(n for n in files.listdir(os.path.dirname(prefix) or ".")
                        if n.startswith(os.path.basename(prefix) + ".data-"))
        data = os.path.join(os.path.dirname(prefix), shards[0]) if shards else prefix + ".data-00000-of-00001"
    if not files.exists(data):
        return f"{data}: missing (the checkpoint's {os.path.basename(prefix)}.index is there without its data)"
    return f"{data}: damaged or truncated: {_reason(exc)} reading {what}"


def read_verified(prefix: str, labels: dict = None) -> dict:
    """Every tensor of the checkpoint ``prefix`` as NumPy arrays, each read and checked (its
    checksum, the dtype and shape the index records, finite values); ``labels`` names keys in
    the messages. Raises DamagedCheckpoint naming the file that is damaged."""
    tf = _tf()
    index = prefix + ".index"
    if not files.exists(index):
        raise UserError(f"{prefix}: no checkpoint there (expected {index} and its .data files)")
    try:
        # the reader itself: tf.train.load_checkpoint takes a prefix on a RAM filesystem for a folder
        reader = tf.compat.v1.train.NewCheckpointReader(prefix)
        shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
    except (tf.errors.OpError, ValueError, IndexError) as exc:
        raise DamagedCheckpoint(f"{index}: damaged, cannot read the checkpoint's index ({_reason(exc)})") from None
    values, nonfinite, first_bad = {}, 0, None
    for key in sorted(shapes):
        what = f"{key} ({labels[key]})" if labels and key in labels else key
        try:
            value = reader.get_tensor(key)
        except (tf.errors.OpError, ValueError, IndexError) as exc:
            raise DamagedCheckpoint(_data_problem(prefix, what, exc)) from None
        if dtypes[key] != tf.string:
            value = np.asarray(value)
            if value.dtype != dtypes[key].as_numpy_dtype or list(value.shape) != list(shapes[key]):
                raise DamagedCheckpoint(f"{prefix}: {what} reads as {value.dtype} {list(value.shape)}, its index "
                                        f"says {dtypes[key].name} {list(shapes[key])}: the checkpoint is damaged")
            if np.issubdtype(value.dtype, np.floating):
                bad = int(value.size - np.count_nonzero(np.isfinite(value)))
                if bad and first_bad is None:
                    first_bad = what
                nonfinite += bad
        values[key] = value
    if nonfinite:
        raise DamagedCheckpoint(f"{prefix}: {nonfinite} values are NaN or Inf (first in {first_bad}): the weights "
                                f"are not usable")
    return values


def nonfinite_count(variables) -> int:
    """Number of NaN/Inf values in floating-point variables."""
    total = 0
    for var in variables:
        value = var.numpy()
        if np.issubdtype(value.dtype, np.floating):
            finite = np.isfinite(value)
            if not finite.all():
                total += int(value.size - np.count_nonzero(finite))
    return total


# ---------------------------------------------------------------------------------------
# a damaged checkpoint: name the latest intact one before it

def _intact(prefix: str, resume: bool) -> bool:
    try:
        read_verified(prefix)
        if resume:
            read_verified(state_prefix(prefix))
    except UserError:
        return False
    return True


def intact_advice(prefix: str, resume: bool = False):
    """Which earlier checkpoint of the same level and folder is intact (with its training
    state for ``resume``) and how to use it; None for a prefix not named by the trainer."""
    parsed = parse_checkpoint_prefix(prefix)
    if parsed is None:
        return None
    level, iteration = parsed
    folder = os.path.dirname(prefix)
    earlier = [i for i in checkpoint_iterations(level, folder, STATE_SUFFIX if resume else "") if i < iteration]
    for candidate in reversed(earlier):
        good = checkpoint_prefix(folder, level, candidate)
        if _intact(good, resume):
            if resume:
                return (f"the latest intact level-{level} checkpoint with its training state is {good}: move the "
                        f"files of {os.path.basename(prefix)} away to resume from it")
            return f"the latest intact level-{level} checkpoint before it is {good}: use restore_iter={candidate}"
    return f"no earlier level-{level} checkpoint in {folder or '.'} is intact"


@contextlib.contextmanager
def naming_intact(prefix: str, resume: bool = False):
    """Let a DamagedCheckpoint of ``prefix`` raised in the block name the intact one before it."""
    try:
        yield
    except DamagedCheckpoint as err:
        advice = intact_advice(prefix, resume)
        if advice is None:
            raise
        raise DamagedCheckpoint(f"{err}; {advice}") from None


# ---------------------------------------------------------------------------------------
# writing

def _starting_with(folder: str, base: str) -> set:
    return {n for n in files.listdir(folder) if n.startswith(base)} if files.isdir(folder) else set()


@contextlib.contextmanager
def all_or_nothing(prefix: str):
    """Write the files of checkpoint ``prefix`` in the block. On any failure (a full disk, an
    interruption) every file of ``prefix`` the block created, temporaries and TensorFlow's
    ``_temp`` folders included, is removed; a write the system refused becomes one line."""
    tf = _tf()
    folder, base = os.path.dirname(prefix) or ".", os.path.basename(prefix)
    before = _starting_with(folder, base + ".")
    try:
        yield
    except BaseException as exc:
        for name in _starting_with(folder, base + ".") - before:
            files.remove(os.path.join(folder, name), missing_ok=True)
        if isinstance(exc, (tf.errors.OpError, OSError)):
            raise UserError(f"{prefix}: cannot write the checkpoint ({_reason(exc)}); nothing was saved") from None
        raise


# ---------------------------------------------------------------------------------------
# TF1 checkpoints: keys generator/Variable, generator/Variable_1, ... in creation order

def tf1_key(index: int) -> str:
    return f"{TF1_SCOPE}/Variable" if index == 0 else f"{TF1_SCOPE}/Variable_{index}"


_ROLES = {"kernel": "W", "bias": "b", "shift": "IN shift", "scale": "IN scale"}


def _creation_rank(name: str) -> tuple:
    """Where the reference creates layer ``name``: the encoder's first blocks (conv_l1_d1 to
    conv_l5_d1), then level by level from 5 to 0 its other blocks, its two upsampling layers
    (conv_t{L-1}a and b) and its head (conv_l{L}_out); level 0's block is conv_l0."""
    block = re.fullmatch(r"conv_l(\d)_d(\d+)", name)
    if block:
        level, index = int(block[1]), int(block[2])
        return (0, level, 0) if index == 1 else (1, -level, index)
    upsampling = re.fullmatch(r"conv_t(\d)([ab])", name)
    if upsampling:
        return (1, -(int(upsampling[1]) + 1), 1000 + "ab".index(upsampling[2]))
    output = re.fullmatch(r"conv_l(\d)_out", name)
    if output:
        return (1, -int(output[1]), 2000)
    if name == "conv_l0":
        return (1, 0, 0)
    raise ValueError(f"{name}: not a PyNET layer name")


def tf1_order(model) -> list:
    """[(layer name, number of variables)] of a PyNET build in the reference's creation order,
    which numbers the checkpoint keys. A build for level L from 2 to 5 also creates the two
    upsampling layers toward level L - 1 (the reference makes them before its head); Keras
    leaves them out of the model as nothing uses them, but their one variable each keeps the
    numbering of what follows."""
    order = [(layer.name, layer.tf1_variable_count()) for layer in model.layers if hasattr(layer, "tf1_variable_count")]
    lowest = 6 - len(model.outputs)  # model.built_level
    if lowest >= 2:
        order += [(f"conv_t{lowest - 1}{side}", 1) for side in "ab"]  # an UpConv: its kernel
    return sorted(order, key=lambda entry: _creation_rank(entry[0]))


def tf1_variables(model):
    """[(checkpoint key, variable, description)] for every variable of ``model`` in the
    reference's creation order. A level-N build holds a prefix of the full list."""
    present = {layer.name for layer in model.layers}
    entries, index = [], 0
    for name, count in tf1_order(model):
        if name not in present:  # an unused upsampling layer of a partial build
            index += count
            continue
        layer = model.get_layer(name)
        convs = layer.conv_layers() if hasattr(layer, "conv_layers") else [layer]
        for conv in convs:
            label = f"{name}/{conv.name}" if conv is not layer else name
            for var in conv.tf1_variables():
                entries.append((tf1_key(index), var, f"{label} {_ROLES[var.name]}"))
                index += 1
    return entries


def load_checkpoint(model, prefix: str) -> None:
    """Load a checkpoint with the reference's keys (the released TF1 weights or our own) into
    ``model``. The whole checkpoint is read and verified first (read_verified:
    every tensor readable, finite) and every key, dtype and shape checked against the model,
    before anything is assigned."""
    entries = tf1_variables(model)
    values = read_verified(prefix, labels={key: label for key, _, label in entries})
    for key, var, label in entries:
        if key not in values:
            raise UserError(f"{prefix}: key {key} ({label}, shape {list(var.shape)}) is missing from the checkpoint")
        value = values[key]
        if list(value.shape) != list(var.shape):
            raise UserError(f"{prefix}: {key} ({label}) has shape {list(value.shape)}, expected {list(var.shape)}")
        if value.dtype != np.dtype(var.dtype):
            raise UserError(f"{prefix}: {key} ({label}) has dtype {value.dtype}, expected {var.dtype}")
    for key, var, _ in entries:
        var.assign(values[key])


def load_weights(model, prefix: str) -> None:
    """load_checkpoint, naming the intact earlier checkpoint when ``prefix`` is damaged."""
    with naming_intact(prefix):
        load_checkpoint(model, prefix)


def load_model(level: int, prefix: str, precision: str = "fp32"):
    """A PyNET built for ``level``, computing in ``precision``, with the weights of checkpoint
    ``prefix`` (float32 in every precision)."""
    from model import PyNET  # here: the model starts TensorFlow (see the module's docstring)

    model = PyNET(level=level, precision=precision)
    load_weights(model, prefix)
    return model


def check_finite(model, prefix: str) -> None:
    """NonFiniteWeights (naming ``prefix``, which is then not written) if a weight is NaN or Inf."""
    bad = nonfinite_count(model.weights)
    if bad:
        raise NonFiniteWeights(f"{prefix}: not written: the weights hold {bad} NaN or Inf values",
                                           count=bad)


def save_checkpoint(model, prefix: str, finite_checked: bool = False) -> None:
    """Write all variables of a full PyNET under the reference's keys, as a TF V2 checkpoint
    (``prefix.index`` + ``prefix.data-00000-of-00001``) that TF1's Saver can restore too.

    Weights with NaN or Inf are refused (``finite_checked``: the caller has just run
    check_finite, a pass over every weight). Written under a temporary prefix and renamed, the
    index last: a crash never leaves a checkpoint that looks complete but is not, and a
    failed write (a full disk) leaves nothing (all_or_nothing).
    """
    entries = tf1_variables(model)
    if len(entries) != TF1_VARIABLE_COUNT:
        raise ValueError(f"only a full model can be saved ({len(entries)} of {TF1_VARIABLE_COUNT} variables)")
    if not finite_checked:
        check_finite(model, prefix)

    folder = os.path.dirname(prefix)
    if folder:
        files.makedirs(folder)
    tmp_prefix = f"{prefix}.tmp{os.getpid()}"
    with all_or_nothing(prefix):
        _tf().raw_ops.SaveV2(prefix=tmp_prefix, tensor_names=[key for key, _, _ in entries],
                          shape_and_slices=[""] * len(entries), tensors=[var.value for _, var, _ in entries])
        data = ".data-00000-of-00001"
        files.rename(tmp_prefix + data, prefix + data)
        files.rename(tmp_prefix + ".index", prefix + ".index")


# ---------------------------------------------------------------------------------------
# the checkpoint an inference script loads

def resolve(args) -> tuple:
    """(checkpoint prefix, iteration label for file names) from orig=, restore_iter=, level=
    and models_dir= (test_model.py, evaluate_accuracy.py, export_model.py)."""
    if args["orig"]:
        if args.get("restore_iter") is not None:
            raise UsageError("orig=true uses the released weights: leave out restore_iter or give orig=false")
        return original_checkpoint(), "None"
    level, iteration, models_dir = args["level"], args["restore_iter"], args["models_dir"]
    if iteration is None:
        iteration = get_last_iter(level, models_dir)
        if iteration is None:
            raise UserError(f"no checkpoint pynet_level_{level}_iteration_*.ckpt in {models_dir}: "
                            f"train level {level} first (python train_model.py level={level}) "
                            f"or use the released weights with orig=true")
    prefix = checkpoint_prefix(models_dir, level, iteration)
    if not files.exists(prefix + ".index"):
        latest = get_last_iter(level, models_dir)
        there = (f"the latest level-{level} one is iteration {latest}" if latest is not None
                 else f"{models_dir} holds no level-{level} checkpoint")
        raise UserError(f"{prefix}: no checkpoint there (restore_iter={iteration}); {there}")
    return prefix, str(iteration)
