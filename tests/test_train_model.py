"""train_model.py: runs of the full PyNET on 32x32 packed crops of a generated dataset.

One full model serves the in-process tests (building it and tracing a step cost seconds);
each test puts back its initial weights first. Strategies, mixed precision and signals need
a process of their own and run as subprocesses.
"""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import checkpoints
import cli
import cluster as cluster_module
import preflight
import resume
import run_lock
import steps
import train_model
import trainer
from helpers import ROOT, captured_gradient, random_vgg_weights, write_matconvnet_vgg

LOG_LINE = re.compile(r"^step (\d+) \| training: (\S+), test: (\S+) \| content: (\S+), mse: (\S+), psnr: (\S+)"
                      r"(, ms-ssim: (\S+))?$")
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def fake_vgg(module_tmp):
    path = module_tmp("vgg") / "imagenet-vgg-verydeep-19.mat"
    write_matconvnet_vgg(str(path), random_vgg_weights(seed=7))
    return str(path)


def make_args(data, tmp, **overrides):
    values = dict(level=5, dataset_dir=data, patch_size=32, batch_size=2, models_dir=tmp / "models",
                  results_dir=tmp / "results", progress="false", tensorboard="false")
    values.update(overrides)
    return train_model.parse_arguments([f"{k}={v}" for k, v in values.items()])


def run(args, model, **kwargs):
    job = trainer.Trainer(args, model=model, out=lambda *a: None, **kwargs)
    return job, job.run()


def log_lines(models_dir):
    lines = Path(models_dir, "logs.txt").read_text().splitlines()
    assert all(LOG_LINE.match(line) for line in lines), lines
    return [LOG_LINE.match(line) for line in lines]


def weights_of(model):
    return [np.array(w) for w in model.get_weights()]


def fixed_batch_loss(model, data, level, indices, patch=32):
    """Level loss of a fixed set of training patches (centre crops, no augmentation)."""
    import load_dataset
    import losses
    from model import level_model

    pairs = [load_dataset.load_pair(data, "train", i, level, patch, offset=(96, 96)) for i in indices]
    raw, target = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
    total, _ = losses.level_loss(level, level_model(model, level)(raw), target)
    return float(total)


# ---------------------------------------------------------------------------------------
# a short run, its outputs, and the level hand-over

@pytest.mark.slow
def test_short_run_lowers_level5_loss_and_writes_outputs(model, sample_dataset, tmp_path):
    args = make_args(sample_dataset, tmp_path, num_train_iters=24, eval_step=12, tensorboard="true",
                     learning_rate=1e-4)
    before = fixed_batch_loss(model, sample_dataset, 5, range(8))
    step_losses = []
    _, last = run(args, model, on_step=lambda i, loss: step_losses.append(loss))
    after = fixed_batch_loss(model, sample_dataset, 5, range(8))
    assert len(step_losses) == 25  # num_train_iters + 1 steps
    # a clear drop, with margin for the sample's content (25 steps lower it by 27-30% here)
    assert after < 0.8 * before, (before, after)

    models = tmp_path / "models"
    lines = log_lines(models)
    assert [int(m.group(1)) for m in lines] == [0, 12, 24]
    assert float(lines[-1].group(3)) < float(lines[0].group(3))  # test loss
    # level 5: 100 * MSE; PSNR from the MSE; no content term without VGG; no MS-SSIM at 2x2
    for m in lines:
        assert float(m.group(3)) == pytest.approx(100 * float(m.group(5)), rel=1e-3)
        assert float(m.group(6)) == pytest.approx(-10 * np.log10(float(m.group(5))), rel=1e-3)
        assert m.group(4) == "n/a" and m.group(7) is None
    # training value at step 12: mean of the losses of steps 1..12
    assert float(lines[1].group(2)) == pytest.approx(np.mean(step_losses[1:13]), rel=1e-3)

    for i in (0, 12, 24):
        prefix = checkpoints.checkpoint_prefix(str(models), 5, i)
        assert os.path.exists(prefix + ".index") and os.path.exists(prefix + ".train_state.index")
    assert last == checkpoints.checkpoint_prefix(str(models), 5, 24)
    assert not [n for n in os.listdir(models) if ".tmp" in n]

    # every checkpoint holds all 437 variables under the reference's keys, as the reference's Saver
    import tensorflow as tf

    keys = tf.train.load_checkpoint(last).get_variable_to_shape_map()
    assert set(keys) == {"generator/Variable"} | {f"generator/Variable_{n}" for n in range(1, 437)}

    # visual results: [prediction | target], 2 x 2 pixels each at level 5 with 32-pixel crops
    from PIL import Image

    for i in (0, 12, 24):
        for idx in range(4):
            image = Image.open(tmp_path / "results" / f"pynet_img_{idx}_level_5_iter_{i}.jpg")
            assert image.size == (4, 2) and image.mode == "RGB"

    # TensorBoard: the step losses, the test metrics and the images
    events = list((models / "tensorboard" / "level_5").glob("events.out.tfevents.*"))
    tags = {}
    for event in tf.compat.v1.train.summary_iterator(str(events[0])):
        for value in event.summary.value:
            tags.setdefault(value.tag, []).append((event.step, value))
    assert {"train/loss", "test/loss", "test/mse", "test/psnr", "visual/prediction_target"} <= set(tags)
    loss_values = [float(tf.make_ndarray(v.tensor)) for _, v in sorted(tags["train/loss"], key=lambda sv: sv[0])]
    np.testing.assert_allclose(loss_values, step_losses, rtol=1e-6)
    assert tags["train/loss"][0][1].metadata.plugin_data.plugin_name == "scalars"
    image_blobs = tf.make_ndarray(tags["visual/prediction_target"][0][1].tensor)
    assert len(image_blobs) == 2 + 4 and tf.io.decode_png(image_blobs[2]).shape == (2, 4, 3)


