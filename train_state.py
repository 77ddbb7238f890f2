"""The training state saved beside each training checkpoint, which resume=true restores: Adam's
variables and the loop's counters, in ``{checkpoint}.train_state``."""

import os

import tensorflow as tf

import checkpoints
import files
from checkpoints import all_or_nothing, read_verified, state_prefix
from cli import UserError


def _rename_checkpoint_files(tmp_prefix, prefix):
    folder = os.path.dirname(tmp_prefix) or "."
    base = os.path.basename(tmp_prefix)
    names = [n for n in files.listdir(folder) if n.startswith(base + ".")]
    # data files first, the index last: a checkpoint is complete once its index exists
    for name in sorted(names, key=lambda n: n.endswith(".index")):
        files.rename(os.path.join(folder, name), prefix + name[len(base):])


def state_variables(adam, counters):
    """What resume=true restores besides the model: Adam's variables (iteration count and
    moments, in order; ``adam`` is the one inside a LossScaleOptimizer) and the loop's counters."""
    variables = {f"adam_{i:04d}": v for i, v in enumerate(adam.variables)}
    variables.update(counters)
    return variables


def save_state(adam, counters, prefix):
    """Write the training state of checkpoint ``prefix`` atomically (temporary name, renamed)."""
    tmp = f"{state_prefix(prefix)}.tmp{os.getpid()}"
    tf.train.Checkpoint(**state_variables(adam, counters)).write(tmp)
    _rename_checkpoint_files(tmp, state_prefix(prefix))


def restore_state(adam, counters, prefix):
    """Read the training state written by save_state, checking that it fits this optimizer."""
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
    checkpoints.check_finite(model, prefix)  # before the training state is written
    with all_or_nothing(prefix):
        save_state(adam, counters, prefix)
        checkpoints.save_checkpoint(model, prefix, finite_checked=True)
