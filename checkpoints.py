"""Checkpoint files on disk: read whole and verified, written all or nothing, one run per folder.

* ``read_verified(prefix)`` reads every tensor of a TensorFlow checkpoint (TensorFlow checks
  each one's checksum), checks it against the dtype and shape its index records and that it
  is finite; a damaged or non-finite checkpoint is a one-line ``DamagedCheckpoint`` naming
  the damaged file.
* ``naming_intact(prefix)`` adds, to that error, which earlier checkpoint of the same level
  is intact: it is named, never used silently.
* ``all_or_nothing(prefix)`` wraps the writing of a checkpoint's files: on any failure the
  temporaries and whatever was already renamed are removed, and a refused write (a full
  disk...) is one line.
* ``check_fresh_start`` / ``prepare_folders``: a fresh training run does not write into a
  folder where another run's checkpoints of its level would still count as "the latest".
* ``save_training_checkpoint`` / ``restore_state``: a training checkpoint with, beside it, the
  training state (Adam's variables, the loop's counters) that resume=true restores.
* ``find_start(args)``: what a training run starts from (scratch, the level above's latest
  checkpoint, or its own resumed run), from the files in models_dir alone.
* ``resolve(params)``: the checkpoint test_model.py and evaluate_accuracy.py load.
"""

import contextlib
import os
import re

import utils
from utils import UsageError, UserError

STATE_SUFFIX = ".train_state"  # optimizer state + iteration, beside a training checkpoint


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
        shards = sorted(n for n in utils.listdir(os.path.dirname(prefix) or ".")
                        if n.startswith(os.path.basename(prefix) + ".data-"))
        data = os.path.join(os.path.dirname(prefix), shards[0]) if shards else prefix + ".data-00000-of-00001"
    if not utils.exists(data):
        return f"{data}: missing (the checkpoint's {os.path.basename(prefix)}.index is there without its data)"
    return f"{data}: damaged or truncated: {_reason(exc)} reading {what}"


def read_verified(prefix: str, labels: dict = None) -> dict:
    """Every tensor of the checkpoint ``prefix`` as NumPy arrays, each read and checked (its
    checksum, the dtype and shape the index records, finite values); ``labels`` names keys in
    the messages. Raises DamagedCheckpoint naming the file that is damaged."""
    import numpy as np
    import tensorflow as tf

    index = prefix + ".index"
    if not utils.exists(index):
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
    """Number of NaN/Inf values in floating-point variables (60 ms for the full model on a CPU)."""
    import numpy as np

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
    parsed = utils.parse_checkpoint_prefix(prefix)
    if parsed is None:
        return None
    level, iteration = parsed
    folder = os.path.dirname(prefix)
    earlier = [i for i in utils.checkpoint_iterations(level, folder, STATE_SUFFIX if resume else "") if i < iteration]
    for candidate in reversed(earlier):
        good = utils.checkpoint_prefix(folder, level, candidate)
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


def load_weights(model, prefix: str) -> None:
    """model.load_checkpoint, naming the intact earlier checkpoint when ``prefix`` is damaged."""
    import model as pynet

    with naming_intact(prefix):
        pynet.load_checkpoint(model, prefix)


# ---------------------------------------------------------------------------------------
# writing

def _starting_with(folder: str, base: str) -> set:
    return {n for n in utils.listdir(folder) if n.startswith(base)} if utils.isdir(folder) else set()


@contextlib.contextmanager
def all_or_nothing(prefix: str):
    """Write the files of checkpoint ``prefix`` in the block. On any failure (a full disk, an
    interruption) every file of ``prefix`` the block created, temporaries and TensorFlow's
    ``_temp`` folders included, is removed; a write the system refused becomes one line."""
    import tensorflow as tf

    folder, base = os.path.dirname(prefix) or ".", os.path.basename(prefix)
    before = _starting_with(folder, base + ".")
    try:
        yield
    except BaseException as exc:
        for name in _starting_with(folder, base + ".") - before:
            utils.remove(os.path.join(folder, name), missing_ok=True)
        if isinstance(exc, (tf.errors.OpError, OSError)):
            raise UserError(f"{prefix}: cannot write the checkpoint ({_reason(exc)}); nothing was saved") from None
        raise


# ---------------------------------------------------------------------------------------
# a training checkpoint: the model's and, beside it, the training state resume=true restores

