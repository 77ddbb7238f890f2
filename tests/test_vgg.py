"""vgg.py: the MatConvNet and Keras weight files, and the features against NumPy."""

import os

import numpy as np
import pytest
import scipy.io

import vgg
from cli import UserError
from helpers import np_vgg_relu5_4, random_vgg_weights, write_matconvnet_vgg

# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fake_weights():
    return random_vgg_weights(seed=3)


@pytest.fixture(scope="module")
def fake_mat(module_tmp, fake_weights):
    path = module_tmp("vgg") / "imagenet-vgg-verydeep-19.mat"
    write_matconvnet_vgg(str(path), fake_weights)
    return str(path)


def test_matconvnet_features_match_numpy(fake_mat, fake_weights):
    # Odd sizes on the way down (20 -> 10 -> 5 -> 3 -> 2, 28 -> 14 -> 7 -> 4 -> 2) exercise
    # the 'same' pooling; the kernels are not symmetric, so a missing H/W transpose shows.
    images = np.random.default_rng(1).uniform(-0.08, 1.08, (2, 20, 28, 3)).astype(np.float32)
    net = vgg.load_vgg(fake_mat)
    got = net(images).numpy()
    want = np_vgg_relu5_4(images, fake_weights)
    assert got.shape == want.shape == (2, 2, 2, 512)
    assert np.abs(want).max() > 1.0  # the random network does not collapse to zero
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_weights_read_as_the_reference_reads_them(fake_mat, fake_weights):
    # The reference's own indexing: layers[0][i][0][0][0][0] -> (kernels, bias), then transpose.
    data = scipy.io.loadmat(fake_mat)
    kernels, bias = data["layers"][0][0][0][0][0][0]
    np.testing.assert_array_equal(np.transpose(kernels, (1, 0, 2, 3)), fake_weights[0][0])
    loaded = vgg.load_matconvnet(fake_mat)
    assert len(loaded) == 16
    for (k, b), (k_ref, b_ref) in zip(loaded, fake_weights):
        np.testing.assert_array_equal(k, k_ref)
        np.testing.assert_array_equal(b, b_ref)


@pytest.mark.parametrize("size, expected", [(448, 28), (224, 14), (112, 7), (56, 4), (28, 2), (14, 1)])
def test_relu5_4_sizes_of_the_reference(size, expected):
    # Reference train_model.py lines 75-81 (relu5_4 of the level's target): relu5_4 is 28, 14, 7, 4, 2, 1
    # for targets 448 ... 14.
    assert vgg.feature_size(size) == expected


def test_relu5_4_size_of_small_targets(fake_mat):
    net = vgg.load_vgg(fake_mat)
    for size, expected in ((14, 1), (28, 2), (56, 4)):
        out = net(np.zeros((1, size, size, 3), np.float32))
        assert out.shape == (1, expected, expected, 512)


def test_missing_file_is_one_clear_error(tmp_path):
    path = str(tmp_path / "nowhere" / "imagenet-vgg-verydeep-19.mat")
    with pytest.raises(UserError) as err:
        vgg.load_vgg(path)
    text = str(err.value)
    assert path in text and "\n" not in text
    assert "levels 3, 2, 1 and 0" in text and "vgg_dir=" in text


def test_wrong_shapes_are_rejected(tmp_path, fake_weights):
    bad = list(fake_weights)
    bad[5] = (bad[5][0][:, :, :100, :], bad[5][1])
    path = str(tmp_path / "bad.mat")
    write_matconvnet_vgg(path, bad)
    with pytest.raises(UserError, match="conv3_2"):
        vgg.load_matconvnet(path)


def test_not_a_matconvnet_file(tmp_path):
    path = str(tmp_path / "other.mat")
    scipy.io.savemat(path, {"x": np.zeros(3)})
    with pytest.raises(UserError, match="no 'layers'"):
        vgg.load_matconvnet(path)
    garbage = tmp_path / "garbage.mat"
    garbage.write_bytes(b"not a mat file at all" * 10)
    with pytest.raises(UserError, match="cannot read"):
        vgg.load_matconvnet(str(garbage))


# ---------------------------------------------------------------------------------------
# Keras' VGG19 weights file

KERAS_NAMES = [f"block{b}_conv{c}" for b, n in ((1, 2), (2, 2), (3, 4), (4, 4), (5, 4)) for c in range(1, n + 1)]


