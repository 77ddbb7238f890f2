"""What a training run starts from and what it leaves to continue, decided from the files in
models_dir alone (TensorFlow-free, so that train_model.py checks it before TensorFlow starts).

* ``find_start(args)``: the run's start: from scratch, the level above's weights, the weights
  of ``init_from=``, or its own resumed run.
* ``check_fresh_start`` / ``prepare_folders``: a fresh training run does not write into a
  folder where another run's checkpoints of its level would still count as "the latest".
* ``trim_log``: logs.txt as far as the checkpoint a run resumes from.

The training state beside each checkpoint is train_state.py's.
"""

import os
import re

import checkpoints
import files
from checkpoints import STATE_SUFFIX
from cli import UserError

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


def summaries_dir(models_dir: str, level: int) -> str:
    return os.path.join(models_dir, "tensorboard", f"level_{level}")


def clear_level(models_dir: str, level: int):
    """Delete the level's checkpoints (with their training states) and TensorBoard summaries.
    Returns (the checkpoint prefixes deleted, the summaries' folder or None)."""
    prefixes = set()
    for name in sorted(files.listdir(models_dir)) if files.isdir(models_dir) else []:
        stem = name.split(".ckpt", 1)[0] + ".ckpt"
        parsed = checkpoints.parse_checkpoint_prefix(stem)
        if ".ckpt" in name and parsed is not None and parsed[0] == level:
            files.remove(os.path.join(models_dir, name), missing_ok=True)
            prefixes.add(stem)
    summaries = summaries_dir(models_dir, level)
    if files.isdir(summaries):
        files.remove(summaries)
    else:
        summaries = None
    return sorted(prefixes), summaries


def prepare_folders(args, start_kind: str, log=print) -> None:
    """At the start of a training run (the writing process): temporaries of killed runs removed
    from models_dir and results_dir, and with overwrite=true (when not resuming) the level's
    earlier checkpoints and TensorBoard summaries deleted, saying which."""
    for name in ("models_dir", "results_dir"):
        files.remove_stale_temps(args[name])
    if not args.get("overwrite") or start_kind == "resume":
        return
    level, models_dir = args["level"], args["models_dir"]
    prefixes, summaries = clear_level(models_dir, level)
    deleted = [f"{len(prefixes)} level-{level} checkpoint(s)"] if prefixes else []
    if summaries:
        deleted.append(f"the level-{level} TensorBoard summaries ({summaries})")
    if deleted:
        log(f"overwrite=true: deleted {' and '.join(deleted)} of an earlier run from {models_dir}")


# ---------------------------------------------------------------------------------------
# logs.txt

_LOG_STEP = re.compile(r"^step (\d+) \|")


def trim_log(path: str, iteration: int) -> int:
    """Drop the lines of logs.txt past ``iteration``, the checkpoint a run resumes from; returns
    how many went.

    A run appends an evaluation's line before it writes that iteration's checkpoint, so a run
    killed between the two leaves a line that its resumed run logs again. Trimming on resume
    keeps every step up to the checkpoint, each once. Logging once the checkpoint is in place
    would leave a hole instead (killed between the checkpoint and its line, the resumed run
    starts after that step) and lose the line of an evaluation whose checkpoint failed (NaN
    weights, a full disk), the line that shows why."""
    if not files.exists(path):
        return 0
    lines = files.read_bytes(path).decode("utf-8", "replace").splitlines(keepends=True)
    kept = [line for line in lines if not ((m := _LOG_STEP.match(line)) and int(m.group(1)) > iteration)]
    if len(kept) != len(lines):
        files.write_file(path, "".join(kept).encode())
    return len(lines) - len(kept)


# ---------------------------------------------------------------------------------------
# where a training run starts

class Start:
    """How a run begins: ``kind`` is "scratch", "handover" (level+1 weights), "init_from" (the
    weights of init_from=) or "resume"."""

    def __init__(self, kind, prefix=None, iteration=-1):
        self.kind, self.prefix, self.iteration = kind, prefix, iteration

    def __repr__(self):
        return f"Start({self.kind!r}, {self.prefix!r}, {self.iteration})"


def resumable_iterations(models_dir, level):
    """Iterations of ``level`` that have both the model checkpoint and the training state."""
    states = set(checkpoints.checkpoint_iterations(level, models_dir, STATE_SUFFIX))
    return [i for i in checkpoints.checkpoint_iterations(level, models_dir) if i in states]


def _resumed(args, log):
    """The Start of resume=true, or None when the level has nothing to resume."""
    level, models_dir = args["level"], args["models_dir"]
    done = resumable_iterations(models_dir, level)
    if not done:
        log(f"note: resume=true but no level-{level} checkpoint with training state in {models_dir}: "
            f"starting level {level} from the beginning")
        return None
    latest_model = checkpoints.get_last_iter(level, models_dir)
    if latest_model is not None and latest_model > done[-1]:
        log(f"note: pynet_level_{level}_iteration_{latest_model}.ckpt has no training state; "
            f"resuming from iteration {done[-1]}")
    if args.get("init_from"):
        log(f"note: resume=true continues this level's own run in {models_dir}: init_from={args['init_from']} "
            f"gave its first weights and is not read again")
    return Start("resume", checkpoints.checkpoint_prefix(models_dir, level, done[-1]), done[-1])


def _given(prefix):
    if not files.exists(prefix + ".index"):
        raise UserError(f"init_from={prefix}: no checkpoint there (expected {prefix}.index and its "
                        f".data-00000-of-00001 file)")
    return Start("init_from", prefix)


def _handover(args):
    models_dir, upper = args["models_dir"], args["level"] + 1
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


def find_start(args, log=print) -> Start:
    """Decide what the run starts from, or raise a one-line UserError."""
    if args["resume"]:
        start = _resumed(args, log)
        if start is not None:
            return start
    check_fresh_start(args["models_dir"], args["level"], args.get("overwrite", False))
    if args.get("init_from"):
        return _given(args["init_from"])
    if args["level"] == 5:
        return Start("scratch")
    return _handover(args)
