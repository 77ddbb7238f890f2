"""load_dataset.py: packing, targets, augmentation, sampling, streaming and bad-data handling.

Expected values come from independent computations: explicit NumPy loops, Pillow's own resize,
pypng for writing PNGs, and transforms recomputed here.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import camera
import cli
import data_pipeline
import load_dataset as ld
from helpers import write_png_mosaic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------
# helpers: datasets with known contents

def write_jpeg(path, image, quality=95):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(path, quality=quality)


def make_dataset(root, n_train=6, n_test=3, seed=0, mosaic_fn=None, target_fn=None):
    """Random 448 mosaics (10-bit) and targets; ``mosaic_fn(split, i)``/``target_fn`` override them."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("test", n_test)):
        for i in range(count):
            target = target_fn(split, i) if target_fn else rng.integers(0, 256, (448, 448, 3))
            write_jpeg(os.path.join(root, split, "canon", f"{i}.jpg"), target)
            mosaic = mosaic_fn(split, i) if mosaic_fn else rng.integers(0, 1024, (448, 448))
            write_png_mosaic(os.path.join(root, split, "huawei_raw", f"{i}.png"), mosaic)
    return str(root)


def uniform_dataset(root, n_train=8):
    """Patch i names its index: its blue sites hold 100 + 10 i (the packed channel 0, whatever
    the rotation or flip), its target is grey 20 i. The other sites are noise, as a blank mosaic
    is refused (camera.check_not_blank)."""
    rng = np.random.default_rng(1)

    def mosaic(split, i):
        values = rng.integers(0, 1024, (448, 448))
        values[1::2, 1::2] = 100 + 10 * i
        return values

    return make_dataset(root, n_train, 2, mosaic_fn=mosaic, target_fn=lambda s, i: np.full((448, 448, 3), 20 * i))


def index_of(raw_sample):
    return int(round(float(raw_sample[0, 0, 0]) * 1020 - 100)) // 10


def collect(pipeline, batches):
    dataset, log = pipeline
    out = []
    for raw, target in data_pipeline.batches(dataset.take(batches), log):
        out.append((raw.numpy(), target.numpy()))
    return out


# ---------------------------------------------------------------------------------------
# packing, sizes, targets

def test_packing_order_against_explicit_loops():
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 1024, (6, 10))
    packed = camera.extract_bayer_channels(raw)
    assert packed.shape == (3, 5, 4) and packed.dtype == np.float32
    for y in range(3):
        for x in range(5):
            expected = [raw[2 * y + 1, 2 * x + 1], raw[2 * y, 2 * x + 1], raw[2 * y, 2 * x], raw[2 * y + 1, 2 * x]]
            np.testing.assert_array_equal(packed[y, x], np.float32(expected) / np.float32(1020))


def test_sizes_per_level_match_the_reference_table():
    # reference train_model.py lines 22-24: DSLR_SCALE 2, 1, .5, .25, .125, .0625; TARGET 448, 224, 112, 56, 28, 14
    assert [ld.dslr_scale(level) for level in range(6)] == [2, 1, 0.5, 0.25, 0.125, 0.0625]
    assert [ld.target_size(level) for level in range(6)] == [448, 224, 112, 56, 28, 14]
    assert [ld.target_size(level, 32) for level in range(6)] == [64, 32, 16, 8, 4, 2]
    with pytest.raises(cli.UserError):
        ld.dslr_scale(6)


@pytest.mark.parametrize("patch", [0, 8, 20, 240, 225, 16.0, True])
def test_bad_patch_sizes_are_refused(patch):
    with pytest.raises(cli.UserError, match="multiple of 16"):
        ld.check_patch(patch)