@pytest.mark.slow
def test_level_handover_loads_level5_weights(model, sample_dataset, tmp_path):
    args5 = make_args(sample_dataset, tmp_path, num_train_iters=1, eval_step=1)
    run(args5, model)
    trained = weights_of(model)

    # scramble the model, then set up level 4: it must come back to level 5's checkpoint
    rng = np.random.default_rng(0)
    model.set_weights([rng.normal(size=w.shape).astype(np.float32) for w in trained])
    args4 = make_args(sample_dataset, tmp_path, level=4, num_train_iters=0)
    job = trainer.Trainer(args4, model=model, out=lambda *a: None)
    assert job.start.kind == "handover"
    assert job.start.prefix == checkpoints.checkpoint_prefix(str(tmp_path / "models"), 5, 1)  # the latest
    for got, want in zip(weights_of(model), trained):
        np.testing.assert_array_equal(got, want)
    # a fresh Adam at each level, over the variables feeding output_l4 only (reference train_model.py line 97)
    assert int(job.optimizer.iterations.numpy()) == 0
    assert len(job.view.trainable_variables) == 104

    # restore_iter picks an older one
    model.set_weights([rng.normal(size=w.shape).astype(np.float32) for w in trained])
    job = trainer.Trainer(make_args(sample_dataset, tmp_path, level=4, restore_iter=0, num_train_iters=0),
                                  model=model,
                                  out=lambda *a: None)
    assert job.start.prefix == checkpoints.checkpoint_prefix(str(tmp_path / "models"), 5, 0)
    import tensorflow as tf

    reader = tf.train.load_checkpoint(job.start.prefix)
    first_kernel = reader.get_tensor("generator/Variable")  # conv_l1_d1/conv_3a W, [3, 3, 4, 32]
    np.testing.assert_array_equal(model.get_layer("conv_l1_d1").branches[0][0].kernel.numpy(), first_kernel)

    # the run itself: one step at level 4, checkpoint of level 4
    job.run()
    assert os.path.exists(checkpoints.checkpoint_prefix(str(tmp_path / "models"), 4, 0) + ".index")


@pytest.mark.slow
def test_level3_has_the_content_term(model, sample_dataset, tmp_path, fake_vgg):

    checkpoints.save_checkpoint(model, checkpoints.checkpoint_prefix(str(tmp_path / "models"), 4, 7))
    args = make_args(sample_dataset, tmp_path, level=3, num_train_iters=0, vgg_dir=fake_vgg)
    losses_seen = []
    job, _ = run(args, model, on_step=lambda i, loss: losses_seen.append(loss))
    assert job.start.prefix.endswith("pynet_level_4_iteration_7.ckpt")
    (line,) = log_lines(tmp_path / "models")
    content, mse = float(line.group(4)), float(line.group(5))
    assert content > 0
    # level 3: test loss = 100 * MSE + content (both averaged over the same single batch)
    assert float(line.group(3)) == pytest.approx(100 * mse + content, rel=1e-3)


