"""test_model.py, render.py and strips.py: rendering mosaics of any size, whole or in strips."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import checkpoints
import cli
import images
import render
import runtime
import strips
import test_model
from camera import extract_bayer_channels
from checkpoints import load_checkpoint, save_checkpoint
from cli import UserError
from helpers import ROOT, assign_sane_weights
from model import PyNET, level_model
from render import pad_to_multiple
from strips import run_in_strips


@pytest.fixture
def sane_model(model):
    assign_sane_weights(model, np.random.default_rng(10))
    return model


def mosaic(rng, height, width):
    return rng.integers(0, 1024, (height, width)).astype(np.uint16)


# ---------------------------------------------------------------------------------------
# strips against the whole frame

@pytest.mark.slow
@pytest.mark.parametrize("level", [0, 1])
def test_strips_equal_the_whole_frame(sane_model, level):
    rng = np.random.default_rng(level)
    raw = mosaic(rng, 96, 128)                      # packs to 48 x 64: three strips of 16 rows
    whole = render.render(sane_model, raw, level, tile_size=0)
    eager = sane_model(extract_bayer_channels(raw)[None])[level][0].numpy()
    np.testing.assert_allclose(whole, eager, atol=1e-5)
    for rows in (16, 32):
        in_strips = render.render(sane_model, raw, level, tile_size=rows)
        np.testing.assert_allclose(in_strips, whole, atol=1e-4)

    # the comparison has teeth: strips run as independent frames (zero padding at every
    # strip edge, instance norm per strip) are far off
    packed = extract_bayer_channels(raw)
    naive = np.concatenate([sane_model(packed[None, r:r + 16])[level][0].numpy() for r in range(0, 48, 16)])
    assert np.abs(naive - whole).max() > 0.05


@pytest.mark.slow
def test_instance_norm_maps_computed_in_strips_equal_the_whole_frame(sane_model):
    """With min_strip_pixels=0 the whole-frame maps of levels 2 to 5 are computed in several
    strips too, their statistics gathered over all of them."""
    packed = extract_bayer_channels(mosaic(np.random.default_rng(5), 96, 128))
    expected = sane_model(packed[None])
    for level in (0, 2, 4):
        got = run_in_strips(sane_model, level, packed, 16, min_strip_pixels=0)
        np.testing.assert_allclose(got, expected[level][0].numpy(), atol=1e-4)


def tracked_streams(monkeypatch):
    """The row streams render builds from now on, in a list filled as they are made."""
    nodes = []
    init = strips._Rows.__init__

    def tracked_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        nodes.append(self)

    monkeypatch.setattr(strips._Rows, "__init__", tracked_init)
    return nodes


def held_bytes_peak(monkeypatch):
    """Track the bytes of feature-map rows that render's row streams hold; returns a list whose
    item is the peak seen after any request for rows."""
    nodes, peak = tracked_streams(monkeypatch), [0]

    def tracked(get):
        def tracked_get(self, a, b):
            rows = get(self, a, b)
            peak[0] = max(peak[0], sum(int(np.prod(c[2].shape)) * 4 for n in nodes for c in n.chunks))
            return rows
        return tracked_get

    for cls in (strips._Rows, strips._CatRows, strips._NormConvRows):
        monkeypatch.setattr(cls, "get", tracked(cls.__dict__["get"]))
    return peak


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["default", "every map"])
def test_replayed_maps_equal_the_whole_frame(sane_model, monkeypatch, policy):
    """Replayed instance-norm maps (statistics gathered strip by strip, rows computed again when
    asked for) give the whole frame's output; replaying every one chains restarts through
    every level."""
    if policy == "every map":
        monkeypatch.setattr(strips, "REPLAYED", lambda block, size: block.instance_norm)
    # replaying every map recomputes rows across every level: a narrower frame keeps it quick
    width = 128 if policy == "default" else 64
    packed = extract_bayer_channels(mosaic(np.random.default_rng(6), 128, width))   # 64 x 64 or 64 x 32 packed
    expected = sane_model(packed[None])
    for level in (0, 2):
        got = run_in_strips(sane_model, level, packed, 16, min_strip_pixels=0)
        np.testing.assert_allclose(got, expected[level][0].numpy(), atol=1e-4)


@pytest.mark.slow
def test_replayed_maps_lower_the_peak_of_held_rows(sane_model, monkeypatch):
    """On a frame tall for its strips, as a 12 MP photo is, the held maps of level 2 make the
    peak. Held, conv_l2_d1 is among them at every moment of level 2; replayed (with the 3x3
    branches of conv_l2_d4..d6), the peak is lower by at least that map."""
    packed = extract_bayer_channels(mosaic(np.random.default_rng(7), 768, 64))    # 384 x 32 packed
    peaks, outputs = {}, {}
    for policy, replayed in (("none", lambda block, size: False), ("default", strips.REPLAYED)):
        with monkeypatch.context() as patch:
            patch.setattr(strips, "REPLAYED", replayed)
            peak = held_bytes_peak(patch)
            outputs[policy] = run_in_strips(sane_model, 2, packed, 16, min_strip_pixels=0)
            peaks[policy] = peak[0]
    np.testing.assert_allclose(outputs["default"], outputs["none"], atol=1e-4)
    level_2_map = 192 * 16 * 64 * 4
    assert peaks["default"] <= peaks["none"] - level_2_map, peaks


@pytest.mark.slow
def test_every_map_is_dropped_once_its_last_consumer_has_passed(sane_model, monkeypatch):
    """When the last strip is out, no stream holds rows: neither the last strip of a map read
    by a convolution (released up to its bottom edge) nor the whole small maps of levels 3 to
    5 read by a transposed convolution, which would otherwise be held through every level
    above them."""
    nodes = tracked_streams(monkeypatch)
    packed = extract_bayer_channels(mosaic(np.random.default_rng(8), 256, 64))    # 128 x 32 packed
    run_in_strips(sane_model, 0, packed, 16, min_strip_pixels=0)
    held = {f"{type(n).__name__} {getattr(getattr(n, 'layer', None), 'path', '')} ({n.height} rows)":
            sum(int(c[1] - c[0]) for c in n.chunks) for n in nodes}
    assert len(nodes) > 100 and not {name: rows for name, rows in held.items() if rows}


def streamed_requests(monkeypatch):
    """Per row stream, counted during a render: the convolutions that computed its rows, and
    the requests for rows that spanned more than one of its chunks (each such a copy)."""
    convs, spanning = {}, {}
    produce, rows = strips._ConvRows.produce, strips._Rows._rows

    def counted_produce(self, a, b):
        convs[self] = convs.get(self, 0) + 1
        return produce(self, a, b)

    def counted_rows(self, a, b):
        if sum(start < b and end > a for start, end, _ in self.chunks) > 1:
            spanning[self] = spanning.get(self, 0) + 1
        return rows(self, a, b)

    monkeypatch.setattr(strips._ConvRows, "produce", counted_produce)
    monkeypatch.setattr(strips._Rows, "_rows", counted_rows)
    return convs, spanning


@pytest.mark.slow
def test_a_map_read_by_several_branches_is_computed_and_copied_once_per_strip(sane_model, monkeypatch):
    """The branches of a block read its input with different halos (1 to 4 rows past the strip
    for 3x3 to 9x9): the input is computed once per strip, as far as the farthest branch reads,
    not once per branch for the few rows each adds; and its rows around a strip's seam are
    joined once, the other branches reading slices of that copy."""
    convs, spanning = streamed_requests(monkeypatch)
    nodes = tracked_streams(monkeypatch)
    packed = extract_bayer_channels(mosaic(np.random.default_rng(9), 256, 64))    # 128 x 32 packed
    got = run_in_strips(sane_model, 0, packed, 16, min_strip_pixels=0)
    np.testing.assert_allclose(got, sane_model(packed[None])[0][0].numpy(), atol=1e-4)
    count = 128 // 16
    level_1 = [n for n in nodes if n.height == 128 and not n.replay]
    shared = [n for n in level_1 if len(n.consumers) >= 3]      # block inputs read by 3-4 branches
    assert len(shared) >= 5
    # (conv_l1_d1's private copy for pool1 is computed again each time level 2 replays conv_l2_d1)
    pooled = {source for pool in nodes if isinstance(pool, strips._PoolRows) for source in pool.sources}
    pooled |= {n for n in nodes if n.consumers and set(n.consumers) <= pooled}
    computed = {n.layer.path: convs[n] for n in level_1 if isinstance(n, strips._ConvRows) and n in convs
                and n not in pooled}
    assert len(computed) > 50 and max(computed.values()) <= count + 1, computed
    copies = {f"{type(n).__name__} read by {len(n.consumers)}": spanning.get(n, 0) for n in shared}
    assert max(copies.values()) <= count + 1, copies


@pytest.mark.slow
def test_any_size_renders_and_is_cropped_back(sane_model):
    rng = np.random.default_rng(6)
    raw = mosaic(rng, 70, 98)                       # packs to 35 x 49, padded to 48 x 64
    in_strips = render.render(sane_model, raw, 0, tile_size=16)
    assert in_strips.shape == (70, 98, 3)
    np.testing.assert_allclose(in_strips, render.render(sane_model, raw, 0, tile_size=0), atol=1e-4)
    padded, _ = pad_to_multiple(extract_bayer_channels(raw))
    np.testing.assert_allclose(in_strips, sane_model(padded[None])[0][0, :70, :98].numpy(), atol=1e-4)
    # a single-output view of one level renders too (level 3: 1/8 of the mosaic, rounded down)
    view = level_model(sane_model, 3)
    assert render.render(view, raw, 3, tile_size=8).shape == (8, 12, 3)


@pytest.mark.slow
def test_render_pads_then_crops_without_changing_aligned_frames(full_model):
    rng = np.random.default_rng(1)
    raw = mosaic(rng, 64, 96)
    direct = full_model(extract_bayer_channels(raw)[None])
    for level in (0, 3):
        for tile_size in (0, None):
            rendered = render.render(level_model(full_model, level), raw, level, tile_size)
            # strips sum the same products in another order: float32 rounding, well inside 1e-4
            np.testing.assert_allclose(rendered, direct[level][0].numpy(), atol=1e-5)
    odd = render.render(full_model, mosaic(rng, 70, 98), 0)
    assert odd.shape == (70, 98, 3)


@pytest.mark.slow
def test_progress_counts_every_output_row(sane_model):
    counts = []
    render.render(sane_model, mosaic(np.random.default_rng(7), 70, 98), 0, tile_size=16, progress=counts.append)
    assert sum(counts) == 70 and len(counts) == 3      # strips of 32 output rows: 32, 32, 6


def test_strips_refuse_what_they_cannot_run(full_model):
    with pytest.raises(ValueError, match="multiple of 16"):
        run_in_strips(full_model, 0, np.zeros((40, 64, 4), np.float32), 16)
    with pytest.raises(ValueError, match="no output for level 1"):
        run_in_strips(level_model(full_model, 0), 1, np.zeros((32, 32, 4), np.float32), 16)


@pytest.mark.slow
def test_level_1_with_instance_norm_still_equals_the_whole_frame():
    """instance_norm_level_1=True (the PyTorch port's choice) puts instance norm in level 1:
    those maps are then held whole (exact statistics) instead of streamed, still exact."""
    model = PyNET(instance_norm_level_1=True, level=1)
    assign_sane_weights(model, np.random.default_rng(8))
    packed = extract_bayer_channels(mosaic(np.random.default_rng(9), 64, 64))
    got = run_in_strips(model, 1, packed, 16)
    np.testing.assert_allclose(got, model(packed[None])[0][0].numpy(), atol=1e-4)


# ---------------------------------------------------------------------------------------
# inputs, crops and sizes

def test_reference_crop_is_the_top_left_1472x1984_packed_pixels():
    raw = np.random.default_rng(2).integers(0, 1024, (2976, 3968)).astype(np.uint16)
    packed = render.pack(raw, "reference")
    assert packed.shape == (1472, 1984, 4)
    np.testing.assert_array_equal(packed[..., 2], raw[0:2944:2, 0:3968:2] / np.float32(1020))  # R
    np.testing.assert_array_equal(render.pack(raw[:100, :100]), extract_bayer_channels(raw[:100, :100]))
    with pytest.raises(UserError, match="crop=reference needs a mosaic of at least 2944x3968"):
        render.pack(raw[:2942], "reference")
    assert render.output_rows((2976, 3968), 0, "reference") == 2944
    assert render.output_rows((2976, 3968), 0) == 2976
    assert render.output_rows((70, 98), 3) == 8


def test_inputs_are_files_folders_or_lists_of_them(tmp_path):
    folder = tmp_path / "shots"
    folder.mkdir()
    for name in ("b.png", "a.PNG", "notes.txt"):
        (folder / name).write_bytes(b"")
    single = tmp_path / "one.png"
    single.write_bytes(b"")
    assert test_model.list_inputs(str(single)) == [str(single)]
    assert test_model.list_inputs(f"{single},{folder}") == [str(single), str(folder / "a.PNG"), str(folder / "b.png")]
    assert test_model.list_inputs(f"{folder}, {folder / 'b.png'}") == [str(folder / "a.PNG"), str(folder / "b.png")]
    with pytest.raises(UserError, match="missing.png: no such file or folder"):
        test_model.list_inputs(f"{single},{tmp_path / 'missing.png'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no PNG mosaics found"):
        test_model.list_inputs(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="folder not found"):
        test_model.list_inputs(str(tmp_path / "absent") + "/")


def test_automatic_choice_bounds_the_pixels_held():
    assert render.auto_tile_size(256, 256) == 0                     # small: the whole frame
    assert render.auto_tile_size(736, 1024) > 0   # 3 MP: measured 2.51 GiB whole, so strips
    rows = render.auto_tile_size(1488, 1984)                         # 12 MP: strips
    assert rows % 8 == 0 and render.MIN_STRIP_ROWS <= rows and rows * 1984 <= render.STRIP_PIXELS
    assert render.auto_tile_size(100000, 16) == render.MAX_STRIP_ROWS  # tall and thin
    assert render.auto_tile_size(16, 100000) == render.MIN_STRIP_ROWS


@pytest.mark.parametrize("shape, tile_size, crop", [
    ((448, 448), None, "none"), ((450, 454), None, "none"), ((1296, 2048), None, "none"),
    ((1294, 2046), None, "none"), ((2976, 3968), None, "none"), ((2976, 3968), None, "reference"),
    ((2976, 3968), 0, "none"), ((448, 448), 24, "none")])
def test_strip_rows_is_what_render_will_choose(shape, tile_size, crop, monkeypatch):
    """test_model.py decides before reading any mosaic; render decides on the padded packing."""
    import tensorflow as tf

    chosen = []

    def whole(model, level):
        def run(x):
            chosen.append(0)
            return tf.zeros((1, 2 * x.shape[1], 2 * x.shape[2], 3))
        return run

    def strips(model, level, padded, rows, out_height, progress):
        chosen.append(rows)
        return np.zeros((2 * padded.shape[0], 2 * padded.shape[1], 3), np.float32)

    monkeypatch.setattr(render, "level_function", whole)
    monkeypatch.setattr(render, "run_in_strips", strips)
    monkeypatch.setattr(runtime, "return_freed_memory", lambda: None)
    render.render(None, np.zeros(shape, np.uint16), 0, tile_size, crop)
    assert chosen == [render.strip_rows(shape, tile_size, crop)]
    large = shape[0] * shape[1] > 4 * render.WHOLE_FRAME_PIXELS
    assert (chosen[0] > 0) == (large if tile_size is None else tile_size > 0)


@pytest.mark.parametrize("shape, tile_size, expected", [
    ((1296, 2048), "none", ["malloc", "load"]), ((64, 64), "none", ["load"]),
    ((64, 64), "16", ["malloc", "load"]), ((1296, 2048), "0", ["load"])])
def test_mallocs_threshold_is_set_before_the_weights_when_a_frame_goes_in_strips(shape, tile_size, expected,
                                                                                 tmp_path, monkeypatch):
    """Set afterwards, the restored weights sit among freed heap blocks and the strips peak
    higher (runtime.return_freed_memory); set for small frames, each photo is slower."""

    calls = []
    monkeypatch.setattr(runtime, "return_freed_memory", lambda: calls.append("malloc"))
    monkeypatch.setattr(checkpoints, "load_model", lambda level, prefix, precision: calls.append("load"))
    monkeypatch.setattr(checkpoints, "resolve", lambda args: ("unused", "1"))
    monkeypatch.setattr(render, "render", lambda model, mosaic, *rest: np.full(mosaic.shape + (3,), 0.5, np.float32))
    images.write_png(str(tmp_path / "frame.png"), np.random.default_rng(0).integers(0, 1024, shape, np.uint16))
    cli.run(test_model.main, ["level=0", f"input={tmp_path / 'frame.png'}", f"output_dir={tmp_path / 'out'}",
                                f"tile_size={tile_size}"])
    assert calls == expected
    assert (tmp_path / "out" / "frame_level_0_iteration_1.png").exists()


# ---------------------------------------------------------------------------------------
# the script

@pytest.fixture(scope="module")
def fabricated_release(full_model, module_tmp):
    """A folder laid out as a user's: models/original/pynet_level_0.ckpt with random weights
    (written by our saver under the reference's keys) and two full-resolution mosaics."""
    root = module_tmp("user")
    rng = np.random.default_rng(0)
    saved = [v.numpy() for v in full_model.weights]
    assign_sane_weights(full_model, rng)
    save_checkpoint(full_model, str(root / "models" / "original" / "pynet_level_0.ckpt"))
    for var, value in zip(full_model.weights, saved):
        var.assign(value)
    folder = root / "raw_images" / "test" / "huawei_full_resolution"
    folder.mkdir(parents=True)
    # 100 x 150 packs to 50 x 75: not a multiple of 16, so padding and cropping are exercised
    Image.fromarray(rng.integers(0, 1024, (100, 150)).astype(np.uint16)).save(folder / "odd.png")
    Image.fromarray(rng.integers(0, 256, (64, 64)).astype(np.uint8)).save(folder / "eight_bit.png")
    return root


def run_script(cwd, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "test_model.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def read_png16(path):
    import png

    width, height, rows, info = png.Reader(filename=str(path)).read()
    return np.array([list(r) for r in rows], np.uint16).reshape(height, width, info["planes"]), info


@pytest.mark.slow
def test_renders_released_weights_end_to_end(fabricated_release):
    result = run_script(fabricated_release, "level=0", "orig=true", "bits=16", "use_gpu=false")
    assert result.returncode == 0, result.stderr
    out = fabricated_release / "results" / "full-resolution"
    image, info = read_png16(out / "odd_level_0_iteration_None.png")
    assert image.shape == (100, 150, 3) and info["bitdepth"] == 16
    with Image.open(out / "eight_bit_level_0_iteration_None.png") as picture:
        assert picture.size == (64, 64)


@pytest.mark.slow
def test_input_files_and_folders_to_an_output_folder(fabricated_release, full_model, tmp_path):
    folder = fabricated_release / "raw_images" / "test" / "huawei_full_resolution"
    extra = tmp_path / "extra"
    extra.mkdir()
    Image.fromarray(np.random.default_rng(3).integers(0, 1024, (40, 72)).astype(np.uint16)).save(extra / "shot.png")
    result = run_script(fabricated_release, "orig=true", f"input={folder / 'odd.png'},{extra}",
                        f"output_dir={tmp_path / 'out'}", "tile_size=16", "bits=16")
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["odd_level_0_iteration_None.png", "shot_level_0_iteration_None.png"]
    assert f"{extra / 'shot.png'} -> {tmp_path / 'out' / 'shot_level_0_iteration_None.png'}" in result.stdout
    # the script's strips equal this process's whole-frame render of the same checkpoint
    saved = [v.numpy() for v in full_model.weights]
    try:
        load_checkpoint(full_model, str(fabricated_release / "models" / "original" / "pynet_level_0.ckpt"))
        for name, source in (("odd", folder / "odd.png"), ("shot", extra / "shot.png")):
            expected = render.render(full_model, np.asarray(Image.open(source)), 0, tile_size=0)
            got, _ = read_png16(tmp_path / "out" / f"{name}_level_0_iteration_None.png")
            np.testing.assert_allclose(got / 65535.0, np.clip(expected, 0, 1), atol=1e-4 + 0.5 / 65535)
    finally:
        for var, value in zip(full_model.weights, saved):
            var.assign(value)


def test_missing_checkpoint_and_folder_are_one_line_errors(tmp_path):
    (tmp_path / "raw_images" / "test" / "huawei_full_resolution").mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32), np.uint16)).save(tmp_path / "raw_images" / "test" /
                                                        "huawei_full_resolution" / "a.png")
    result = run_script(tmp_path, "level=1")
    assert result.returncode == 1
    assert result.stderr.strip() == ("error: no checkpoint pynet_level_1_iteration_*.ckpt in models/: train level 1 "
                                     "first (python train_model.py level=1) or use the released weights with orig=true")
    result = run_script(tmp_path, "orig=true")
    assert result.returncode == 1
    assert "models/original/pynet_level_0.ckpt: the authors' released weights are not there" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_script(tmp_path, "dataset_dir=elsewhere/")
    assert result.returncode == 1 and "huawei_full_resolution/: folder not found" in result.stderr
    result = run_script(tmp_path, "orig=true", "input=nothing.png")
    assert result.returncode == 1 and result.stderr.strip() == "error: nothing.png: no such file or folder"
    result = run_script(tmp_path, "bits=12")
    assert result.returncode == 2 and result.stderr.strip() == "error: bits=12: expected one of 8, 16"
    result = run_script(tmp_path, "tile_size=-1")
    assert result.returncode == 2 and "tile_size=-1" in result.stderr