def test_8_and_16_bit_png_containers_give_the_same_mosaic(tmp_path):
    rng = np.random.default_rng(2)
    mosaic = rng.integers(0, 256, (448, 448))
    write_png_mosaic(str(tmp_path / "8.png"), mosaic, bitdepth=8)
    write_png_mosaic(str(tmp_path / "16.png"), mosaic, bitdepth=16)
    with Image.open(tmp_path / "8.png") as image:
        assert image.mode == "L"  # really an 8-bit container
    for name in ("8.png", "16.png"):
        raw = ld.read_raw_patch(str(tmp_path / name))
        assert raw.dtype == np.uint16
        np.testing.assert_array_equal(raw, mosaic)
    tenbit = rng.integers(0, 1024, (448, 448))
    write_png_mosaic(str(tmp_path / "10.png"), tenbit)
    np.testing.assert_array_equal(ld.read_raw_patch(str(tmp_path / "10.png")), tenbit)


@pytest.mark.parametrize("level", range(6))
def test_target_is_pillow_bicubic_of_the_uint8_jpeg(tmp_path, level):
    rng = np.random.default_rng(3)
    path = str(tmp_path / "t.jpg")
    write_jpeg(path, rng.integers(0, 256, (448, 448, 3)))
    target = ld.load_target(path, level)
    side = int(448 * (2.0 ** (1 - level)) / 2)
    assert target.shape == (side, side, 3) and target.dtype == np.float32
    with Image.open(path) as image:
        decoded = np.asarray(image)
        resized = np.asarray(image.resize((side, side), Image.BICUBIC))
    if level == 0:
        np.testing.assert_array_equal(resized, decoded)
    # the reference: np.float16(uint8) / 255 (float16 arithmetic), then stored as float
    np.testing.assert_array_equal(target, (resized.astype(np.float16) / np.float16(255)).astype(np.float32))
    assert np.abs(target - resized / 255.0).max() <= 2.5e-4


# ---------------------------------------------------------------------------------------
# sampling plan: reference distributions, subset redraw, whole-set shuffle

def test_rotation_and_flip_follow_the_reference_distribution():
    # randint(1, 100) % 4: P(k=0) = 24/99, P(k=1..3) = 25/99; flip: 50/99. With 200k draws the
    # standard error is ~0.001, so a uniform k (0.25 each) would be 7 standard errors off.
    plan = data_pipeline.train_plan(np.arange(5), batch_size=1000, train_size=5, seed=3)
    draws = np.array([next(plan) for _ in range(200000)])
    k_freq = np.bincount(draws[:, 1], minlength=4) / len(draws)
    np.testing.assert_allclose(k_freq, [24 / 99, 25 / 99, 25 / 99, 25 / 99], atol=0.004)
    assert abs(draws[:, 2].mean() - 50 / 99) < 0.004
    assert set(np.unique(draws[:, 2])) == {0, 1}


def test_subset_is_redrawn_after_the_first_batch_then_every_refresh():
    batch, train_size, refresh = 4, 3, 5
    plan = data_pipeline.train_plan(np.arange(100, 120), batch, train_size, seed=0, refresh_every=refresh)
    windows = [1] + [refresh] * 6
    subsets = []
    for n_batches in windows:
        used = {int(next(plan)[0]) for _ in range(n_batches * batch)}
        assert len(used) <= train_size and used <= set(range(100, 120))
        subsets.append(used)
    # drawn anew: the windows do not all use the same patches
    assert len({frozenset(s) for s in subsets}) > 3


def test_whole_set_is_shuffled_and_covered_each_pass():
    indices = np.arange(10, 30)
    plan = data_pipeline.train_plan(indices, batch_size=4, whole=True, seed=5)
    first = [int(next(plan)[0]) for _ in range(20)]
    second = [int(next(plan)[0]) for _ in range(20)]
    assert sorted(first) == sorted(second) == list(indices)
    assert first != list(indices) and first != second