def state_prefix(model_prefix: str) -> str:
    return model_prefix + STATE_SUFFIX


def _rename_checkpoint_files(tmp_prefix, prefix):
    folder = os.path.dirname(tmp_prefix) or "."
    base = os.path.basename(tmp_prefix)
    files = [n for n in utils.listdir(folder) if n.startswith(base + ".")]
    # data files first, the index last: a checkpoint is complete once its index exists
    for name in sorted(files, key=lambda n: n.endswith(".index")):
        utils.rename(os.path.join(folder, name), prefix + name[len(base):])


def state_variables(adam, counters):
    """What resume=true restores besides the model: Adam's variables (iteration count and
    moments, in order; ``adam`` is the one inside a LossScaleOptimizer) and the loop's counters."""
    variables = {f"adam_{i:04d}": v for i, v in enumerate(adam.variables)}
    variables.update(counters)
    return variables


def save_state(adam, counters, prefix):
    """Write the training state of checkpoint ``prefix`` atomically (temporary name, renamed)."""
    import tensorflow as tf

    tmp = f"{state_prefix(prefix)}.tmp{os.getpid()}"
    tf.train.Checkpoint(**state_variables(adam, counters)).write(tmp)
    _rename_checkpoint_files(tmp, state_prefix(prefix))


def restore_state(adam, counters, prefix):
    """Read the training state written by save_state, checking that it fits this optimizer."""
    import tensorflow as tf

    path = state_prefix(prefix)
    variables = state_variables(adam, counters)
    values = read_verified(path)  # every tensor readable and finite, or one line naming the file
    stored = {k.split("/")[0]: v.shape for k, v in values.items() if k.endswith("/.ATTRIBUTES/VARIABLE_VALUE")}
    for name, var in variables.items():
        if name not in stored or list(stored[name]) != list(var.shape):
            raise UserError(f"{path}: the training state does not match this run ({name}); it was written for "
                            f"another level or setting")
    if len(stored) != len(variables):
        raise UserError(f"{path}: the training state has {len(stored)} entries, this run {len(variables)}: "
                        f"written for another level or setting")
    tf.train.Checkpoint(**variables).read(path).assert_existing_objects_matched().expect_partial()


def save_training_checkpoint(model, adam, counters, prefix):
    """Training state first, then the model checkpoint (the reference's keys, all 437 variables),
    each written under a temporary name and renamed. Non-finite weights are refused before
    anything is written; a failed write (a full disk) leaves neither (all_or_nothing)."""
    import model as pynet

    pynet.check_finite(model, prefix)  # before the training state is written
    with all_or_nothing(prefix):
        save_state(adam, counters, prefix)
        pynet.save_checkpoint(model, prefix, finite_checked=True)


# ---------------------------------------------------------------------------------------
# one run per folder and level

def check_fresh_start(models_dir: str, level: int, overwrite: bool = False) -> None:
    """A run that starts a level afresh refuses a folder that already holds checkpoints of that
    level (another run's "latest" would win over its own) unless ``overwrite``."""
    done = utils.checkpoint_iterations(level, models_dir)
    if done and not overwrite:
        shown = ", ".join(map(str, done[-3:]))
        raise UserError(f"{models_dir} already holds level-{level} checkpoints of an earlier run (iterations "
                        f"{'..., ' if len(done) > 3 else ''}{shown}): continue that run with resume=true, train into "
                        f"another models_dir, or give overwrite=true to delete them first")


def clear_level(models_dir: str, level: int) -> list:
    """Delete the level's checkpoints (with their training states) and TensorBoard summaries."""
    removed = []
    for name in sorted(utils.listdir(models_dir)) if utils.isdir(models_dir) else []:
        stem = name.split(".ckpt", 1)[0] + ".ckpt"
        parsed = utils.parse_checkpoint_prefix(stem)
        if ".ckpt" in name and parsed is not None and parsed[0] == level:
            utils.remove(os.path.join(models_dir, name), missing_ok=True)
            removed.append(name)
    summaries = os.path.join(models_dir, "tensorboard", f"level_{level}")
    if utils.isdir(summaries):
        utils.remove(summaries)
        removed.append(summaries)
    return removed


