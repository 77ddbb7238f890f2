"""What a run starts from and continues: init_from= (the authors' TF1 checkpoint or one of ours,
any level) and its resumed run, the agreement of a cluster's tasks on it, and logs.txt after a
run killed between an evaluation's log line and its checkpoint."""

import os
import re
from pathlib import Path

import numpy as np
import pytest

import checkpoints
import cli
import cluster as cluster_module
import resume
import train_model
import train_state
import trainer
from helpers import write_tf1_checkpoint


def make_args(data, tmp, **overrides):
    values = dict(level=5, dataset_dir=data, patch_size=32, batch_size=2, models_dir=tmp / "models",
                  results_dir=tmp / "results", progress="false", tensorboard="false")
    values.update(overrides)
    return train_model.parse_arguments([f"{k}={v}" for k, v in values.items()])


def logged_steps(models_dir):
    return [int(re.match(r"step (\d+) \|", line).group(1))
            for line in Path(models_dir, "logs.txt").read_text().splitlines()]


def assert_holds(model, prefix):
    """Every one of the model's 437 variables equals what checkpoint ``prefix`` holds for it."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(prefix)
    entries = checkpoints.tf1_variables(model)
    assert len(entries) == checkpoints.TF1_VARIABLE_COUNT
    for key, var, label in entries:
        np.testing.assert_array_equal(var.numpy(), reader.get_tensor(key), err_msg=label)


def scramble(model, seed):
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(0, 0.05, w.shape).astype(np.float32) for w in model.get_weights()])


# ---------------------------------------------------------------------------------------
# init_from

@pytest.mark.slow
def test_init_from_the_authors_tf1_checkpoint_starts_level_0_from_its_tensors(model, sample_dataset, tmp_path):
    rng = np.random.default_rng(5)
    arrays = {key: rng.normal(0, 0.05, var.shape).astype(np.float32)
              for key, var, _ in checkpoints.tf1_variables(model)}
    released = write_tf1_checkpoint(str(tmp_path / "original" / "pynet_level_0.ckpt"), arrays)
    del arrays
    printed = []
    job = trainer.Trainer(make_args(sample_dataset, tmp_path, level=0, loss="mse", init_from=released,
                                    num_train_iters=0), model=model, out=printed.append)
    assert f"level 0: from {released} (init_from)" in printed
    assert_holds(model, released)
    assert job.start.kind == "init_from" and int(job.optimizer.iterations.numpy()) == 0
    job.release()


@pytest.mark.slow
def test_init_from_our_checkpoint_and_its_resumed_run(model, built_weights, sample_dataset, tmp_path):
    """A level-3 checkpoint of another folder starts level 5 here; stopped after iteration 0 and
    resumed, the run continues its own checkpoint, not init_from's weights."""
    scramble(model, 6)
    ours = checkpoints.checkpoint_prefix(str(tmp_path / "elsewhere"), 3, 700)
    checkpoints.save_checkpoint(model, ours)
    model.set_weights(built_weights)
    stop = trainer.StopRequest()
    job = trainer.Trainer(make_args(sample_dataset, tmp_path, init_from=ours + ".index", num_train_iters=1,
                                    eval_step=1), model=model, stop=stop, out=lambda *a: None,
                          on_step=lambda i, loss: stop.request("test"))
    assert job.start.prefix == ours
    assert_holds(model, ours)
    with pytest.raises(trainer.TrainingStopped, match="after iteration 0"):
        job.run()
    models = str(tmp_path / "models")
    assert resume.resumable_iterations(models, 5) == [0]

    scramble(model, 7)
    printed = []
    job = trainer.Trainer(make_args(sample_dataset, tmp_path, init_from=ours, resume="true", num_train_iters=1,
                                    eval_step=1), model=model, out=printed.append)
    assert (job.start.kind, job.start.iteration) == ("resume", 0)
    assert any(line.startswith("note: resume=true continues this level's own run") and f"init_from={ours}" in line
               for line in printed), printed
    assert f"level 5: resuming after iteration 0 ({checkpoints.checkpoint_prefix(models, 5, 0)})" in printed
    assert_holds(model, checkpoints.checkpoint_prefix(models, 5, 0))
    assert int(job.optimizer.iterations.numpy()) == 1  # Adam's step count goes on
    job.release()


def test_init_from_start_points(tmp_path):
    given = tmp_path / "given" / "pynet_level_0.ckpt"
    args = lambda **kw: {"level": 2, "models_dir": str(tmp_path / "models"), "resume": False,  # noqa: E731
                         "restore_iter": None, "init_from": str(given), **kw}
    with pytest.raises(cli.UserError, match=re.escape(f"init_from={given}: no checkpoint there (expected "
                                                      f"{given}.index")):
        resume.find_start(args())
    given.parent.mkdir()
    Path(f"{given}.index").touch()
    start = resume.find_start(args(), log=lambda *a: None)
    assert (start.kind, start.prefix) == ("init_from", str(given))  # not level 3's: there is none
    # resume=true with nothing to resume yet: init_from; once the run has its own checkpoint, that
    notes = []
    assert resume.find_start(args(resume=True), log=notes.append).kind == "init_from"
    models = tmp_path / "models"
    models.mkdir()
    for name in ("pynet_level_2_iteration_40.ckpt.index", "pynet_level_2_iteration_40.ckpt.train_state.index"):
        (models / name).touch()
    start = resume.find_start(args(resume=True), log=notes.append)
    assert (start.kind, start.iteration) == ("resume", 40)
    assert notes[-1] == (f"note: resume=true continues this level's own run in {models}: init_from={given} gave "
                         f"its first weights and is not read again")
    # a fresh start beside that run is refused as any other
    with pytest.raises(cli.UserError, match="already holds level-2 checkpoints"):
        resume.find_start(args())