def test_crop_offsets_stay_on_the_target_grid():
    for level in range(6):
        step = max(1, 2 ** (level - 1))
        plan = data_pipeline.train_plan(np.arange(3), batch_size=2, patch=32, level=level, seed=level)
        offsets = np.array([next(plan)[3:] for _ in range(500)])
        assert offsets.min() >= 0 and offsets.max() <= 224 - 32
        assert (offsets % step == 0).all()
        assert len(np.unique(offsets)) > 1
        # the matching target offset is a whole number of target pixels
        assert np.all((offsets * 2.0 ** (1 - level)) % 1 == 0)


# ---------------------------------------------------------------------------------------
# the tf.data pipelines

TRANSFORMS = [(k, flip) for k in range(4) for flip in (0, 1)]


def transform(image, k, flip):
    image = np.rot90(image, k)
    return image[::-1] if flip else image


def test_augmentation_applies_one_transform_to_raw_and_target(tmp_path):
    rng = np.random.default_rng(4)
    targets = {i: rng.integers(0, 256, (448, 448, 3)) for i in range(3)}
    root = make_dataset(tmp_path / "d", 3, 1, target_fn=lambda s, i: targets.get(i, targets[0]))
    # Each mosaic is derived from its (decoded) target: every 2x2 cell holds 4 x the green value.
    cells = {}
    for i in range(3):
        with Image.open(os.path.join(root, "train", "canon", f"{i}.jpg")) as image:
            cells[i] = np.asarray(image)[0::2, 0::2, 1].astype(np.int64) * 4
        write_png_mosaic(os.path.join(root, "train", "huawei_raw", f"{i}.png"), np.kron(cells[i], np.ones((2, 2))))
    full_targets = {i: ld.load_target(os.path.join(root, "train", "canon", f"{i}.jpg"), 0) for i in range(3)}
    seen = set()
    pipeline = data_pipeline.train_dataset(root, 0, batch_size=4, train_size=3, seed=7, verbose=False)
    for raw, target in collect(pipeline, 8):
        for r, t in zip(raw, target):
            matches = [(i, k, f) for i in cells for k, f in TRANSFORMS
                       if np.array_equal(r[..., 2], transform(cells[i] / np.float32(1020), k, f).astype(np.float32))]
            assert len(matches) == 1
            i, k, f = matches[0]
            np.testing.assert_array_equal(t, transform(full_targets[i], k, f))
            # all four packed channels moved together (no Bayer-phase correction)
            for c in range(4):
                np.testing.assert_array_equal(r[..., c], r[..., 2])
            seen.add((k, f))
    assert len(seen) >= 6  # 32 samples: most of the 8 transforms appear


def test_pipeline_equals_the_plan_applied_by_hand(tmp_path):
    root = make_dataset(tmp_path / "d", 5, 1)
    level, patch, batch = 2, 48, 3
    pipeline = data_pipeline.train_dataset(root, level, batch, train_size=4, patch=patch, seed=11, refresh_every=2,
                                           verbose=False)
    plan = data_pipeline.train_plan(list(range(5)), batch, 4, False, patch, level, 11, 2)
    scale = 2.0 ** (1 - level)
    side = int(patch * 0.5)
    for raw, target in collect(pipeline, 4):
        assert raw.shape == (batch, patch, patch, 4) and target.shape == (batch, side, side, 3)
        for r, t in zip(raw, target):
            index, k, flip, oy, ox = (int(v) for v in next(plan))
            with Image.open(os.path.join(root, "train", "huawei_raw", f"{index}.png")) as image:
                mosaic = np.asarray(image).astype(np.float32)
            packed = np.stack([mosaic[1::2, 1::2], mosaic[0::2, 1::2], mosaic[0::2, 0::2], mosaic[1::2, 0::2]], -1)
            expected_raw = transform(packed[oy:oy + patch, ox:ox + patch] / np.float32(1020), k, flip)
            np.testing.assert_array_equal(r, expected_raw)
            with Image.open(os.path.join(root, "train", "canon", f"{index}.jpg")) as image:
                small = np.asarray(image.resize((112, 112), Image.BICUBIC))
            ty, tx = int(oy * scale), int(ox * scale)
            crop = small[ty:ty + side, tx:tx + side].astype(np.float16) / np.float16(255)
            np.testing.assert_array_equal(t, transform(crop.astype(np.float32), k, flip))


