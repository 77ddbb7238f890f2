"""What a training run starts from and what it leaves to continue: the start point (scratch,
the level above's weights, or its own resumed run), the training state saved beside each
checkpoint, and one run per folder.

* ``find_start(args)``: the run's start, from the files in models_dir alone.
* ``save_training_checkpoint`` / ``restore_state``: a training checkpoint with, beside it, the
  training state (Adam's variables, the loop's counters) that resume=true restores.
* ``check_fresh_start`` / ``prepare_folders``: a fresh training run does not write into a
  folder where another run's checkpoints of its level would still count as "the latest".
"""

import os

import tensorflow as tf

import checkpoints
import files
from checkpoints import STATE_SUFFIX, all_or_nothing, read_verified, state_prefix
from cli import UserError

# ---------------------------------------------------------------------------------------
# a training checkpoint: the model's and, beside it, the training state resume=true restores

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




# ---------------------------------------------------------------------------------------
# one run per folder and level

def check_fresh_start(models_dir: str, level: int, overwrite: bool = False) -> None:
    """A run that starts a level afresh refuses a folder that already holds checkpoints of that
    level (another run's "latest" would win over its own) unless ``overwrite``."""
    done = checkpoints.checkpoint_iterations(level, models_dir)
    if done and not overwrite:
        shown = ", ".join(map(str, done[-3:]))
        raise UserError(f"{models_dir} already holds level-{level} checkpoints of an earlier run (iterations "
                        f"{'..., ' if len(done) > 3 else ''}{shown}): continue that run with resume=true, train into "
                        f"another models_dir, or give overwrite=true to delete them first")


def clear_level(models_dir: str, level: int) -> list:
    """Delete the level's checkpoints (with their training states) and TensorBoard summaries."""
    removed = []
    for name in sorted(files.listdir(models_dir)) if files.isdir(models_dir) else []:
        stem = name.split(".ckpt", 1)[0] + ".ckpt"
        parsed = checkpoints.parse_checkpoint_prefix(stem)
        if ".ckpt" in name and parsed is not None and parsed[0] == level:
            files.remove(os.path.join(models_dir, name), missing_ok=True)
            removed.append(name)
    summaries = os.path.join(models_dir, "tensorboard", f"level_{level}")
    if files.isdir(summaries):
        files.remove(summaries)
        removed.append(summaries)
    return removed


def prepare_folders(args, start_kind: str, log=print) -> None:
    """At the start of a training run (the writing process): temporaries of killed runs removed
    from models_dir and results_dir, and with overwrite=true (when not resuming) the level's
    earlier checkpoints deleted."""
    for name in ("models_dir", "results_dir"):
        files.remove_stale_temps(args[name])
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
    states = set(checkpoints.checkpoint_iterations(level, models_dir, STATE_SUFFIX))
    return [i for i in checkpoints.checkpoint_iterations(level, models_dir) if i in states]


def find_start(args, log=print) -> Start:
    """Decide what the run starts from, or raise a one-line UserError."""
    level, models_dir = args["level"], args["models_dir"]
    if args["resume"]:
        done = resumable_iterations(models_dir, level)
        if done:
            latest_model = checkpoints.get_last_iter(level, models_dir)
            if latest_model is not None and latest_model > done[-1]:
                log(f"note: pynet_level_{level}_iteration_{latest_model}.ckpt has no training state; "
                    f"resuming from iteration {done[-1]}")
            return Start("resume", checkpoints.checkpoint_prefix(models_dir, level, done[-1]), done[-1])
        log(f"note: resume=true but no level-{level} checkpoint with training state in {models_dir}: "
            f"starting level {level} from the beginning")
    check_fresh_start(models_dir, level, args.get("overwrite", False))
    if level == 5:
        return Start("scratch")
    upper = level + 1
    iteration = args["restore_iter"]
    if iteration is None:
        iteration = checkpoints.get_last_iter(upper, models_dir)
        if iteration is None:
            raise UserError(f"no level-{upper} checkpoint (pynet_level_{upper}_iteration_*.ckpt) in {models_dir}: "
                            f"train level {upper} first (python train_model.py level={upper})")
    prefix = checkpoints.checkpoint_prefix(models_dir, upper, iteration)
    if not files.exists(prefix + ".index"):
        raise UserError(f"{prefix}: no such checkpoint (restore_iter={iteration}); "
                        f"the latest level-{upper} one is iteration {checkpoints.get_last_iter(upper, models_dir)}")
    return Start("handover", prefix)