@pytest.mark.slow
def test_vgg_dir_none_trains_without_the_content_term_and_says_so(model, sample_dataset, tmp_path):

    checkpoints.save_checkpoint(model, checkpoints.checkpoint_prefix(str(tmp_path / "models"), 4, 7))
    args = make_args(sample_dataset, tmp_path, level=3, num_train_iters=0, vgg_dir="none")
    printed = []
    job = trainer.Trainer(args, model=model, out=printed.append)
    job.run()
    assert any(str(p).startswith("WARNING: vgg_dir=none: level 3 trains WITHOUT the VGG-19 content loss")
               for p in printed)
    (line,) = log_lines(tmp_path / "models")
    assert line.group(4) == "n/a"
    assert float(line.group(3)) == pytest.approx(100 * float(line.group(5)), rel=1e-3)


@pytest.mark.slow
def test_mse_loss_trains_level0_without_vgg_and_says_so(model, sample_dataset, tmp_path):

    checkpoints.save_checkpoint(model, checkpoints.checkpoint_prefix(str(tmp_path / "models"), 1, 7))
    # the VGG file is absent, which would be an error with the reference's loss
    args = make_args(sample_dataset, tmp_path, level=0, num_train_iters=0, loss="mse", init="he",
                     vgg_dir=tmp_path / "absent.mat")
    printed = []
    trainer.Trainer(args, model=model, out=printed.append).run()
    assert "NOTE: loss=mse: level 0 trains on its MSE term alone, not the reference's loss" in printed
    assert "NOTE: init=he: the layers level 0 adds start from He-normal weights, not the reference's N(0, 0.01)" \
        in printed
    assert not any("WITHOUT the VGG-19" in str(p) for p in printed)
    (line,) = log_lines(tmp_path / "models")
    assert line.group(4) == "n/a"
    # test loss = 20 x MSE: no SSIM term
    assert float(line.group(3)) == pytest.approx(20 * float(line.group(5)), rel=1e-3)


def test_reference_options_print_no_notes():
    assert preflight.departures(train_model.parse_arguments(["level=0"])) == []
    # levels 5 and 4 are MSE alone in the reference too
    assert preflight.departures(train_model.parse_arguments(["level=5", "loss=mse"])) == []
    # a resumed level initialises nothing, nor one given all its weights by init_from
    he = train_model.parse_arguments(["level=2", "init=he"])
    assert len(preflight.departures(he)) == 1
    assert preflight.departures(he, "resume") == [] and preflight.departures(he, "init_from") == []


def test_preflight_knows_the_levels_with_the_content_term():
    import losses

    assert [preflight.uses_content(level) for level in range(6)] == [losses.uses_content(level) for level in range(6)]


# ---------------------------------------------------------------------------------------
# resume, interruption, NaN

@pytest.mark.slow
def test_resume_equals_uninterrupted_run(model, built_weights, sample_dataset, tmp_path):
    common = dict(num_train_iters=5, eval_step=3, batch_size=2)
    seen = []
    run(make_args(sample_dataset, tmp_path / "straight", **common), model,
        on_step=lambda i, loss: seen.append(loss))
    straight = weights_of(model)

    # the same run stopped after iteration 1 (as Ctrl-C would), then resumed from a clean model
    model.set_weights(built_weights)
    stop = trainer.StopRequest()
    seen_a = []

    def stop_after_1(i, loss):
        seen_a.append(loss)
        if i == 1:
            stop.request("test")

    with pytest.raises(trainer.TrainingStopped, match="after iteration 1"):
        run(make_args(sample_dataset, tmp_path / "split", **common), model, stop=stop, on_step=stop_after_1)
    models = tmp_path / "split" / "models"
    assert checkpoints.get_last_iter(5, str(models)) == 1
    assert resume.resumable_iterations(str(models), 5) == [0, 1]

    model.set_weights(built_weights)
    seen_b = []
    job, _ = run(make_args(sample_dataset, tmp_path / "split", resume="true", **common), model,
                     on_step=lambda i, loss: seen_b.append(loss))
    assert job.start.kind == "resume" and job.start.iteration == 1
    assert int(job.optimizer.iterations.numpy()) == 6  # Adam's step count went on from 2
    np.testing.assert_array_equal(seen_a + seen_b, seen)  # same batches, same losses
    for got, want in zip(weights_of(model), straight):
        np.testing.assert_array_equal(got, want)
    # the log goes on in the same file: lines of both parts
    assert [int(m.group(1)) for m in log_lines(models)] == [0, 3, 5]


def touch_checkpoint(models, level, iteration, state=True):
    prefix = checkpoints.checkpoint_prefix(str(models), level, iteration)
    for suffix in (".index", ".data-00000-of-00001") + ((".train_state.index",) if state else ()):
        Path(prefix + suffix).touch()
    return prefix