def test_train_size_subset_holds_within_each_window(tmp_path):
    root = uniform_dataset(tmp_path / "u", n_train=8)
    pipeline = data_pipeline.train_dataset(root, 5, batch_size=4, train_size=3, seed=2, refresh_every=3, verbose=False)
    batches = collect(pipeline, 1 + 3 * 4)
    windows = [batches[:1]] + [batches[1 + 3 * w: 4 + 3 * w] for w in range(4)]
    used = []
    for window in windows:
        ids = {index_of(r) for raw, _ in window for r in raw}
        assert len(ids) <= 3 and ids <= set(range(8))
        used.append(frozenset(ids))
    assert len(set(used)) > 1
    # targets follow their mosaics: patch i has target grey 20 i
    for raw, target in batches:
        for r, t in zip(raw, target):
            assert abs(float(t.mean()) * 255 - 20 * index_of(r)) < 2


def test_whole_dataset_stream_covers_every_patch(tmp_path):
    root = uniform_dataset(tmp_path / "u", n_train=8)
    pipeline = data_pipeline.train_dataset(root, 4, batch_size=4, whole=True, seed=0, verbose=False)
    ids = [index_of(r) for raw, _ in collect(pipeline, 4) for r in raw]
    assert sorted(ids[:8]) == list(range(8)) and sorted(ids[8:]) == list(range(8))


def test_same_seed_same_batches_other_seed_other_batches(tmp_path):
    root = uniform_dataset(tmp_path / "u", n_train=8)

    def ids(seed, start_batch=0, count=3):
        pipeline = data_pipeline.train_dataset(root, 5, batch_size=4, train_size=8, seed=seed, verbose=False,
                                    start_batch=start_batch)
        return [index_of(r) for raw, _ in collect(pipeline, count) for r in raw]

    assert ids(1) == ids(1)
    assert ids(1) != ids(2)
    assert ids(1, start_batch=2, count=1) == ids(1)[8:]  # resuming continues the same stream


def test_plan_batches_cut_the_plan_by_batch_number():
    def plan():
        return data_pipeline.train_plan(np.arange(10, 17), batch_size=3, train_size=5, seed=4, refresh_every=2)

    stream = plan()
    expected = [np.stack([next(stream) for _ in range(3)]) for _ in range(8)]
    batches = data_pipeline.PlanBatches(plan, 3)
    for number in (0, 1, 2, 5, 6, 1, 7, 0):  # in order, skipping ahead, then back (a new iterator)
        np.testing.assert_array_equal(batches.batch(number), expected[number])


