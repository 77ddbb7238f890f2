"""One training run per models_dir (run_lock, preflight): a second run, resume=true or
overwrite=true beside a live run are refused before they touch anything, the lock of a killed
run does not block, a process that writes nothing (a worker of a cluster) takes no lock, and the
checks made before TensorFlow starts end a run with a missing dataset in one line.

The live run is a child process holding the lock (what a run does first): starting one is a
fraction of a second, a training run tens of seconds.
"""

import os
import re
import signal
import subprocess
import sys

import pytest

import cli
import preflight
import resume
import run_lock
import train_model
import trainer
from helpers import ROOT

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
ENV.pop("TF_CONFIG", None)
HOLD = "import sys, time, run_lock; run_lock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(600)"
TRY = ("import sys, run_lock, cli\ntry:\n    run_lock.acquire(sys.argv[1])\nexcept cli.UserError as err:\n"
       "    print(err)\nelse:\n    print('acquired')")


@pytest.fixture
def holder():
    """``holder(folder)``: a child process holding ``folder``'s lock, killed at the end."""
    started = []

    def start(folder):
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], env=ENV, cwd=str(ROOT),
                                stdout=subprocess.PIPE, text=True)
        started.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def other_process_tries(folder) -> str:
    """What another process gets when it asks for ``folder``'s lock: "acquired" or the error."""
    return subprocess.run([sys.executable, "-c", TRY, str(folder)], env=ENV, cwd=str(ROOT), capture_output=True,
                          text=True, timeout=60).stdout.strip()


def snapshot(root):
    found = {}
    for folder, dirs, names in os.walk(root):
        for name in names:
            stat = os.lstat(os.path.join(folder, name))
            found[os.path.relpath(os.path.join(folder, name), root)] = (stat.st_size, stat.st_mtime_ns)
        for name in dirs:
            found[os.path.relpath(os.path.join(folder, name), root)] = "dir"
    return found


def earlier_run(models):
    """Files named as the checkpoints of a level-5 run with their training states (never read:
    the lock is checked first)."""
    models.mkdir(parents=True)
    for i in (0, 3):
        for suffix in ("", ".train_state"):
            for ext in (".index", ".data-00000-of-00001"):
                (models / f"pynet_level_5_iteration_{i}.ckpt{suffix}{ext}").write_bytes(b"an earlier run")
    (models / "logs.txt").write_text("step 0 | ...\n")


def run_argv(data, tmp, *extra):
    return [f"dataset_dir={data}", "level=5", "patch_size=32", "batch_size=2",
            f"models_dir={tmp / 'models'}", f"results_dir={tmp / 'results'}", "progress=false", *extra]


def one_error_line(argv, capsys):
    code = cli.run(train_model.main, argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return code, lines[0]


def test_a_run_beside_a_live_run_is_refused_and_touches_nothing(sample_dataset, tmp_path, holder, capsys):
    models = tmp_path / "models"
    earlier_run(models)
    live = holder(models)
    before = snapshot(tmp_path)
    # a second run, one resuming the live run's checkpoint, one deleting it: each refused, naming the live run
    for extra in ([], ["resume=true"], ["overwrite=true"]):
        code, line = one_error_line(run_argv(sample_dataset, tmp_path, *extra), capsys)
        assert code == 1
        folder = re.escape(str(models))
        assert re.fullmatch(rf"error: models_dir={folder} is in use by another training run \(pid {live.pid}, "
                            rf"since \S+: python -c {folder}\): wait for it to end, or train into another models_dir",
                            line), line
        assert snapshot(tmp_path) == before
    assert other_process_tries(models).startswith(f"models_dir={models} is in use by another training run (pid "
                                                  f"{live.pid}")

    # killed outright: its lock goes with it (its file stays, naming it), and the next run takes the folder
    live.send_signal(signal.SIGKILL)
    live.wait()
    assert (models / run_lock.LOCK_NAME).exists()
    args = train_model.parse_arguments(run_argv(sample_dataset, tmp_path, "resume=true"))
    plan = preflight.check(args, out=lambda *a: None)
    assert (plan.start.kind, plan.start.iteration) == ("resume", 3)
    assert other_process_tries(models).startswith("models_dir=")  # held by this run now
    plan.release()
    assert not (models / run_lock.LOCK_NAME).exists()
    assert other_process_tries(models) == "acquired"


def test_the_lock_is_reentrant_within_a_process_and_released_by_its_last_holder(tmp_path):
    """quickstart.py trains its levels one after another in one process, and tests set up a
    trainer beside another on one folder."""
    models = tmp_path / "new" / "models"
    first = run_lock.acquire(str(models))
    second = run_lock.acquire(str(models))
    first.release()
    first.release()  # idempotent: the second holder still holds it
    assert "is in use by another training run" in other_process_tries(models)
    second.release()
    assert not models.exists()  # made for the run, left empty: removed with the lock file
    assert other_process_tries(models) == "acquired"


def test_a_process_that_writes_nothing_takes_no_lock(model, sample_dataset, tmp_path, holder, monkeypatch):
    """Worker 1 of a cluster writes nothing: beside the chief's hold on a shared models_dir it sets up."""
    models = tmp_path / "models"
    live = holder(models)
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, '
                                    '"task": {"type": "worker", "index": 1}}')
    args = train_model.parse_arguments(run_argv(sample_dataset, tmp_path, "num_train_iters=0", "tensorboard=false"))
    job = trainer.Trainer(args, model=model, out=lambda *a: None)
    assert not job.chief and job.plan.lock is None and job.start.kind == "scratch"
    assert live.poll() is None and other_process_tries(models).startswith("models_dir=")