def test_start_points(tmp_path):
    """What a run starts from, decided from the files in models_dir alone."""
    models = tmp_path / "models"
    models.mkdir()
    args = lambda **kw: {"level": 5, "models_dir": str(models), "resume": False, "restore_iter": None, **kw}  # noqa
    notes = []
    assert resume.find_start(args(), log=notes.append).kind == "scratch"
    start = resume.find_start(args(resume=True), log=notes.append)
    assert start.kind == "scratch" and "starting level 5 from the beginning" in notes[-1]

    touch_checkpoint(models, 5, 0)
    touch_checkpoint(models, 5, 1000)
    touch_checkpoint(models, 5, 1500, state=False)  # a model checkpoint without training state
    touch_checkpoint(models, 4, 2000)
    assert resume.resumable_iterations(str(models), 5) == [0, 1000]
    start = resume.find_start(args(resume=True), log=notes.append)
    assert (start.kind, start.iteration) == ("resume", 1000)
    assert "iteration_1500.ckpt has no training state" in notes[-1]
    # level 4 resumes its own checkpoint; without resume it starts from level 5's latest
    assert resume.find_start(args(level=4, resume=True)).prefix.endswith("pynet_level_4_iteration_2000.ckpt")
    # starting level 4 afresh where level 4 of another run is: refused, unless overwrite=true
    with pytest.raises(cli.UserError, match="already holds level-4 checkpoints of an earlier run"):
        resume.find_start(args(level=4))
    start = resume.find_start(args(level=4, overwrite=True))
    assert (start.kind, start.prefix) == ("handover", checkpoints.checkpoint_prefix(str(models), 5, 1500))
    assert resume.find_start(args(level=4, restore_iter=0, overwrite=True)).prefix.endswith(
        "pynet_level_5_iteration_0.ckpt")
    assert resume.find_start(args(level=3)).prefix.endswith("pynet_level_4_iteration_2000.ckpt")
    with pytest.raises(cli.UserError, match="train level 3 first"):
        resume.find_start(args(level=2))


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(model, sample_dataset, tmp_path, monkeypatch):
    import tensorflow as tf

    import losses

    poison = tf.Variable(1.0)
    original = losses.level_loss_per_image

    def poisoned(*args, **kwargs):
        total, parts = original(*args, **kwargs)
        return total * poison, parts

    monkeypatch.setattr(losses, "level_loss_per_image", poisoned)
    args = make_args(sample_dataset, tmp_path, num_train_iters=20, eval_step=10)
    models = tmp_path / "models"
    digest = {}

    def on_step(i, loss):
        if i == 3:
            for name in set(os.listdir(models)) - {run_lock.LOCK_NAME}:  # the live run's, gone with it
                digest[name] = hashlib.sha256((models / name).read_bytes()).hexdigest()
            poison.assign(float("nan"))

    with pytest.raises(cli.UserError) as err:
        run(args, model, on_step=on_step)
    text = str(err.value)
    assert "nan" in text and "iteration 4" in text and "pynet_level_5_iteration_0.ckpt" in text
    assert "\n" not in text
    assert checkpoints.get_last_iter(5, str(models)) == 0
    for name, value in digest.items():  # the good checkpoint is untouched
        assert hashlib.sha256((models / name).read_bytes()).hexdigest() == value
    assert set(os.listdir(models)) == set(digest)


# ---------------------------------------------------------------------------------------
# gradient accumulation and strategies

def followed_by_instance_norm(model, path):
    """A conv bias right before instance norm: its gradient is zero in exact arithmetic, so in
    float32 it is rounding noise (of the order of 1e-4 of the largest gradient), which no two
    summation orders reproduce."""
    parts = path.split("/")
    if parts[-1] != "bias" or len(parts) < 3:
        return False
    return bool(getattr(model.get_layer(parts[0]), "instance_norm", False))


def assert_same_update(model, grads_a, grads_b, tolerance=1e-4):
    assert grads_a.keys() == grads_b.keys()
    top = max(np.abs(g).max() for g in grads_a.values())
    noise, compared = 0, 0
    for path, a in grads_a.items():
        b = grads_b[path]
        if followed_by_instance_norm(model, path):
            assert np.abs(a).max() < 1e-3 * top and np.abs(b).max() < 1e-3 * top, path
            noise += 1
            continue
        scale = max(np.abs(a).max(), np.abs(b).max())
        np.testing.assert_allclose(a, b, rtol=0, atol=tolerance * scale + 1e-8 * top, err_msg=path)
        compared += scale > 1e-6 * top
    assert compared > 25 and noise > 10, (compared, noise)  # level 5 has 62 trainable variables