def test_output_names_follow_the_reference(tmp_path):
    assert test_model.output_path("results/full-resolution/", "x/0.png", 0, "None") == \
        "results/full-resolution/0_level_0_iteration_None.png"
    models = f"{tmp_path}/models/"
    os.makedirs(models)
    for i in (5000, 20000):
        open(f"{models}pynet_level_2_iteration_{i}.ckpt.index", "wb").close()
    params = {"orig": False, "level": 2, "restore_iter": 5000, "models_dir": models}
    assert checkpoints.resolve(params) == (f"{models}pynet_level_2_iteration_5000.ckpt", "5000")
    assert checkpoints.resolve({**params, "restore_iter": None})[1] == "20000"  # the latest
    with pytest.raises(UserError, match=r"iteration_7\.ckpt: no checkpoint there \(restore_iter=7\); the latest "
                                        r"level-2 one is iteration 20000"):
        checkpoints.resolve({**params, "restore_iter": 7})
    with pytest.raises(UserError):
        checkpoints.resolve({**params, "restore_iter": None, "models_dir": "/nonexistent/"})


def test_rendering_asks_onednn_for_the_system_allocator_unless_told_otherwise(monkeypatch):
    monkeypatch.delenv("TF_ONEDNN_USE_SYSTEM_ALLOCATOR", raising=False)
    runtime.bound_memory()
    assert os.environ["TF_ONEDNN_USE_SYSTEM_ALLOCATOR"] == "1"
    monkeypatch.setenv("TF_ONEDNN_USE_SYSTEM_ALLOCATOR", "0")
    runtime.bound_memory()
    assert os.environ["TF_ONEDNN_USE_SYSTEM_ALLOCATOR"] == "0"