def prepare_folders(args, start_kind: str, log=print) -> None:
    """At the start of a training run (the writing process): temporaries of killed runs removed
    from models_dir and results_dir, and with overwrite=true (when not resuming) the level's
    earlier checkpoints deleted."""
    for name in ("models_dir", "results_dir"):
        utils.remove_stale_temps(args[name])
    if args.get("overwrite") and start_kind != "resume":
        removed = clear_level(args["models_dir"], args["level"])
        if removed:
            count = len({n.split(".ckpt", 1)[0] for n in removed if ".ckpt" in n})
            log(f"overwrite=true: deleted {count} level-{args['level']} checkpoint(s) of an earlier run from "
                f"{args['models_dir']}")


# ---------------------------------------------------------------------------------------
# where a training run starts: scratch, the level above's weights, or its own resumed run

class Start:
    """How a run begins: ``kind`` is "scratch", "handover" (level+1 weights) or "resume"."""

    def __init__(self, kind, prefix=None, iteration=-1):
        self.kind, self.prefix, self.iteration = kind, prefix, iteration

    def __repr__(self):
        return f"Start({self.kind!r}, {self.prefix!r}, {self.iteration})"


def resumable_iterations(models_dir, level):
    """Iterations of ``level`` that have both the model checkpoint and the training state."""
    states = set(utils.checkpoint_iterations(level, models_dir, STATE_SUFFIX))
    return [i for i in utils.checkpoint_iterations(level, models_dir) if i in states]


def find_start(args, log=print) -> Start:
    """Decide what the run starts from, or raise a one-line UserError."""
    level, models_dir = args["level"], args["models_dir"]
    if args["resume"]:
        done = resumable_iterations(models_dir, level)
        if done:
            latest_model = utils.get_last_iter(level, models_dir)
            if latest_model is not None and latest_model > done[-1]:
                log(f"note: pynet_level_{level}_iteration_{latest_model}.ckpt has no training state; "
                    f"resuming from iteration {done[-1]}")
            return Start("resume", utils.checkpoint_prefix(models_dir, level, done[-1]), done[-1])
        log(f"note: resume=true but no level-{level} checkpoint with training state in {models_dir}: "
            f"starting level {level} from the beginning")
    check_fresh_start(models_dir, level, args.get("overwrite", False))
    if level == 5:
        return Start("scratch")
    upper = level + 1
    iteration = args["restore_iter"]
    if iteration is None:
        iteration = utils.get_last_iter(upper, models_dir)
        if iteration is None:
            raise UserError(f"no level-{upper} checkpoint (pynet_level_{upper}_iteration_*.ckpt) in {models_dir}: "
                            f"train level {upper} first (python train_model.py level={upper})")
    prefix = utils.checkpoint_prefix(models_dir, upper, iteration)
    if not utils.exists(prefix + ".index"):
        raise UserError(f"{prefix}: no such checkpoint (restore_iter={iteration}); "
                        f"the latest level-{upper} one is iteration {utils.get_last_iter(upper, models_dir)}")
    return Start("handover", prefix)


# ---------------------------------------------------------------------------------------
# the checkpoint an inference script loads

def resolve(params) -> tuple:
    """(checkpoint prefix, iteration label for file names) from orig=, restore_iter=, level=
    and models_dir= (test_model.py, evaluate_accuracy.py)."""
    if params["orig"]:
        if params.get("restore_iter") is not None:
            raise UsageError("orig=true uses the released weights: leave out restore_iter or give orig=false")
        return utils.original_checkpoint(), "None"
    level, iteration, models_dir = params["level"], params["restore_iter"], params["models_dir"]
    if iteration is None:
        iteration = utils.get_last_iter(level, models_dir)
        if iteration is None:
            raise UserError(f"no checkpoint pynet_level_{level}_iteration_*.ckpt in {models_dir}: "
                            f"train level {level} first (python train_model.py level={level}) "
                            f"or use the released weights with orig=true")
    prefix = utils.checkpoint_prefix(models_dir, level, iteration)
    if not utils.exists(prefix + ".index"):
        latest = utils.get_last_iter(level, models_dir)
        there = (f"the latest level-{level} one is iteration {latest}" if latest is not None
                 else f"{models_dir} holds no level-{level} checkpoint")
        raise UserError(f"{prefix}: no checkpoint there (restore_iter={iteration}); {there}")
    return prefix, str(iteration)