def assert_same_losses(got, want):
    """Step losses of two runs that should be the same computation: the first (same weights,
    same samples) to float32 rounding, the second after one equal update; later ones drift a
    little, as Adam divides rounding-level gradients by their own size."""
    assert len(got) == len(want)
    assert got[0] == pytest.approx(want[0], rel=1e-5)
    assert got[1] == pytest.approx(want[1], rel=1e-4)
    np.testing.assert_allclose(got[2:], want[2:], rtol=1e-2)


@pytest.mark.slow
def test_accumulation_equals_one_big_batch_gradient(model, sample_dataset):
    import load_dataset

    pairs = [load_dataset.load_pair(sample_dataset, "train", i, 5, 32, k=i % 4, flip=i % 2, offset=(32, 64))
             for i in range(6)]
    raw, target = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
    big = captured_gradient(model, 5, [(raw, target)], accum_steps=1, batch_size=6)
    small = captured_gradient(model, 5, [(raw[j:j + 2], target[j:j + 2]) for j in (0, 2, 4)], accum_steps=3,
                              batch_size=6)
    assert_same_update(model, big, small)
    # and it is not the gradient of one micro-batch alone
    one = captured_gradient(model, 5, [(raw[:2], target[:2])], accum_steps=1, batch_size=2)
    assert max(np.abs(one[k] - big[k]).max() for k in big) > 1e-2 * max(np.abs(g).max() for g in big.values())


@pytest.mark.slow
def test_xla_step_equals_the_default_step(model, sample_dataset):
    """xla=true (jit_compile, meant for GPUs) computes the same update as the default kernels;
    checked on the CPU, with accumulation too, so the GPU path is correct by construction."""
    import load_dataset

    pairs = [load_dataset.load_pair(sample_dataset, "train", i, 5, 32, k=i % 4, flip=i % 2, offset=(32, 64))
             for i in range(4)]
    raw, target = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
    default = captured_gradient(model, 5, [(raw, target)], accum_steps=1, batch_size=4)
    xla = captured_gradient(model, 5, [(raw, target)], accum_steps=1, batch_size=4, xla=True)
    # XLA's CPU convolutions sum in another order than oneDNN's / Eigen's: 1e-3 of each
    # gradient's scale (seen: 2.3e-4 on 2 of 36864 weights of a layer before instance norm)
    assert_same_update(model, default, xla, tolerance=1e-3)
    xla_accumulated = captured_gradient(model, 5, [(raw[:2], target[:2]), (raw[2:], target[2:])], accum_steps=2,
                                        batch_size=4, xla=True)
    assert_same_update(model, default, xla_accumulated, tolerance=1e-3)


def test_adam_is_the_reference_adam():
    """build_optimizer's Adam (TensorFlow's fused ResourceApplyAdam) follows
    tf.train.AdamOptimizer's formula, computed here in float64 NumPy, in a compiled step with
    mixed precision's loss scaling around it too; its state is Keras' (m, v, iterations)."""
    import keras
    import tensorflow as tf

    rng = np.random.default_rng(3)
    start = rng.normal(size=(5, 7)).astype(np.float32)
    grads = [rng.normal(scale=10.0 ** -i, size=(5, 7)).astype(np.float32) for i in range(6)]
    lr, b1, b2, eps = 1e-2, 0.9, 0.999, 1e-8
    expected, m, v = start.astype(np.float64), 0.0, 0.0
    for t, g in enumerate(grads, 1):
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g.astype(np.float64) ** 2
        expected = expected - lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m / (np.sqrt(v) + eps)
    def adam_step(optimizer, weights, mixed):
        @tf.function
        def step(g):
            if mixed:  # the scaled gradient is unscaled before Adam sees it
                g = g * optimizer.scale_loss(tf.constant(1.0))
            optimizer.apply_gradients([(g, weights)])
        return step

    for mixed in (False, True):
        optimizer = steps.build_optimizer({"learning_rate": lr, "precision": "fp16" if mixed else "fp32"})
        weights = keras.Variable(start.copy())
        step = adam_step(optimizer, weights, mixed)
        for g in grads:
            step(tf.constant(g))
        np.testing.assert_allclose(weights.numpy(), expected, rtol=0, atol=2e-6)
        adam = steps.base_optimizer(optimizer)
        assert int(adam.iterations.numpy()) == len(grads)
        np.testing.assert_allclose(adam.variables[2].numpy(), m, atol=1e-6)  # [iterations, lr, m, v]


