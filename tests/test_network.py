"""model.py: the graph, its variables, and TF1 checkpoints."""

import numpy as np
import pytest
import tensorflow as tf
from scipy import signal

from checkpoints import load_checkpoint, save_checkpoint, tf1_variables
from cli import UserError
from helpers import write_tf1_checkpoint
from model import (
    PARAMETER_COUNT,
    ConvLayer,
    MultiConvBlock,
    OutputHead,
    PyNET,
    UpConv,
    as_list,
    copy_weights,
    level_model,
)

ROLE_OF = {"W": "W", "b": "b", "IN shift": "IN_shift(beta)", "IN scale": "IN_scale(gamma)"}


def test_parameter_count(full_model):
    assert full_model.count_params() == 47_548_170 == PARAMETER_COUNT


def test_output_shapes_for_a_64x96_input(full_model):
    outputs = full_model(np.zeros((2, 64, 96, 4), np.float32))
    assert len(outputs) == 6
    for level, output in enumerate(outputs):
        assert tuple(output.shape) == (2, 128 // 2 ** level, 192 // 2 ** level, 3)


def test_output_range_is_the_tanh_head(full_model):
    output = full_model(np.random.default_rng(0).uniform(0, 1, (1, 32, 32, 4)).astype(np.float32))[0].numpy()
    assert output.min() >= -0.08 and output.max() <= 1.08


def split_label(label):
    """'conv_l2_d1/conv_3a IN shift' -> ('conv_l2_d1/conv_3a', 'IN shift')."""
    for role in ("IN shift", "IN scale", "W", "b"):
        if label.endswith(" " + role):
            return label[: -len(role) - 1], role
    raise AssertionError(label)


def test_variables_follow_the_reference_order(full_model, reference_variables):
    ours = tf1_variables(full_model)
    assert len(ours) == len(reference_variables) == 437
    for (key, var, label), (ref_key, ref_shape, ref_layer, ref_role) in zip(ours, reference_variables):
        layer, role = split_label(label)
        assert key == ref_key
        assert list(var.shape) == ref_shape, key
        assert layer == ref_layer.replace("(inner)", ""), key
        assert ref_role.startswith(ROLE_OF[role]), key


# Variables and parameters feeding each level's output: those the reference's Adam (train_model.py line 97,
# over every "generator" variable) actually updates at that level.
TRAINED_PER_LEVEL = {5: (62, 18_895_171), 4: (104, 28_333_123), 3: (178, 36_348_355),
                     2: (316, 43_201_667), 1: (426, 47_519_715), 0: (427, 47_521_371)}


@pytest.mark.parametrize("level", range(6))
def test_level_view_trains_what_the_reference_trains(full_model, level):
    view = level_model(full_model, level)
    variables = view.trainable_variables
    assert (len(variables), sum(int(np.prod(v.shape)) for v in variables)) == TRAINED_PER_LEVEL[level]
    full_ids = {id(v) for v in full_model.weights}
    assert all(id(v) in full_ids for v in variables)  # shared, not copied


@pytest.mark.slow
@pytest.mark.parametrize("level", [5, 2])
def test_partial_build_equals_the_full_model(model, level):
    full = model
    rng = np.random.default_rng(level)
    for var in full.weights:
        var.assign(rng.normal(0, 0.05, var.shape).astype(np.float32))
    partial = PyNET(level=level)
    assert {k for k, _, _ in tf1_variables(partial)} <= {k for k, _, _ in tf1_variables(full)}
    copy_weights(full, partial)
    x = rng.uniform(0, 1, (1, 64, 64, 4)).astype(np.float32)
    expected = full(x)[level:]
    got = as_list(partial(x))
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g.numpy(), e.numpy(), atol=1e-6)


# ---------------------------------------------------------------------------------------
# the primitives against NumPy