def write_keras_legacy_h5(path, weights_bgr):
    """The legacy Keras HDF5 layout of vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5:
    one group per layer (pools and input included), ``weight_names`` attributes."""
    import h5py

    layer_names = ["input_1"]
    for b, n in ((1, 2), (2, 2), (3, 4), (4, 4), (5, 4)):
        layer_names += [f"block{b}_conv{c}" for c in range(1, n + 1)] + [f"block{b}_pool"]
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [n.encode() for n in layer_names]
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.1.5"
        conv = 0
        for name in layer_names:
            group = f.create_group(name)
            if "conv" in name:
                kernel, bias = weights_bgr[conv]
                conv += 1
                wnames = [f"{name}_W_1:0".encode(), f"{name}_b_1:0".encode()]
                group.attrs["weight_names"] = wnames
                group.create_dataset(wnames[0].decode(), data=kernel)
                group.create_dataset(wnames[1].decode(), data=bias)
            else:
                group.attrs["weight_names"] = np.array([], dtype="S1")


@pytest.fixture(scope="module")
def fake_h5(module_tmp, fake_weights):
    path = str(module_tmp("vgg_keras") / "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5")
    write_keras_legacy_h5(path, fake_weights)  # kernels as Keras stores them: first conv reads BGR
    return path


def test_keras_h5_matches_numpy_in_bgr(fake_h5, fake_weights):
    images = np.random.default_rng(2).uniform(0, 1, (1, 20, 24, 3)).astype(np.float32)
    net = vgg.load_vgg(fake_h5)
    got = net(images).numpy()
    want = np_vgg_relu5_4(images, fake_weights, bgr=True)  # RGB image -> BGR, as Keras expects
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_keras_h5_matches_keras_vgg19(fake_h5):
    """Keras itself reads the file, with its BGR 'caffe' preprocessing and 'valid' pools; at a
    size divisible by 16, 'valid' and 'same' pools agree, so block5_conv4 must equal ours."""
    import keras

    model = keras.applications.VGG19(weights=None, include_top=False, input_shape=(32, 48, 3))
    model.load_weights(fake_h5)
    features = keras.Model(model.input, model.get_layer("block5_conv4").output)
    images = np.random.default_rng(4).uniform(0, 1, (2, 32, 48, 3)).astype(np.float32)
    caffe = keras.applications.vgg19.preprocess_input(images * 255.0)  # RGB -> BGR, minus BGR means
    want = np.asarray(features(caffe))
    got = vgg.load_vgg(fake_h5)(images).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_a_folder_holding_the_weights_file_stands_for_it(fake_mat, fake_h5, fake_weights):
    """vgg_dir= is a folder's name: given the folder of the file, the file inside is read."""
    import quickstart

    folder = os.path.dirname(fake_mat)
    assert vgg.weights_file(folder) == fake_mat
    for (kernel, bias), (kernel_ref, bias_ref) in zip(vgg.load_weights(folder), fake_weights):
        np.testing.assert_array_equal(kernel, kernel_ref)
        np.testing.assert_array_equal(bias, bias_ref)
    assert vgg.weights_file(os.path.dirname(fake_h5)) == fake_h5            # Keras' file
    assert quickstart.training_vgg({"loss": "reference", "vgg_dir": folder}, out=print) == fake_mat


def test_a_folder_without_the_weights_file_says_which_file_to_give(tmp_path, capsys):
    import cli
    import train_model

    folder = tmp_path / "vgg_pretrained"
    folder.mkdir()
    (folder / "readme.txt").write_text("not the weights")
    expected = (f"vgg_dir={folder}: a folder without the VGG-19 weights (imagenet-vgg-verydeep-19.mat or "
                f"vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5); put the file there or give the file: "
                f"vgg_dir={folder / 'imagenet-vgg-verydeep-19.mat'}")
    with pytest.raises(UserError) as error:
        vgg.load_vgg(str(folder))
    assert str(error.value) == expected
    # train_model.py says it before any other work (the dataset is not even looked at)
    code = cli.run(train_model.main, ["level=3", f"vgg_dir={folder}", f"models_dir={tmp_path / 'models'}",
                                      f"results_dir={tmp_path / 'results'}", f"dataset_dir={tmp_path / 'absent'}"])
    assert code == 1 and capsys.readouterr().err.strip().splitlines()[-1] == f"error: {expected}"
