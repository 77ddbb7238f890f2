"""The checks a training run makes before anything is built or written: output folders, another
run in models_dir (the writing process takes the folder's lock), the VGG file, the start point,
the dataset. TensorFlow-free, so that train_model.py refuses with one line before it starts
TensorFlow; trainer.Trainer makes them itself when it is not handed their result.
"""

import files
import load_dataset
import resume
import run_lock
import vgg
from cli import UserError

NO_VGG_WARNING = ("WARNING: vgg_dir=none: level {level} trains WITHOUT the VGG-19 content loss that the "
                  "reference uses at levels 3 to 0; results will differ from the paper's")


def uses_content(level: int) -> bool:
    """Whether the reference's loss of ``level`` has the VGG-19 content term (levels 3 to 0), as
    losses.uses_content says; here without TensorFlow."""
    return level <= 3


def departures(args, start_kind: str = "scratch") -> list:
    """Notes for the options that leave the reference's training (init=, loss=); a resumed level,
    or one given all its weights by init_from=, initialises nothing."""
    notes = []
    if args["init"] != "reference" and start_kind not in ("resume", "init_from"):
        notes.append(f"NOTE: init={args['init']}: the layers level {args['level']} adds start from He-normal "
                     f"weights, not the reference's N(0, 0.01)")
    if args["loss"] != "reference" and uses_content(args["level"]):
        notes.append(f"NOTE: loss={args['loss']}: level {args['level']} trains on its MSE term alone, not the "
                     f"reference's loss")
    return notes


def check_eval_batch(args, num_test):
    if num_test < args["eval_batch_size"]:
        raise UserError(f"eval_batch_size={args['eval_batch_size']} is larger than the {num_test} test patches of "
                        f"{args['dataset_dir']}: the evaluation uses full batches only (as the reference); lower "
                        f"batch_size or eval_batch_size")


class Plan:
    """What the checks found: ``start`` (resume.Start), ``needs_vgg``, the usable patches of the
    splits (``test_indices``, ``train_indices``), and the hold on models_dir (``lock``, None for
    a process that writes nothing or a remote folder)."""

    def __init__(self, start, needs_vgg, test_indices, train_indices, lock=None):
        self.start, self.needs_vgg = start, needs_vgg
        self.test_indices, self.train_indices = test_indices, train_indices
        self.lock = lock

    def release(self) -> None:
        """Give models_dir up (idempotent): at the end of the run, or when it fails."""
        if self.lock is not None:
            self.lock.release()


def _needs_vgg(args, out) -> bool:
    needed = uses_content(args["level"]) and args["loss"] == "reference"
    if needed and args["vgg_dir"].lower() == "none":
        out(NO_VGG_WARNING.format(level=args["level"]))
        return False
    if needed:
        vgg.weights_file(args["vgg_dir"])  # missing, or a folder without the file: said before any work
    return needed


def check(args, writer: bool = True, out=print) -> Plan:
    """The checks, cheap ones first; a ``writer`` (the process that writes: one process alone, or
    the chief) holds models_dir from the first check that reads it until Plan.release(), so that
    no other run can start there meanwhile. Nothing is written but the lock file (which a
    failure removes with a folder made for it)."""
    for name in ("models_dir", "results_dir"):
        files.check_output_dir(args[name], name)
    lock = run_lock.acquire(args["models_dir"], out=out) if writer else None
    try:
        needs_vgg = _needs_vgg(args, out)
        start = resume.find_start(args, log=out)
        for line in departures(args, start.kind):
            out(line)
        test_indices = load_dataset.check_dataset(args["dataset_dir"], "test", skip_bad=args["skip_bad"], deep=True)
        check_eval_batch(args, len(test_indices))
        train_indices = load_dataset.check_dataset(args["dataset_dir"], "train", skip_bad=args["skip_bad"])
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return Plan(start, needs_vgg, test_indices, train_indices, lock)