def np_conv_same(x, kernel, bias):
    """Zero-padded 'same' cross-correlation of one HxWxCin image, kernel [k, k, Cin, Cout]."""
    k = kernel.shape[0]
    pad = np.pad(x, ((k // 2, k // 2), (k // 2, k // 2), (0, 0)))
    out = np.zeros(x.shape[:2] + (kernel.shape[3],))
    for o in range(kernel.shape[3]):
        for c in range(kernel.shape[2]):
            out[..., o] += signal.correlate2d(pad[..., c], kernel[..., c, o], mode="valid")
    return out + bias


def np_instance_norm(x, shift, scale):
    mean = x.mean(axis=(0, 1))
    var = ((x - mean) ** 2).mean(axis=(0, 1))
    return scale * (x - mean) / np.sqrt(var + 1e-3) + shift


def np_lrelu(x):
    return np.maximum(0.2 * x, x)


def randomise(layer, rng):
    for var in layer.weights:
        var.assign(rng.normal(0.2, 0.3, var.shape).astype(np.float32))


def test_he_init_scales_hidden_kernels_by_fan_in_and_keeps_the_heads():
    he, reference = PyNET(level=5, init="he"), PyNET(level=5)
    assert PyNET(level=5).get_weights()[0].std() == pytest.approx(reference.get_weights()[0].std())  # reset after
    checked = 0
    for a, b in zip(he.weights, reference.weights):
        value = np.asarray(a)
        if a.path.startswith("conv_l5_out"):  # the output head keeps the reference's weights
            np.testing.assert_array_equal(value, np.asarray(b))
        elif a.path.endswith("bias"):
            assert not value.any()
        elif a.path.endswith("kernel"):
            # He-normal: standard deviation sqrt(2 / fan_in), fan_in = k * k * the kernel's input axis
            want = np.sqrt(2.0 / (value.shape[0] * value.shape[1] * value.shape[2]))
            assert value.std() == pytest.approx(want, rel=0.1), a.path
            assert abs(value.mean()) < 0.1 * want
            checked += 1
    assert checked == 16  # the encoder's and level 5's hidden kernels
    # seeded as the reference's: weights of one shape start equal
    d2, d3 = (next(w for w in he.weights if w.path == f"conv_l5_d{x}/conv_3a/kernel") for x in "23")
    np.testing.assert_array_equal(np.asarray(d2), np.asarray(d3))
    with pytest.raises(ValueError, match="init must be one of"):
        PyNET(level=5, init="glorot")


@pytest.mark.parametrize("instance_norm", [True, False])
def test_multi_conv_block_equals_numpy(instance_norm):
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (2, 12, 10, 3)).astype(np.float32)
    block = MultiConvBlock(5, 4, instance_norm, name="conv_test")
    block(x)
    randomise(block, rng)
    got = block(x).numpy()
    for n in range(2):
        branches = []
        for first, second in block.branches:
            h = x[n].astype(np.float64)
            for conv in (first, second):
                h = np_conv_same(h, conv.kernel.numpy(), conv.bias.numpy())
                if instance_norm:
                    h = np_instance_norm(h, conv.shift.numpy(), conv.scale.numpy())
                h = np_lrelu(h)
            branches.append(h)
        np.testing.assert_allclose(got[n], np.concatenate(branches, axis=-1), rtol=1e-4, atol=1e-4)
    assert got.shape == (2, 12, 10, 8)


def test_instance_norm_is_per_sample_and_channel_with_epsilon_inside_the_root():
    rng = np.random.default_rng(2)
    # small variance, so an epsilon outside the root or a different epsilon would show
    x = rng.normal(3, 0.03, (2, 8, 8, 3)).astype(np.float32)
    layer = ConvLayer(3, 1, instance_norm=True, relu=False)
    layer(x)
    layer.kernel.assign(np.eye(3, dtype=np.float32)[None, None])
    layer.bias.assign(np.zeros(3, np.float32))
    layer.shift.assign([0.1, -0.2, 0.3])
    layer.scale.assign([1.5, 0.5, 2.0])
    got = layer(x).numpy()
    for n in range(2):
        np.testing.assert_allclose(got[n], np_instance_norm(x[n].astype(np.float64), layer.shift.numpy(),
                                                            layer.scale.numpy()), rtol=1e-4, atol=1e-4)


def test_transposed_conv_equals_numpy():
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (1, 5, 7, 3)).astype(np.float32)
    layer = UpConv(2)
    layer(x)
    randomise(layer, rng)
    kernel = layer.kernel.numpy()  # [3, 3, out, in]
    # stride-2 'same' transposed conv: scatter each input pixel's kernel into a 2x-larger canvas;
    # TF's SAME for even output sizes puts the kernel centre at 2*i (pad_before = 0 on the top/left
    # of the full output once the total padding of 1 is split as 0 before, 1 after).
    full = np.zeros((2 * 5 + 1, 2 * 7 + 1, 2))
    for i in range(5):
        for j in range(7):
            full[2 * i:2 * i + 3, 2 * j:2 * j + 3] += np.einsum("abOI,I->abO", kernel, x[0, i, j])
    expected = np_lrelu(full[:10, :14])
    np.testing.assert_allclose(layer(x).numpy()[0], expected, rtol=1e-5, atol=1e-5)


def test_output_head_equals_numpy():
    rng = np.random.default_rng(4)
    x = rng.normal(0, 1, (1, 6, 6, 5)).astype(np.float32)
    head = OutputHead()
    head(x)
    randomise(head, rng)
    expected = np.tanh(np_conv_same(x[0].astype(np.float64), head.kernel.numpy(), head.bias.numpy())) * 0.58 + 0.5
    np.testing.assert_allclose(head(x).numpy()[0], expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------
# checkpoints

def random_reference_arrays(reference_variables, seed=0):
    rng = np.random.default_rng(seed)
    return {key: rng.normal(0, 0.02, shape).astype(np.float32) for key, shape, *_ in reference_variables}


@pytest.mark.slow
def test_tf1_checkpoint_loads_by_position(model, reference_variables, tmp_path):
    arrays = random_reference_arrays(reference_variables)
    prefix = write_tf1_checkpoint(str(tmp_path / "pynet_level_0.ckpt"), arrays)
    load_checkpoint(model, prefix)
    by_name = {}
    for layer in model.layers:
        for var in layer.weights:
            by_name[var.path] = var.numpy()
    for key, _, layer, role in reference_variables:
        base = layer.replace("(inner)", "")
        leaf = {"W": "kernel", "b": "bias", "IN_shift(beta)": "shift", "IN_scale(gamma)": "scale"}[role.split(" ")[0]]
        path = f"{base}/{leaf}"
        np.testing.assert_array_equal(by_name[path], arrays[key], err_msg=key)


@pytest.mark.slow
def test_checkpoint_errors_name_key_layer_and_shapes(full_model, reference_variables, tmp_path):
    arrays = random_reference_arrays(reference_variables)
    arrays["generator/Variable_6"] = np.zeros([16], np.float32)
    prefix = write_tf1_checkpoint(str(tmp_path / "bad_shape.ckpt"), arrays)
    with pytest.raises(UserError, match=r"generator/Variable_6 \(conv_l2_d1/conv_3a IN shift\) has shape \[16\], "
                                        r"expected \[64\]"):
        load_checkpoint(full_model, prefix)

    del arrays["generator/Variable_436"]
    arrays["generator/Variable_6"] = np.zeros([64], np.float32)
    prefix = write_tf1_checkpoint(str(tmp_path / "missing.ckpt"), arrays)
    before = full_model.weights[0].numpy().copy()
    with pytest.raises(UserError, match=r"generator/Variable_436 \(conv_l0_out b, shape \[3\]\) is missing"):
        load_checkpoint(full_model, prefix)
    np.testing.assert_array_equal(full_model.weights[0].numpy(), before)  # nothing half-loaded

    with pytest.raises(UserError, match="no checkpoint there"):
        load_checkpoint(full_model, str(tmp_path / "absent.ckpt"))


@pytest.mark.slow
def test_own_checkpoint_round_trips_and_tf1_reads_it(model, tmp_path):
    rng = np.random.default_rng(5)
    for var in model.weights:
        var.assign(rng.normal(0, 0.02, var.shape).astype(np.float32))
    written = {key: var.numpy() for key, var, _ in tf1_variables(model)}
    prefix = str(tmp_path / "pynet_level_0_iteration_7.ckpt")
    save_checkpoint(model, prefix)
    for var in model.weights:
        var.assign(np.zeros(var.shape, np.float32))
    load_checkpoint(model, prefix)
    for key, var, _ in tf1_variables(model):
        np.testing.assert_array_equal(var.numpy(), written[key])
    assert not [f for f in tmp_path.iterdir() if ".tmp" in f.name]

    # TF1's own Saver restores it under the same keys: checkpoints move between the code bases
    graph = tf.Graph()
    with graph.as_default():
        probe = {k: tf.compat.v1.Variable(np.zeros(written[k].shape, np.float32)) for k in
                 ("generator/Variable", "generator/Variable_207", "generator/Variable_436")}
        with tf.compat.v1.Session(graph=graph) as session:
            tf.compat.v1.train.Saver(var_list=probe).restore(session, prefix)
            for key, var in probe.items():
                np.testing.assert_array_equal(session.run(var), written[key])


@pytest.mark.slow
def test_partial_model_loads_its_share_of_a_full_checkpoint(reference_variables, tmp_path):
    arrays = random_reference_arrays(reference_variables, seed=3)
    prefix = write_tf1_checkpoint(str(tmp_path / "full.ckpt"), arrays)
    partial = PyNET(level=4)
    load_checkpoint(partial, prefix)
    entries = tf1_variables(partial)
    assert len(entries) == 106
    for key, var, _ in entries:
        np.testing.assert_array_equal(var.numpy(), arrays[key])
    with pytest.raises(ValueError, match="only a full model"):
        save_checkpoint(partial, str(tmp_path / "partial.ckpt"))