def test_plan_batches_cut_from_two_threads_at_once_are_each_their_own_batch():
    import threading
    import time

    def plan():
        for value in data_pipeline.train_plan(np.arange(10, 17), batch_size=3, train_size=5, seed=4, refresh_every=2):
            time.sleep(0)  # let the other thread in between draws, as tf.data's threads do
            yield value

    stream = plan()
    expected = [np.stack([next(stream) for _ in range(3)]) for _ in range(40)]
    batches, wrong = data_pipeline.PlanBatches(plan, 3), []

    def reader(numbers):
        for number in numbers:
            if not np.array_equal(batches.batch(number), expected[number]):
                wrong.append(number)

    threads = [threading.Thread(target=reader, args=(list(range(first, 40, 2)) * 3,)) for first in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []


def test_two_iterators_over_one_pipeline_see_the_same_stream(tmp_path):
    root = uniform_dataset(tmp_path / "u", n_train=8)
    dataset, _ = data_pipeline.train_dataset(root, 5, batch_size=4, train_size=8, seed=3, verbose=False)
    first = iter(dataset)
    ids_first = [[index_of(r) for r in next(first)[0].numpy()] for _ in range(3)]
    ids_second = [[index_of(r) for r in raw.numpy()] for raw, _ in dataset.take(2)]
    assert ids_second == ids_first[:2]


def _dataset_ops(dataset):
    import tensorflow as tf

    graph = tf.compat.v1.GraphDef.FromString(dataset._as_serialized_graph().numpy())
    ops = {node.op for node in graph.node}
    for function in graph.library.function:
        ops |= {node.op for node in function.node_def}
    return ops


def test_training_pipeline_has_no_generator_dataset(tmp_path):
    # Building a GeneratorDataset kernel (tf.data.Dataset.from_generator) on Python 3.11 makes
    # TensorFlow fix glibc's mmap threshold at 128 KiB for the whole process, which makes every
    # training step fault its buffers in afresh (benchmarks/README.md, "Training step").
    import tensorflow as tf

    root = uniform_dataset(tmp_path / "u", n_train=4)
    dataset, _ = data_pipeline.train_dataset(root, 5, batch_size=2, train_size=4, verbose=False)
    ops = _dataset_ops(dataset)
    assert "MapDataset" in ops and "RangeDataset" in ops  # the graph is read, with its functions
    assert not any("Generator" in op for op in ops), sorted(ops)
    generator = tf.data.Dataset.from_generator(lambda: iter([1]), output_signature=tf.TensorSpec((), tf.int64))
    assert any("Generator" in op for op in _dataset_ops(generator))  # what the check would catch


def test_train_size_larger_than_the_dataset_is_reduced_with_a_warning(tmp_path, capsys):
    root = uniform_dataset(tmp_path / "u", n_train=8)
    pipeline = data_pipeline.train_dataset(root, 5, batch_size=2, train_size=5000)
    assert len(collect(pipeline, 2)) == 2
    assert "train_size=5000 is larger than the 8 training patches" in capsys.readouterr().err


def test_test_dataset_is_in_order_finite_and_centre_cropped(tmp_path):
    root = make_dataset(tmp_path / "d", 1, 5)
    pipeline = data_pipeline.test_dataset(root, 1, batch_size=2, patch=64, verbose=False)
    got = collect(pipeline, 100)
    assert len(got) == 2  # 5 patches, batch 2, remainder dropped as the reference's evaluation
    assert len(collect(data_pipeline.test_dataset(root, 1, 2, patch=64, drop_remainder=False, verbose=False), 100)) == 3
    offset = (224 - 64) // 2
    for b, (raw, target) in enumerate(got):
        for j in range(2):
            index = 2 * b + j
            with Image.open(os.path.join(root, "test", "huawei_raw", f"{index}.png")) as image:
                mosaic = np.asarray(image).astype(np.float32)
            red = mosaic[0::2, 0::2][offset:offset + 64, offset:offset + 64]
            np.testing.assert_array_equal(raw[j, ..., 2], red / 1020)
            with Image.open(os.path.join(root, "test", "canon", f"{index}.jpg")) as image:
                half = np.asarray(image.resize((224, 224), Image.BICUBIC))  # level 1: factor 1/2
            expected = half[offset:offset + 64, offset:offset + 64].astype(np.float16) / np.float16(255)
            np.testing.assert_array_equal(target[j], expected.astype(np.float32))


def test_dataset_kind_reads_the_marker(tmp_path):
    root = make_dataset(tmp_path / "d", 1, 1)
    assert ld.dataset_kind(root) == "ZRR"
    (tmp_path / "d" / ld.MARKER_FILE).write_text("synthetic")
    assert ld.dataset_kind(root) == "synthetic sample (made by make_sample_dataset.py)"
    assert "NOT the Zurich" in ld.describe_dataset(root)
    assert ld.num_patches(root, "train") == 1 and ld.num_patches(root, "test") == 1


# ---------------------------------------------------------------------------------------
# bad data: one-line errors naming the file, or skip_bad warnings and a count

def corrupt_middle(path):
    """Keep the PNG signature, header and IEND; break the compressed data in between."""
    data = bytearray(open(path, "rb").read())
    for i in range(100, len(data) - 40):
        data[i] = (data[i] * 7 + 13) % 256
    open(path, "wb").write(bytes(data))


def truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


BREAKERS = {
    "garbage PNG": (lambda root: open(os.path.join(root, "train/huawei_raw/2.png"), "wb").write(b"not a png" * 50),
                    "train/huawei_raw/2.png", "PNG"),
    "truncated PNG": (lambda root: truncate(os.path.join(root, "train/huawei_raw/2.png")),
                      "train/huawei_raw/2.png", "truncated"),
    "truncated JPEG": (lambda root: truncate(os.path.join(root, "train/canon/3.jpg")),
                       "train/canon/3.jpg", "truncated"),
    "wrong size": (lambda root: write_png_mosaic(os.path.join(root, "train/huawei_raw/1.png"), np.zeros((448, 450))),
                   "train/huawei_raw/1.png", "448x448"),
    "RGB mosaic": (lambda root: Image.fromarray(np.zeros((448, 448, 3), np.uint8)).save(
        os.path.join(root, "train/huawei_raw/1.png")), "train/huawei_raw/1.png", "single-channel"),
    "small JPEG": (lambda root: write_jpeg(os.path.join(root, "train/canon/0.jpg"), np.zeros((200, 448, 3))),
                   "train/canon/0.jpg", "448x448"),
    "missing JPEG": (lambda root: os.remove(os.path.join(root, "train/canon/4.jpg")),
                     "train/canon/4.jpg", "expected one"),
}


@pytest.mark.parametrize("name", sorted(BREAKERS))
def test_bad_file_is_a_one_line_error_naming_it(tmp_path, name):
    root = make_dataset(tmp_path / "d", 6, 1)
    breaker, relative, expectation = BREAKERS[name]
    breaker(root)
    with pytest.raises(ld.DataError) as error:
        ld.check_dataset(root, "train")
    message = str(error.value)
    assert os.path.join(root, relative) in message and expectation in message and "\n" not in message
    with pytest.raises(ld.DataError):
        data_pipeline.train_dataset(root, 5, 2, verbose=False)


@pytest.mark.parametrize("missing", ["", "train", "train/huawei_raw", "train/canon"])
def test_missing_folders_are_named(tmp_path, missing):
    root = make_dataset(tmp_path / "d", 2, 1) if missing else str(tmp_path / "nowhere")
    if missing:
        import shutil
        shutil.rmtree(os.path.join(root, missing))
    with pytest.raises(ld.DataError, match="not found") as error:
        ld.check_dataset(root, "train")
    assert os.path.join(root, missing).rstrip("/") in str(error.value)


def test_errors_found_while_streaming_name_the_file(tmp_path):
    """Values above 1023 and corrupt data pass the header check; the reader stops on them."""
    root = make_dataset(tmp_path / "d", 4, 2)
    write_png_mosaic(os.path.join(root, "train/huawei_raw/0.png"), np.full((448, 448), 2000))
    write_png_mosaic(os.path.join(root, "train/huawei_raw/1.png"), np.full((448, 448), 2000))
    write_png_mosaic(os.path.join(root, "train/huawei_raw/2.png"), np.full((448, 448), 2000))
    corrupt_middle(os.path.join(root, "train/huawei_raw/3.png"))
    assert ld.check_dataset(root, "train") == [0, 1, 2, 3]  # headers are fine
    pipeline = data_pipeline.train_dataset(root, 5, batch_size=2, train_size=4, verbose=False)
    with pytest.raises(ld.DataError) as error:
        for _ in data_pipeline.batches(*pipeline):
            pass
    message = str(error.value)
    assert "\n" not in message and "train/huawei_raw/" in message
    assert "1023" in message or "corrupt" in message
    # deep check, as test_dataset does, finds both kinds at once
    message = r"huawei_raw/0\.png: expected 10-bit values \(<= 1023\), found a maximum of 2000"
    with pytest.raises(ld.DataError, match=message):
        ld.check_dataset(root, "train", deep=True)
    write_png_mosaic(os.path.join(root, "test/huawei_raw/1.png"), np.full((448, 448), 1024))
    with pytest.raises(ld.DataError, match=r"test/huawei_raw/1\.png: expected 10-bit"):
        data_pipeline.test_dataset(root, 5, 1, verbose=False)


def test_skip_bad_warns_per_file_and_counts(tmp_path, capsys):
    root = make_dataset(tmp_path / "d", 8, 1)
    truncate(os.path.join(root, "train/huawei_raw/2.png"))
    write_png_mosaic(os.path.join(root, "train/huawei_raw/5.png"), np.zeros((448, 450)))
    os.remove(os.path.join(root, "train/canon/6.jpg"))
    assert ld.check_dataset(root, "train", skip_bad=True) == [0, 1, 3, 4, 7]
    err = capsys.readouterr().err
    for name in ("huawei_raw/2.png", "huawei_raw/5.png", "canon/6.jpg"):
        assert sum(name in line for line in err.splitlines() if line.startswith("warning: skipping")) == 1
    assert "skipped 3 bad file(s); 5 usable patches remain" in err


def test_skip_bad_drops_patches_found_bad_while_streaming(tmp_path, capsys):
    root = uniform_dataset(tmp_path / "u", n_train=6)
    write_png_mosaic(os.path.join(root, "train/huawei_raw/3.png"), np.full((448, 448), 1500))
    pipeline = data_pipeline.train_dataset(root, 5, batch_size=3, whole=True, skip_bad=True, seed=0, verbose=False)
    ids = [index_of(r) for raw, _ in collect(pipeline, 5) for r in raw]
    assert len(ids) == 15 and 3 not in ids and set(ids) == {0, 1, 2, 4, 5}
    warnings = [line for line in capsys.readouterr().err.splitlines() if "huawei_raw/3.png" in line]
    assert len(warnings) == 1 and "1 bad patch(es) skipped" in warnings[0]


def test_checker_command_line(tmp_path):
    root = make_dataset(tmp_path / "d", 2, 1)
    env = dict(os.environ, PYTHONPATH=ROOT)
    ok = subprocess.run([sys.executable, os.path.join(ROOT, "load_dataset.py"), f"dataset_dir={root}"],
                        capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "(ZRR layout)" in ok.stdout and "train: 2 usable patches" in ok.stdout
    write_png_mosaic(os.path.join(root, "test/huawei_raw/0.png"), np.full((448, 448), 4095))
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "load_dataset.py"), f"dataset_dir={root}"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 1
    assert bad.stderr.strip().count("\n") == 0 and bad.stderr.startswith("error: ")
    assert "test/huawei_raw/0.png" in bad.stderr and "Traceback" not in bad.stderr


# ---------------------------------------------------------------------------------------
# what a dataset check says of a blank mosaic, a misnamed patch, an empty or oversized file

def run_checker(root, capsys, *args):
    code = cli.run(ld.main, [f"dataset_dir={root}", *args])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("share", [1.0, 0.995])
def test_a_blank_mosaic_is_refused_naming_it(tmp_path, capsys, share):
    """A raw file whose pixels a tool stripped reads as one value; so does a blank frame."""
    root = make_dataset(tmp_path / "d", 2, 1)
    rng = np.random.default_rng(5)
    mosaic = np.full(448 * 448, 64)
    noisy = rng.choice(mosaic.size, round(mosaic.size * (1 - share)), replace=False)
    mosaic[noisy] = rng.integers(65, 1024, noisy.size)
    write_png_mosaic(os.path.join(root, "train/huawei_raw/1.png"), mosaic.reshape(448, 448))
    code, lines = run_checker(root, capsys)
    assert code == 1 and len(lines) == 1
    assert lines[0].startswith(f"error: {os.path.join(root, 'train/huawei_raw/1.png')}: the mosaic is ")
    assert "at value 64: no image data" in lines[0]
    assert ("constant" if share == 1 else "nearly constant (99.5% of its pixels)") in lines[0]
    with pytest.raises(ld.DataError, match="no image data"):
        ld.read_raw_patch(os.path.join(root, "train/huawei_raw/1.png"))
    # a dark photo is no blank frame: most of it at the black level is still a picture
    mosaic = np.full((448, 448), 64)
    mosaic[:20] = rng.integers(64, 1024, (20, 448))
    write_png_mosaic(os.path.join(root, "train/huawei_raw/1.png"), mosaic)
    assert run_checker(root, capsys)[0] == 0


def test_patch_names_with_leading_zeros_are_named_as_they_are(tmp_path, capsys):
    """ZRR names its patches 0.png, 1.png, ...: 07.png was reported as a missing 7.png."""
    root = make_dataset(tmp_path / "d", 2, 1)
    for folder, ext in (("huawei_raw", "png"), ("canon", "jpg")):
        os.rename(os.path.join(root, "train", folder, f"1.{ext}"), os.path.join(root, "train", folder, f"07.{ext}"))
    code, lines = run_checker(root, capsys, "split=train")
    assert code == 1 and len(lines) == 1
    assert lines[0] == (f"error: {os.path.join(root, 'train', 'huawei_raw', '07.png')}: not a ZRR patch name (ZRR "
                        f"names them 0.png, 1.png, ... without leading zeros): rename it 7.png")
    assert ld.check_dataset(root, "train", skip_bad=True) == [0]
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: skipping")]
    assert len(warnings) == 2 and "huawei_raw/07.png" in warnings[0] and "canon/07.jpg: " in warnings[1]
    assert "rename it 7.jpg" in warnings[1]


@pytest.mark.parametrize("deep", ["true", "false"])
def test_an_empty_mosaic_or_target_says_the_file_is_empty(tmp_path, capsys, deep):
    root = make_dataset(tmp_path / "d", 2, 1)
    for relative in ("train/huawei_raw/1.png", "train/canon/1.jpg"):
        name = os.path.join(root, relative)
        saved = open(name, "rb").read()
        open(name, "wb").close()
        code, lines = run_checker(root, capsys, "split=train", f"deep={deep}")
        assert code == 1 and len(lines) == 1, lines
        assert lines[0].startswith(f"error: {name}: ") and "the file is empty (0 bytes)" in lines[0]
        assert "BytesIO" not in lines[0] and "cannot identify" not in lines[0]
        open(name, "wb").write(saved)
    empty = os.path.join(root, "train/canon/1.jpg")
    open(empty, "wb").close()
    with pytest.raises(ld.DataError, match=r"1\.jpg: cannot read the JPEG \(the file is empty \(0 bytes\)\)"):
        ld.read_target_image(empty)   # as the training stream reads a target


def test_a_decompression_bomb_is_called_too_large(tmp_path, capsys, monkeypatch):
    """Pillow refuses images above 2 x MAX_IMAGE_PIXELS: here lowered so that a real 448x448
    mosaic is such an image."""
    from PIL import Image

    root = make_dataset(tmp_path / "d", 2, 1)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 448 * 448 // 4)
    code, lines = run_checker(root, capsys, "split=train", "deep=false")
    assert code == 1 and len(lines) == 1
    assert lines[0].startswith(f"error: {os.path.join(root, 'train/huawei_raw/0.png')}: cannot read the PNG (")
    assert "too large to decode safely" in lines[0] and "corrupt" not in lines[0]