def test_a_remote_folder_takes_no_lock_and_says_so():
    printed = []
    assert run_lock.acquire("ram://pynet-lock-test/models", out=printed.append) is None
    assert printed == ["note: models_dir=ram://pynet-lock-test/models is remote: no lock is taken there, so make "
                       "sure no other training run uses it at the same time"]


def test_a_missing_dataset_is_one_line_before_tensorflow_starts(tmp_path):
    """train_model.py as a script: its only line on stderr is the error; TensorFlow was never
    imported (so none of its start-up notices could come before it) and nothing was made."""
    missing = tmp_path / "nowhere"
    script = ("import runpy, sys\nsys.argv = ['train_model.py'] + sys.argv[1:]\ntry:\n"
              "    runpy.run_path('train_model.py', run_name='__main__')\n"
              "finally:\n    print('tensorflow imported:', 'tensorflow' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", script, "level=5", f"dataset_dir={missing}",
                           f"models_dir={tmp_path / 'models'}", f"results_dir={tmp_path / 'results'}"],
                          env=ENV, cwd=str(ROOT), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"error: {missing}: dataset folder not found (get the ZRR dataset, see "
                                        f"README, or make a sample: python make_sample_dataset.py)"]
    assert "tensorflow imported: False" in proc.stdout
    assert os.listdir(tmp_path) == []


def test_the_checks_wait_for_tensorflow_only_where_they_need_it(monkeypatch):
    """Before TensorFlow starts unless a path is one only TensorFlow reads, or the run is one task
    of a cluster (whose checks run in the Trainer, where a failure reaches the other tasks)."""
    monkeypatch.delenv("TF_CONFIG", raising=False)
    early = lambda *argv: train_model.checks_before_tensorflow(train_model.parse_arguments(list(argv)))  # noqa: E731
    assert early() and early("init_from=models/original/pynet_level_0.ckpt")
    assert not early("dataset_dir=gs://bucket/raw_images/") and not early("models_dir=gs://bucket/models/")
    assert not early("init_from=gs://bucket/pynet_level_0.ckpt")
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, '
                                    '"task": {"type": "worker", "index": 0}}')
    assert not early()


def test_overwrite_says_what_it_deletes(tmp_path):
    """An earlier run killed before its first checkpoint left only its TensorBoard summaries."""
    models = tmp_path / "models"
    summaries = models / "tensorboard" / "level_5"
    summaries.mkdir(parents=True)
    (summaries / "events.out.tfevents.1").write_bytes(b"")
    args = {"level": 5, "models_dir": str(models), "results_dir": str(tmp_path / "results"), "overwrite": True}
    printed = []
    resume.prepare_folders(args, "scratch", log=printed.append)
    assert printed == [f"overwrite=true: deleted the level-5 TensorBoard summaries ({summaries}) of an earlier run "
                       f"from {models}"]
    assert not summaries.exists()

    summaries.mkdir(parents=True)
    for i in (0, 20):
        for suffix in (".index", ".data-00000-of-00001", ".train_state.index"):
            (models / f"pynet_level_5_iteration_{i}.ckpt{suffix}").write_bytes(b"")
    printed.clear()
    resume.prepare_folders(args, "scratch", log=printed.append)
    assert printed == [f"overwrite=true: deleted 2 level-5 checkpoint(s) and the level-5 TensorBoard summaries "
                       f"({summaries}) of an earlier run from {models}"]
    assert sorted(os.listdir(models)) == ["tensorboard"]