@pytest.mark.slow
def test_accumulation_run_matches_big_batch_run(model, built_weights, sample_dataset, tmp_path):
    """Whole runs with Adam: batch_size=4 in 2 micro-batches of 2 sees the same samples and
    gives the same losses as batch_size=4 at once."""
    seen_big, seen_acc = [], []
    run(make_args(sample_dataset, tmp_path / "big", batch_size=4, eval_batch_size=2, num_train_iters=1, eval_step=5),
        model,
        on_step=lambda i, loss: seen_big.append(loss))
    model.set_weights(built_weights)
    job, _ = run(make_args(sample_dataset, tmp_path / "acc", batch_size=4, accum_steps=2, num_train_iters=1,
                               eval_step=5), model, on_step=lambda i, loss: seen_acc.append(loss))
    assert job.args["eval_batch_size"] == 2
    assert int(job.optimizer.iterations.numpy()) == 2  # one Adam step per 2 micro-batches
    assert_same_losses(seen_acc, seen_big)


MIRRORED_SCRIPT = r"""
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import numpy as np
sys.path.insert(0, sys.argv[2])  # the tests' folder, for helpers
import cluster, load_dataset, train_model, trainer
from model import PyNET
from helpers import captured_gradient

data, out = sys.argv[1], sys.argv[3]
pairs = [load_dataset.load_pair(data, "train", i, 5, 32, k=i % 4, flip=i % 2, offset=(32, 64)) for i in range(4)]
raw, target = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
results = {}
for name in ("one", "mirrored"):
    strategy = cluster.make_strategy(name, "/cpu:0,/cpu:1" if name == "mirrored" else "")
    with strategy.scope():
        model = PyNET()
    batches = [(raw, target)]
    if name == "mirrored":
        ds = tf.data.Dataset.from_tensors((raw, target))
        batches = list(strategy.experimental_distribute_dataset(ds))
    grads = captured_gradient(model, 5, batches, 1, 4, strategy)
    np.savez(f"{out}/{name}_grads.npz", **{k.replace("/", "|"): v for k, v in grads.items()})
    # a whole run with Adam through the command-line path (2 steps, global batch 4)
    seen = []
    args = train_model.parse_arguments([f"dataset_dir={data}", "level=5", "patch_size=32", "batch_size=4",
        "eval_batch_size=2", "num_train_iters=1", "eval_step=5", "progress=false", "tensorboard=false",
        f"strategy={name}",
        f"models_dir={out}/{name}_models", f"results_dir={out}/{name}_results"]
        + (["devices=/cpu:0,/cpu:1"] if name == "mirrored" else []))
    job = trainer.Trainer(args, strategy, model=model, on_step=lambda i, loss: seen.append(loss))
    job.run()
    results[name] = {"replicas": strategy.num_replicas_in_sync, "losses": seen}
json.dump(results, open(f"{out}/result.json", "w"))
"""


@pytest.mark.slow
def test_mirrored_two_cpus_equals_one_device(model, sample_dataset, tmp_path):
    script = tmp_path / "mirrored.py"
    script.write_text(MIRRORED_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), sample_dataset, str(Path(__file__).parent), str(tmp_path)],
                          env=ENV, cwd=str(ROOT), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "result.json").read_text())
    assert results["one"]["replicas"] == 1 and results["mirrored"]["replicas"] == 2
    one = np.load(tmp_path / "one_grads.npz")
    mirrored = np.load(tmp_path / "mirrored_grads.npz")
    assert_same_update(model, {k.replace("|", "/"): one[k] for k in one.files},
                       {k.replace("|", "/"): mirrored[k] for k in mirrored.files})
    assert_same_losses(results["mirrored"]["losses"], results["one"]["losses"])
    assert len(results["one"]["losses"]) == 2


