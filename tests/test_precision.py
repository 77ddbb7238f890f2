"""precision=bf16: bfloat16 compute with float32 variables, checked on any CPU.

Time is not asserted here (benchmarks/README.md has the speed, measured where bfloat16 units
exist); on a CPU without them the bfloat16 path is emulated, so the sizes are small."""

import numpy as np
import pytest

import checkpoints
import cli
import images
import render
import runtime
import test_model
from helpers import assign_sane_weights, natural_mosaic
from model import PyNET, level_model, precision_of

# one worker builds this module's shared fixtures (pytest-xdist --dist loadgroup)
pytestmark = pytest.mark.xdist_group("precision")


def psnr(a, b):
    return 10 * np.log10(1.0 / np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))


@pytest.fixture(scope="module")
def pair(full_model):
    """The session's float32 PyNET with sane random weights, and a bfloat16 build holding the
    same weights (the float32 ones are put back at the end)."""
    saved = [v.numpy() for v in full_model.weights]
    assign_sane_weights(full_model, np.random.default_rng(3))
    bf16 = PyNET(precision="bf16")
    bf16.set_weights(full_model.get_weights())
    yield full_model, bf16
    full_model.set_weights(saved)


# ---------------------------------------------------------------------------------------
# the model

def test_bf16_computes_in_bfloat16_with_float32_variables_and_heads(pair):
    fp32, bf16 = pair
    assert precision_of(bf16) == "bf16" and precision_of(fp32) == "fp32"
    assert {v.dtype for v in bf16.weights} == {"float32"}
    assert len(bf16.weights) == len(fp32.weights)
    for layer in bf16.layers:
        if hasattr(layer, "conv_layers"):
            assert {c.compute_dtype for c in layer.conv_layers()} == {"bfloat16"}, layer.name
        elif layer.name.endswith("_out"):
            assert layer.compute_dtype == "float32", layer.name
        elif layer.weights or layer.name.startswith("pool"):
            assert layer.compute_dtype == "bfloat16", layer.name


@pytest.mark.parametrize("level", [5, 0])
def test_a_bf16_forward_is_float32_in_range_and_close_to_float32(pair, level):
    fp32, bf16 = pair
    x = np.random.default_rng(level).random((1, 32, 32, 4)).astype(np.float32) * 1023 / 1020
    want = level_model(fp32, level)(x).numpy()
    got = level_model(bf16, level)(x)
    assert got.dtype == "float32" and got.shape == want.shape
    got = got.numpy()
    assert -0.08 <= got.min() and got.max() <= 1.08
    # bfloat16 keeps 8 bits: the output differs from float32's, but not by more than these random
    # weights amplify its rounding (a float32 run through the bf16 model would be exact)
    assert 0 < np.abs(got - want).max() and psnr(got, want) > 25


def test_instance_norm_statistics_are_float32_in_bf16(pair):
    """Keras' moments of a bfloat16 map clip to float16's range: a map of large values would be
    normalised wrongly; the float32 statistics keep it right."""
    import tensorflow as tf

    from model import instance_norm

    x = tf.constant(np.random.default_rng(0).normal(3000.0, 800.0, (1, 8, 8, 2)), tf.bfloat16)
    y = instance_norm(x, tf.zeros(2), tf.ones(2)).numpy().astype(np.float64)
    assert y.dtype == np.float64 and x.dtype == tf.bfloat16
    xf = x.numpy().astype(np.float64)
    expected = (xf - xf.mean(axis=(1, 2), keepdims=True)) / np.sqrt(xf.var(axis=(1, 2), keepdims=True) + 1e-3)
    np.testing.assert_allclose(y, expected, atol=0.02)


def test_strips_in_bf16_equal_the_whole_bf16_frame_within_its_rounding(pair):
    fp32, bf16 = pair
    raw = natural_mosaic(96, 128)
    whole_fp32 = render.render(fp32, raw, 0, tile_size=0)
    whole = render.render(bf16, raw, 0, tile_size=0)
    strips = render.render(bf16, raw, 0, tile_size=16)
    assert strips.dtype == np.float32 and strips.shape == whole.shape == (96, 128, 3)
    # the strips' rounding (another order of sums, the normalisation folded differently) is of
    # the size of bfloat16's own, measured against float32 on the same frame
    assert psnr(strips, whole) > min(psnr(whole, whole_fp32), 40) - 3