def test_init_from_arguments():
    args = train_model.parse_arguments(["init_from=models/original/pynet_level_0.ckpt.index"])
    assert args["init_from"] == "models/original/pynet_level_0.ckpt"
    assert train_model.parse_arguments(["init_from=a/b.ckpt.data-00000-of-00001"])["init_from"] == "a/b.ckpt"
    assert train_model.parse_arguments([])["init_from"] is None
    with pytest.raises(cli.UsageError, match="give one or the other"):
        train_model.parse_arguments(["init_from=a.ckpt", "restore_iter=3"])


def test_the_tasks_of_a_cluster_agree_on_init_from(tmp_path):
    """init_from's checkpoint is compared by content: the same files under other paths agree,
    other files under the same name do not."""
    tasks = [cluster_module.Task("worker", i, f"10.0.0.{i + 1}:12345") for i in range(2)]
    chief_view, worker_view = cluster_module.Cluster(tasks, tasks[0]), cluster_module.Cluster(tasks, tasks[1])
    base = dict(train_model.parse_arguments(["level=0"]))

    def row(folder, content):
        prefix = tmp_path / folder / "pynet_level_0.ckpt"
        prefix.parent.mkdir(exist_ok=True)
        Path(f"{prefix}.index").write_bytes(content)
        args = {**base, "init_from": str(prefix), "models_dir": str(tmp_path / folder)}
        return args, cluster_module.start_row(args, resume.Start("init_from", str(prefix)))

    args, chief = row("a", b"the released index")
    _, same = row("b", b"the released index")
    assert cluster_module.start_disagreement(np.array([chief, same]), chief_view, args) is None
    _, other = row("c", b"another checkpoint's index")
    problem = cluster_module.start_disagreement(np.array([chief, other]), chief_view, args)
    assert problem.startswith("worker 1 (10.0.0.2:12345) holds other checkpoint files for it, while the chief starts "
                              "level 0 from the checkpoint of init_from")
    upper = str(tmp_path / "pynet_level_1_iteration_5.ckpt")
    handover = cluster_module.start_row(args, resume.Start("handover", upper))
    problem = cluster_module.start_disagreement(np.array([chief, handover]), worker_view, args)
    assert "gives level 0 from level 1's iteration 5, the chief (worker 0) starts level 0 from the checkpoint of " \
           "init_from" in problem


# ---------------------------------------------------------------------------------------
# logs.txt and the checkpoint

class Killed(BaseException):
    """The process dying between two writes."""


@pytest.mark.slow
def test_a_kill_between_the_log_line_and_the_checkpoint_logs_each_step_once(model, built_weights, sample_dataset,
                                                                             tmp_path, monkeypatch):
    real = train_state.save_training_checkpoint

    def killed_at_1(model, adam, counters, prefix):
        if prefix.endswith("_iteration_1.ckpt"):
            raise Killed
        real(model, adam, counters, prefix)

    monkeypatch.setattr(train_state, "save_training_checkpoint", killed_at_1)
    args = make_args(sample_dataset, tmp_path, num_train_iters=1, eval_step=1)
    with pytest.raises(Killed):
        trainer.Trainer(args, model=model, out=lambda *a: None).run()
    models = str(tmp_path / "models")
    assert logged_steps(models) == [0, 1] and resume.resumable_iterations(models, 5) == [0]

    monkeypatch.setattr(train_state, "save_training_checkpoint", real)
    model.set_weights(built_weights)
    job = trainer.Trainer(make_args(sample_dataset, tmp_path, num_train_iters=1, eval_step=1, resume="true"),
                          model=model, out=lambda *a: None)
    assert job.start.iteration == 0
    job.run()
    assert logged_steps(models) == [0, 1]
    assert resume.resumable_iterations(models, 5) == [0, 1]


def test_trim_log_drops_the_lines_past_the_checkpoint(tmp_path):
    path = tmp_path / "logs.txt"
    lines = ["step 0 | training: 1, test: 2 | content: n/a, mse: 0.1, psnr: 10\n",
             "step 1000 | training: 1, test: 2 | content: n/a, mse: 0.1, psnr: 10\n",
             "a note of the user's\n",
             "step 2000 | training: 1, test: 2 | content: n/a, mse: 0.1, psnr: 10\n"]
    path.write_text("".join(lines))
    assert resume.trim_log(str(path), 1000) == 1
    assert path.read_text() == "".join(lines[:3])
    assert resume.trim_log(str(path), 1000) == 0 and resume.trim_log(str(tmp_path / "absent.txt"), 0) == 0
    assert os.listdir(tmp_path) == ["logs.txt"]
