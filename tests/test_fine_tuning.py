"""logs.txt after a run killed between an evaluation's log line and its checkpoint, then resumed."""

import os
import re
from pathlib import Path

import pytest

import resume
import train_model
import train_state
import trainer


def make_args(data, tmp, **overrides):
    values = dict(level=5, dataset_dir=data, patch_size=32, batch_size=2, models_dir=tmp / "models",
                  results_dir=tmp / "results", progress="false", tensorboard="false")
    values.update(overrides)
    return train_model.parse_arguments([f"{k}={v}" for k, v in values.items()])


def logged_steps(models_dir):
    return [int(re.match(r"step (\d+) \|", line).group(1))
            for line in Path(models_dir, "logs.txt").read_text().splitlines()]


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