def test_a_bf16_training_run_writes_a_float32_checkpoint_that_loads_in_fp32_and_back(pair, sample_dataset, tmp_path):
    import train_model
    import trainer

    fp32, bf16 = pair
    saved = [v.numpy() for v in bf16.weights]
    args = train_model.parse_arguments([f"dataset_dir={sample_dataset}", "level=5", "patch_size=32", "batch_size=2",
                                        "num_train_iters=2", "eval_step=2", "precision=bf16", "force_bf16=true",
                                        f"models_dir={tmp_path / 'models'}", f"results_dir={tmp_path / 'results'}",
                                        "progress=false", "tensorboard=false"])
    seen = []
    trainer.Trainer(args, model=bf16, out=lambda *a: None, on_step=lambda i, loss: seen.append(loss)).run()
    assert len(seen) == 3 and np.all(np.isfinite(seen))
    prefix = checkpoints.checkpoint_prefix(str(tmp_path / "models"), 5, 2)
    fresh = PyNET(level=5)  # float32
    checkpoints.load_checkpoint(fresh, prefix)
    by_name = {v.path: v.numpy() for v in bf16.weights}
    for var in fresh.weights:
        assert var.dtype == "float32"
        np.testing.assert_array_equal(var.numpy(), by_name[var.path])
    changed = [v.path for v, before in zip(bf16.weights, saved) if not np.array_equal(v.numpy(), before)]
    assert changed  # the run trained
    back = str(tmp_path / "fp32" / "pynet_level_0_iteration_1.ckpt")
    checkpoints.save_checkpoint(fp32, back)  # and a float32 checkpoint into the bf16 build
    checkpoints.load_checkpoint(bf16, back)
    for a, b in zip(bf16.weights, fp32.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_a_model_of_another_precision_is_refused_by_the_trainer(pair, sample_dataset, tmp_path):
    import train_model
    import trainer

    fp32, _ = pair
    args = train_model.parse_arguments([f"dataset_dir={sample_dataset}", "level=5", "precision=bf16", "batch_size=2",
                                        f"models_dir={tmp_path / 'models'}", f"results_dir={tmp_path / 'r'}"])
    with pytest.raises(ValueError, match="computes in fp32, not bf16"):
        trainer.Trainer(args, model=fp32, out=lambda *a: None)


def test_mixed_precision_is_the_earlier_spelling_of_fp16():
    import train_model

    assert train_model.parse_arguments(["mixed_precision=true"])["precision"] == "fp16"
    assert train_model.parse_arguments(["mixed_precision=true", "precision=fp16"])["precision"] == "fp16"
    with pytest.raises(cli.UsageError, match="mixed_precision=true is precision=fp16, not precision=bf16"):
        train_model.parse_arguments(["mixed_precision=true", "precision=bf16"])


def test_a_bf16_step_lowers_the_loss_with_float32_gradients(pair):
    import tensorflow as tf

    from adam import reference_adam

    _, bf16 = pair
    view = level_model(bf16, 5)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.random((2, 32, 32, 4)), tf.float32)
    target = tf.constant(rng.random((2, 2, 2, 3)), tf.float32)
    adam = reference_adam(learning_rate=1e-4)
    before = [v.numpy() for v in view.trainable_variables]
    losses = []
    for _ in range(4):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(tf.cast(view(x, training=True), tf.float32) - target))
        grads = tape.gradient(loss, view.trainable_variables)
        # the biases before instance norm are left out in bfloat16 (it removes them exactly)
        unused = [v.path for v, g in zip(view.trainable_variables, grads) if g is None]
        assert unused and all(path.endswith("bias") for path in unused)
        grads = [tf.zeros_like(v) if g is None else g for v, g in zip(view.trainable_variables, grads)]
        assert {g.dtype for g in grads} == {tf.float32}
        adam.apply_gradients(zip(grads, view.trainable_variables))
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    assert all(v.dtype == "float32" for v in view.trainable_variables)
    for var, value in zip(view.trainable_variables, before):  # put the pair's weights back
        var.assign(value)