@pytest.mark.slow
def test_mixed_precision_keeps_float32_variables_and_loss(sample_dataset, tmp_path):
    proc = subprocess.run(
        [sys.executable, "train_model.py", "level=5", f"dataset_dir={sample_dataset}", "patch_size=32",
         "batch_size=2", "num_train_iters=19", "eval_step=19", "mixed_precision=true", "progress=false",
         f"models_dir={tmp_path / 'models'}", f"results_dir={tmp_path / 'results'}"],
        env=ENV, cwd=str(ROOT), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import tensorflow as tf

    # The dynamic loss scale starts at 2^15 and halves on every overflow: here the first ~12
    # steps are skipped before updates go through, hence 20 steps.
    reader = tf.train.load_checkpoint(checkpoints.checkpoint_prefix(str(tmp_path / "models"), 5, 19))
    assert set(reader.get_variable_to_dtype_map().values()) == {tf.float32}
    first = reader.get_tensor("generator/Variable_28")  # conv_l5_d1/conv_3a W, trained at level 5
    initial = tf.train.load_checkpoint(checkpoints.checkpoint_prefix(str(tmp_path / "models"), 5, 0))
    assert np.abs(first - initial.get_tensor("generator/Variable_28")).max() > 0  # updates were applied
    lines = log_lines(tmp_path / "models")
    assert all(np.isfinite(float(m.group(2))) and np.isfinite(float(m.group(3))) for m in lines)


# ---------------------------------------------------------------------------------------
# the command line: level 5 then level 4, SIGTERM, clean errors

@pytest.mark.slow
def test_cli_level5_sigterm_then_level4(sample_dataset, tmp_path):
    """`python train_model.py level=5`, stopped by SIGTERM (checkpoint written), then `level=4`
    starting from it."""
    common = [f"dataset_dir={sample_dataset}", "patch_size=32", "batch_size=2", f"models_dir={tmp_path / 'models'}",
              f"results_dir={tmp_path / 'results'}", "progress=false"]
    proc = subprocess.Popen([sys.executable, "train_model.py", "level=5", "num_train_iters=100000", "eval_step=100000"]
                            + common, env=ENV, cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        for line in proc.stdout:  # wait for the first evaluation (iteration 0)
            if line.startswith("step 0 |"):
                break
        # then for its checkpoint (the index is renamed last): a signal before that stops at
        # iteration 0, whose checkpoint the evaluation writes anyway, which would prove nothing
        index = checkpoints.checkpoint_prefix(str(tmp_path / "models"), 5, 0) + ".index"
        deadline = time.monotonic() + 300
        while not os.path.exists(index) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    last = checkpoints.get_last_iter(5, str(tmp_path / "models"))
    assert last is not None and last >= 1
    assert f"stopped by SIGTERM after iteration {last}" in err and "resume=true" in err
    assert resume.resumable_iterations(str(tmp_path / "models"), 5)[-1] == last

    proc = subprocess.run([sys.executable, "train_model.py", "level=4", "num_train_iters=1", "eval_step=1"] + common,
                          env=ENV, cwd=str(ROOT), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"from {checkpoints.checkpoint_prefix(str(tmp_path / 'models'), 5, last)}" in proc.stdout
    assert "parameters:" in proc.stdout and "synthetic sample" in proc.stdout
    assert checkpoints.get_last_iter(4, str(tmp_path / "models")) == 1


def cli_error(argv, capsys):
    code = cli.run(train_model.main, [str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def test_missing_vgg_file_is_a_clean_error(sample_dataset, tmp_path, capsys):
    missing = tmp_path / "vgg" / "imagenet-vgg-verydeep-19.mat"
    code, message = cli_error(["level=3", f"dataset_dir={sample_dataset}", f"vgg_dir={missing}",
                               f"models_dir={tmp_path}"], capsys)
    assert code == 1
    assert message.startswith("error: ") and str(missing) in message and "levels 3, 2, 1 and 0" in message


def test_empty_dataset_is_a_clean_error(tmp_path, capsys):
    for split in ("train", "test"):
        for sub in ("huawei_raw", "canon"):
            (tmp_path / "data" / split / sub).mkdir(parents=True)
    code, message = cli_error(["level=5", f"dataset_dir={tmp_path / 'data'}", f"models_dir={tmp_path}"], capsys)
    assert code == 1 and message.startswith("error: ") and "no patches found" in message
    code, message = cli_error(["level=5", f"dataset_dir={tmp_path / 'nowhere'}", f"models_dir={tmp_path}"], capsys)
    assert code == 1 and "not found" in message


def test_batch_larger_than_test_split_is_a_clean_error(sample_dataset, tmp_path, capsys):
    code, message = cli_error(["level=5", f"dataset_dir={sample_dataset}", "batch_size=50", "patch_size=32",
                               f"models_dir={tmp_path}"], capsys)
    assert code == 1
    assert "eval_batch_size=50 is larger than the 3 test patches" in message


def test_missing_upper_level_checkpoint_is_a_clean_error(sample_dataset, tmp_path, capsys):
    code, message = cli_error(["level=4", f"dataset_dir={sample_dataset}", f"models_dir={tmp_path}"], capsys)
    assert code == 1 and "train level 5 first" in message and "level=5" in message
    code, message = cli_error(["level=4", f"dataset_dir={sample_dataset}", "restore_iter=7",
                               f"models_dir={tmp_path}"], capsys)
    assert code == 1 and "pynet_level_5_iteration_7.ckpt" in message


@pytest.mark.parametrize("argv, text", [
    (["batch_size=10", "accum_steps=3"], "not divisible by accum_steps=3"),
    (["resume=true", "restore_iter=3"], "give one or the other"),
    (["patch_size=40"], "a multiple of 16"),
    (["strategy=bogus"], "expected one of auto, one, mirrored, multi_worker"),
    (["devices=/cpu:0"], "devices= is for strategy=mirrored"),
    (["init=glorot"], "expected one of reference, he"),
    (["loss=ssim"], "expected one of reference, mse"),
])
def test_bad_arguments(argv, text, capsys):
    code, message = cli_error(argv, capsys)
    assert code == 2 and text in message


def test_per_level_defaults_are_the_reference_s():
    for level, iters in zip(range(6), (100000, 35000, 20000, 20000, 5000, 5000)):
        args = train_model.parse_arguments([f"level={level}"])
        assert args["num_train_iters"] == iters
        assert (args["batch_size"], args["train_size"], args["learning_rate"], args["eval_step"]) == \
            (50, 5000, 5e-5, 1000)
        assert args["dataset_dir"] == "raw_images/" and args["patch_size"] == 224
        assert args["vgg_dir"] == "vgg_pretrained/imagenet-vgg-verydeep-19.mat"
        assert (args["init"], args["loss"]) == ("reference", "reference")


def test_log_line_format():
    line = trainer.format_log(1000, 0.123456, {"loss": 1.5, "content": 2.25, "mse": 0.0123456, "psnr": 19.0853,
                                                   "ms_ssim": 0.876543})
    assert line == ("step 1000 | training: 0.1235, test: 1.5 | content: 2.25, mse: 0.01235, psnr: 19.09, "
                    "ms-ssim: 0.8765")


def test_tf_config_chief(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert cluster_module.is_chief() and cluster_module.task_count() == 0
    cluster = {"worker": ["localhost:1", "localhost:2"]}
    monkeypatch.setenv("TF_CONFIG", f'{{"cluster": {cluster!r}, "task": {{"type": "worker", "index": 1}}}}'
                       .replace("'", '"'))
    assert not cluster_module.is_chief() and cluster_module.task_count() == 2
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 0}}')
    assert cluster_module.is_chief()
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"chief": ["c:1"], "worker": ["a:1"]}, '
                                    '"task": {"type": "worker", "index": 0}}')
    assert not cluster_module.is_chief()


def free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_multi_worker_two_processes_equal_one_device(model, sample_dataset, tmp_path):
    """Two workers on this machine (TF_CONFIG, MultiWorkerMirroredStrategy), global batch 2
    (one image each), against one device with batch 2: same step losses; only worker 0 writes."""
    cluster = [f"localhost:{free_port()}", f"localhost:{free_port()}"]
    common = [f"dataset_dir={sample_dataset}", "level=5", "patch_size=32", "batch_size=2", "num_train_iters=1",
              "eval_step=1", "progress=false", "tensorboard=false"]
    procs = []
    for index in range(2):
        config = {"cluster": {"worker": cluster}, "task": {"type": "worker", "index": index}}
        env = {**ENV, "TF_CONFIG": json.dumps(config)}
        procs.append(subprocess.Popen(
            [sys.executable, "train_model.py", "strategy=auto", f"models_dir={tmp_path / f'w{index}'}",
             f"results_dir={tmp_path / f'r{index}'}"] + common,
            env=env, cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=500))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
        assert "MultiWorkerMirroredStrategy" in out or "CollectiveAllReduceStrategy" in out
        assert "2 replica(s)" in out
    assert not (tmp_path / "w1").exists() and not (tmp_path / "r1").exists()  # worker 1 writes nothing
    lines = log_lines(tmp_path / "w0")
    assert checkpoints.get_last_iter(5, str(tmp_path / "w0")) == 1

    seen = []
    run(make_args(sample_dataset, tmp_path / "single", num_train_iters=1, eval_step=1), model,
        on_step=lambda i, loss: seen.append(loss))
    # the logged training value of step 0 is its loss, that of step 1 the mean of step 1 alone
    assert float(lines[0].group(2)) == pytest.approx(seen[0], rel=1e-3)  # %.4g in the log
    assert float(lines[1].group(2)) == pytest.approx(seen[1], rel=1e-3)