# ---------------------------------------------------------------------------------------
# the machine: bfloat16 units, the hint and the refusal

SPR = {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16",
       "amx_int8", "avx2", "fma"}
ZEN4 = SPR - {"amx_tile", "amx_bf16", "amx_int8"}


@pytest.mark.parametrize("flags, cap, units", [
    (SPR, "", "AMX"), (SPR, "AVX512_CORE_BF16", "AVX512-BF16"), (SPR, "avx512_core_amx", "AMX"),
    (SPR, "AVX512_CORE_VNNI", ""), (SPR, "AVX2", ""), (ZEN4, "", "AVX512-BF16"), (ZEN4, "AVX512_CORE", ""),
    (ZEN4 - {"avx512_bf16"}, "", ""), ({"avx2", "fma", "avx_ne_convert", "avx_vnni"}, "", "")])
def test_bf16_units_from_the_cpu_flags_and_onednns_cap(flags, cap, units):
    assert runtime.bf16_units(flags, cap) == units


def test_the_precision_lines():
    with pytest.raises(cli.UsageError, match=r"^precision=bf16: this CPU has no bfloat16 units .* force_bf16=true"):
        runtime.precision_note("bf16", units="")
    assert "emulated" in runtime.precision_note("bf16", force_bf16=True, units="")
    assert runtime.precision_note("bf16", units="AMX") is None
    assert runtime.precision_note("fp32", units="AMX") == ("note: this CPU has bfloat16 units (AMX): "
                                                          "precision=bf16 would be faster (README, 'Speed')")
    assert runtime.precision_note("fp32", units="") is None
    assert runtime.precision_note("bf16", units="", gpus=1) is None  # GPUs decide for themselves


def test_test_model_refuses_bf16_without_units_and_renders_it_when_forced(pair, tmp_path, monkeypatch, capsys):
    fp32, bf16 = pair
    monkeypatch.setattr(runtime, "bf16_units", lambda *a, **k: "")
    folder = tmp_path / "models"
    checkpoints.save_checkpoint(fp32, str(folder / "pynet_level_0_iteration_3.ckpt"))
    images.write_png(str(tmp_path / "shot.png"), natural_mosaic(64, 96))
    common = ["level=0", f"models_dir={folder}", f"input={tmp_path / 'shot.png'}", f"output_dir={tmp_path / 'out'}",
              "precision=bf16"]
    assert cli.run(test_model.main, common) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: precision=bf16: this CPU has no bfloat16 units")
    assert not (tmp_path / "out").exists()
    loaded = []
    monkeypatch.setattr(checkpoints, "load_model", lambda *args: loaded.append(args) or bf16)  # built once
    assert cli.run(test_model.main, common + ["force_bf16=true"]) == 0
    assert loaded == [(0, str(folder / "pynet_level_0_iteration_3.ckpt"), "bf16")]
    from PIL import Image

    with Image.open(tmp_path / "out" / "shot_level_0_iteration_3.png") as picture:
        got = np.asarray(picture)
    expected = images.to_uint(render.render(bf16, natural_mosaic(64, 96), 0))
    np.testing.assert_array_equal(got, expected)


def test_a_bf16_saved_model_gives_test_models_bf16_pictures(pair, tmp_path):
    import deployed
    import export_model

    _, bf16 = pair
    export_model.export(bf16, 0, 3, "saved_model", str(tmp_path / "sm"))
    model = deployed.load(str(tmp_path / "sm"))
    for height, width in ((64, 96), (70, 98)):
        mosaic = natural_mosaic(height, width)
        picture = model.picture(mosaic)
        expected = render.render(bf16, mosaic, 0)
        np.testing.assert_array_equal(images.to_uint(picture), images.to_uint(expected))
