"""export_model.py: SavedModel and TFLite artefacts, run in a fresh process without this repo,
against test_model.py's own rendering of the same checkpoint; test_model.py model=PATH."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import checkpoints
import cli
import deployed
import export_model
import images
import render
import serving
import test_model
from camera import extract_bayer_channels
from checkpoints import load_checkpoint, save_checkpoint
from cli import UsageError, UserError
from helpers import ROOT, assign_sane_weights
from render import pad_to_multiple

# one worker builds this module's shared fixtures (pytest-xdist --dist loadgroup)
pytestmark = pytest.mark.xdist_group("export")

ITERATION = 1000
SMALL = (64, 64)     # level 0's TFLite size: a multiple of 32 mosaic pixels, so no padding inside
# Level 5 for the reduced-precision TFLite models: converting the whole network takes ~30 s
# per variant here, its 1/32-scale level ~5 s. 260x252 gives it 8x7 pixels, and packs to
# 130x126, so the TFLite graph pads (to 144x128) and crops too.
LARGE = (260, 252)


def mosaic(rng, height, width):
    return rng.integers(0, 1024, (height, width)).astype(np.uint16)


def psnr(a, b):
    return 10 * np.log10(1.0 / np.mean((np.asarray(a, np.float64) - b) ** 2))


def start_script(script, cwd, *args):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process):
    stdout, stderr = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_script(script, cwd, *args):
    return finish(start_script(script, cwd, *args))


# ---------------------------------------------------------------------------------------
# artefacts from a seeded checkpoint, and test_model.py's renders of the same weights

@pytest.fixture(scope="module")
def release(full_model, module_tmp):
    """A seeded checkpoint (models/pynet_level_{0,5}_iteration_1000.ckpt), the mosaics, the
    artefacts exported in this process from that checkpoint, render.render's float output
    for each mosaic at levels 0 and 5, and the processes started on the artefacts as soon as
    they exist ("background": the conversions here run on one core, those on the other).
    full_model's weights are restored before use."""
    root = module_tmp("export")
    rng = np.random.default_rng(20)
    # 64x64: aligned; 70x98 packs to 35x49 (padded to 48x64, cropped back); 71x99: odd sides
    mosaics = {"square": mosaic(rng, *SMALL), "odd": mosaic(rng, 70, 98), "uneven": mosaic(rng, 71, 99),
               "large": mosaic(rng, *LARGE)}
    for name, raw in mosaics.items():
        np.save(root / f"{name}.npy", raw)
    inputs = write_mosaics(root / "in", mosaics, ["square", "odd"])
    saved = [v.numpy() for v in full_model.weights]
    background = {}
    try:
        assign_sane_weights(full_model, rng)
        prefix = str(root / "models" / f"pynet_level_0_iteration_{ITERATION}.ckpt")
        save_checkpoint(full_model, prefix)
        for suffix in (".index", ".data-00000-of-00001"):
            shutil.copy(prefix + suffix, str(root / "models" / f"pynet_level_5_iteration_{ITERATION}.ckpt") + suffix)
        # export_model.py itself: level 5 from models_dir by restore_iter, as fp16 TFLite
        background["cli"] = start_script(
            "export_model.py", root, "level=5", f"restore_iter={ITERATION}", "models_dir=models/", "format=tflite",
            f"size={LARGE[0]}x{LARGE[1]}", "precision=fp16", "output_type=float", "output=cli/l5_fp16.tflite")
        for var in full_model.weights:
            var.assign(np.zeros(var.shape, np.float32))
        load_checkpoint(full_model, prefix)     # what is exported is what the checkpoint holds
        # an earlier export at the output is replaced
        (root / "sm_l0").mkdir()
        (root / "sm_l0" / "saved_model.pb").write_bytes(b"old")
        export_model.export(full_model, 0, ITERATION, "saved_model", str(root / "sm_l0"))
        export_model.export(full_model, 5, checkpoints.RELEASED_ITERATION, "saved_model", str(root / "sm_l5_float"),
                            output_type="float")
        background["saved_models"] = start_fresh(root, "saved_models", {
            "sm_l0": (str(root / "sm_l0"), ["square", "odd", "uneven"]),
            "sm_l5_float": (str(root / "sm_l5_float"), ["square", "odd", "large"])})
        background["render_sm"] = start_script("test_model.py", root, f"model={root / 'sm_l0'}", f"input={inputs}",
                                               f"output_dir={root / 'out_sm'}")
        sizes = {"l0_fp32": export_model.export(full_model, 0, checkpoints.RELEASED_ITERATION, "tflite",
                                                str(root / "l0.tflite"), "float", SMALL)}
        sizes["l5_dynamic"] = export_model.export(full_model, 5, ITERATION, "tflite", str(root / "l5_dynamic.tflite"),
                                                  "uint8", LARGE, quantize="dynamic")
        expected = {(level, name): render.render(full_model, raw, level)
                    for level in (0, 5) for name, raw in mosaics.items() if level == 5 or name != "large"}
    except BaseException:
        for process in background.values():
            process.kill()
        raise
    finally:
        for var, value in zip(full_model.weights, saved):
            var.assign(value)
    return {"root": root, "mosaics": mosaics, "expected": expected, "sizes": sizes, "background": background}


@pytest.fixture(scope="module")
def cli_export(release):
    return finish(release["background"]["cli"])


CHILD = r'''
"""Run exported models as a user would, with TensorFlow and LiteRT only: nothing of the
PyNET repository on the path or imported. TensorFlow only for SavedModels."""
import json, os, sys
import numpy as np

repo, folder, name = sys.argv[1:4]
assert all(os.path.abspath(entry or os.curdir) != repo for entry in sys.path), sys.path

results = {}
for job, (path, inputs) in json.load(open(os.path.join(folder, name + ".json"))).items():
    if os.path.isdir(path):
        import tensorflow as tf

        serve = tf.saved_model.load(path).signatures["serving_default"]
        run = lambda raw: {key: value.numpy() for key, value in serve(mosaic=tf.constant(raw)).items()}
    else:
        from ai_edge_litert.interpreter import Interpreter

        run = Interpreter(model_path=path, num_threads=2).get_signature_runner("serving_default")
        run = lambda raw, run=run: run(mosaic=raw)
    for mosaic in inputs:
        outputs = run(np.load(os.path.join(folder, mosaic + ".npy")))
        assert sorted(outputs) == ["iteration", "level", "rgb"], sorted(outputs)
        results[f"{job}/{mosaic}"] = outputs["rgb"]
        results[f"{job}/info"] = np.array([int(outputs["level"]), int(outputs["iteration"])])
ours = [m for m, module in list(sys.modules.items())
        if os.path.abspath(getattr(module, "__file__", None) or os.sep).startswith(repo + os.sep)]
assert not ours, ours
np.savez(os.path.join(folder, name + ".npz"), **results)
'''


def start_fresh(root, name, jobs):
    """Run ``jobs`` ({job: (artefact, [mosaic names])}) in a fresh `python -I` process outside
    the repository; its outputs land in ``root/name.npz``."""
    (root / f"{name}.json").write_text(json.dumps(jobs))
    (root / "child.py").write_text(CHILD)
    return subprocess.Popen([sys.executable, "-I", str(root / "child.py"), ROOT, str(root), name], cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def fresh(release, cli_export):
    """Every artefact's outputs, {"job/mosaic": array, "job/info": [level, iteration]}."""
    root = release["root"]
    jobs = {"l0": (str(root / "l0.tflite"), ["square"]),
            "l5_dynamic": (str(root / "l5_dynamic.tflite"), ["large"])}
    if cli_export.returncode == 0:
        jobs["l5_fp16"] = (str(root / "cli" / "l5_fp16.tflite"), ["large"])
    outputs = {}
    for name, process in (("saved_models", release["background"]["saved_models"]),
                          ("tflite", start_fresh(root, "tflite", jobs))):
        done = finish(process)
        assert done.returncode == 0, done.stderr[-3000:]
        with np.load(root / f"{name}.npz") as arrays:
            outputs.update(arrays)
    return outputs


def test_saved_model_gives_test_model_s_8_bit_pixels(release, fresh):
    for name in ("square", "odd", "uneven"):
        got = fresh[f"sm_l0/{name}"]
        assert got.dtype == np.uint8
        # an odd last row and column are dropped, as extract_bayer_channels drops them
        np.testing.assert_array_equal(got, images.to_uint(release["expected"][(0, name)]))
    assert fresh["sm_l0/odd"].shape == (70, 98, 3) and fresh["sm_l0/uneven"].shape == (70, 98, 3)
    assert list(fresh["sm_l0/info"]) == [0, ITERATION]


def test_saved_model_float_output_and_other_levels(release, fresh):
    for name in ("square", "odd", "large"):
        got, expected = fresh[f"sm_l5_float/{name}"], release["expected"][(5, name)]
        assert got.dtype == np.float32 and got.shape == expected.shape          # 2x3 for 70x98, rounded down
        np.testing.assert_allclose(got, np.clip(expected, 0, 1), atol=1e-5)
    assert fresh["sm_l5_float/odd"].shape == (2, 3, 3)
    assert list(fresh["sm_l5_float/info"]) == [5, checkpoints.RELEASED_ITERATION]


def test_tflite_float32_matches_keras(release, fresh):
    got, expected = fresh["l0/square"], np.clip(release["expected"][(0, "square")], 0, 1)
    assert got.dtype == np.float32 and got.shape == (64, 64, 3)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert list(fresh["l0/info"]) == [0, checkpoints.RELEASED_ITERATION]
    # the weights are in the file: 47.5M float32 parameters
    assert release["sizes"]["l0_fp32"] > 4 * 47_000_000


def test_reduced_precision_tflite_stays_close_to_float32(release, cli_export, fresh):
    assert cli_export.returncode == 0, cli_export.stderr
    assert re.fullmatch(rf"note: LiteRT needs about 0\.3 GiB to run a model for {LARGE[0]}x{LARGE[1]} mosaics \(about "
                        rf"4\.5 GiB per megapixel\)\n"
                        rf"models/pynet_level_5_iteration_{ITERATION}.ckpt -> cli/l5_fp16.tflite \(\d+\.\d MiB\)",
                        cli_export.stdout.strip()), cli_export.stdout
    expected = np.clip(release["expected"][(5, "large")], 0, 1)
    fp16, dynamic = fresh["l5_fp16/large"], fresh["l5_dynamic/large"]
    assert fp16.dtype == np.float32 and dynamic.dtype == np.uint8 and dynamic.shape == (8, 7, 3)
    # level 5 alone, with these random weights (README "Deploying" has level 0's figures):
    # measured 57-59 dB for float16 weights, 23-24 dB for int8 weights
    assert psnr(fp16, expected) > 50
    assert 20 < psnr(dynamic / 255.0, expected) < 40
    assert list(fresh["l5_fp16/info"]) == [5, ITERATION]
    # int8 weights take half the bytes of float16 ones
    assert 0.4 < release["sizes"]["l5_dynamic"] / os.path.getsize(release["root"] / "cli" / "l5_fp16.tflite") < 0.6


# ---------------------------------------------------------------------------------------
# the graph's packing and padding, against the NumPy functions test_model.py uses

@pytest.mark.parametrize("shape", [(2, 2), (6, 10), (71, 99), (64, 96)])
def test_packing_and_padding_in_the_graph_equal_numpy_s(shape):
    raw = mosaic(np.random.default_rng(sum(shape)), *shape)
    graph = tf.function(lambda r: serving.pad_packed(serving.pack_mosaic(r)),
                        input_signature=[tf.TensorSpec([None, None], tf.uint16)])
    # bit for bit, also in a graph, where Grappler would turn a plain division into a multiplication
    np.testing.assert_array_equal(graph(tf.constant(raw)).numpy(), pad_to_multiple(extract_bayer_channels(raw))[0])


# ---------------------------------------------------------------------------------------
# test_model.py model=PATH

def write_mosaics(folder, mosaics, names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(mosaics[name]).save(folder / f"{name}.png")
    return folder


def test_test_model_renders_with_a_saved_model(release):
    result = finish(release["background"]["render_sm"])
    assert result.returncode == 0, result.stderr
    out = release["root"] / "out_sm"
    assert sorted(os.listdir(out)) == [f"odd_level_0_iteration_{ITERATION}.png",
                                       f"square_level_0_iteration_{ITERATION}.png"]
    for name in ("square", "odd"):
        with Image.open(out / f"{name}_level_0_iteration_{ITERATION}.png") as picture:
            np.testing.assert_array_equal(np.asarray(picture), images.to_uint(release["expected"][(0, name)]))


def test_test_model_renders_with_a_tflite_file(release, tmp_path, capsys):
    import png

    # in this process (the script's process is tested with the SavedModel above): no second
    # TensorFlow start-up
    test_model.main([f"model={release['root'] / 'l0.tflite'}", f"input={release['root'] / 'in' / 'square.png'}",
                     "bits=16", f"output_dir={tmp_path / 'out'}"])
    assert f"square.png -> {tmp_path / 'out' / 'square_level_0_iteration_None.png'}" in capsys.readouterr().out
    width, height, rows, _ = png.Reader(filename=str(tmp_path / "out" / "square_level_0_iteration_None.png")).read()
    got = np.array([list(r) for r in rows], np.float64).reshape(height, width, 3) / 65535
    np.testing.assert_allclose(got, np.clip(release["expected"][(0, "square")], 0, 1), atol=1e-4 + 0.5 / 65535)


def test_what_an_exported_model_cannot_render_is_one_line(release):
    tflite = str(release["root"] / "l0.tflite")
    exported = deployed.load_for_rendering(tflite, bits=16, stretch=False)
    assert (exported.level, exported.iteration, exported.float_output, exported.size) == (0, "None", True, SMALL)
    with pytest.raises(UserError) as error:
        exported(release["mosaics"]["odd"])
    assert str(error.value) == (f"model={tflite}: takes 64x64 mosaics, not 70x98 (export one with format=tflite "
                                f"size=70x98, or a SavedModel, which takes any size)")
    with pytest.raises(UsageError, match="bits=16: .* returns 8-bit pictures"):
        deployed.load_for_rendering(str(release["root"] / "l5_dynamic.tflite"), bits=16, stretch=False)
    with pytest.raises(UsageError, match="stretch=true: needs the network's unclipped output"):
        deployed.load_for_rendering(tflite, bits=8, stretch=True)
    with pytest.raises(UserError, match="no such SavedModel folder or .tflite file"):
        deployed.load(str(release["root"] / "absent"))
    with pytest.raises(UserError, match="a folder without saved_model.pb"):
        deployed.load(str(release["root"] / "models"))


# ---------------------------------------------------------------------------------------
# bad input: one line, non-zero exit, nothing written

@pytest.mark.parametrize("args,code,message", [
    (["format=onnx"], 2, "error: format=onnx: expected one of saved_model, tflite"),
    (["format=tflite", "size=63x64"], 2, "error: size=63x64: expected HEIGHTxWIDTH of the mosaic in pixels, both "
                                         "positive multiples of 2 (e.g. 1024x1024)"),
    (["format=tflite", "size=2x2"], 2, "error: size=2x2: the network's smallest input is a 32x32 mosaic"),
    (["format=tflite", "size=30x64"], 2, "error: size=30x64: the network's smallest input is a 32x32 mosaic"),
    (["format=tflite", "size=100000x100000"], 2, "error: size=100000x100000: 10000 MP would need about "
                                                 "45000 GiB to run in LiteRT"),
    (["format=tflite", "output=photo.jpg"], 1, "error: output=photo.jpg: an existing file that is not a .tflite "
                                               "model; refusing to replace it"),
    (["format=tflite", "size=big"], 2, "error: size=big: expected HEIGHTxWIDTH"),
    (["size=64x64"], 2, "error: size=64x64: applies to format=tflite only"),
    (["format=tflite", "precision=fp16", "quantize=dynamic"], 2, "error: quantize=dynamic stores int8 weights"),
    (["restore_iter=5"], 1, "error: models/pynet_level_0_iteration_5.ckpt: no checkpoint there"),
    (["level=2"], 1, "error: no checkpoint pynet_level_2_iteration_*.ckpt in models/: train level 2 first"),
    (["orig=true"], 1, "error: models/original/pynet_level_0.ckpt: the authors' released weights are not there"),
    (["output=taken"], 1, "error: output=taken: is a file; a SavedModel is a folder"),
    (["output=notes/"], 1, "error: output=notes/: holds files that are not an earlier export's (a.txt)"),
    (["output=mixed/"], 1, "error: output=mixed/: holds files that are not an earlier export's (mine.txt)"),
    (["format=tflite", "output=notes"], 1, "error: output=notes: is a folder; format=tflite writes one file"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, code, message):
    (tmp_path / "taken").write_text("keep")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("keep")
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8 a user's photo")
    (tmp_path / "mixed" / "variables").mkdir(parents=True)
    (tmp_path / "mixed" / "saved_model.pb").write_bytes(b"an earlier export")
    (tmp_path / "mixed" / "mine.txt").write_text("keep")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    result = run_script("export_model.py", tmp_path, *args)
    assert result.returncode == code
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith(message), result.stderr
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "taken").read_text() == "keep"
    assert (tmp_path / "photo.jpg").read_bytes() == b"\xff\xd8 a user's photo"


def test_only_an_earlier_exports_own_files_are_replaced_without_overwrite(tmp_path):
    earlier = tmp_path / "earlier"
    (earlier / "variables").mkdir(parents=True)
    for name in ("saved_model.pb", "fingerprint.pb"):
        (earlier / name).write_bytes(b"x")
    export_model.check_output(str(earlier), "saved_model")            # TensorFlow's own entries only
    (earlier / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"holds files that are not an earlier export's \(notes.txt\)"):
        export_model.check_output(str(earlier), "saved_model")
    export_model.check_output(str(earlier), "saved_model", overwrite=True)
    model = tmp_path / "old.tflite"
    model.write_bytes(b"\x1c\x00\x00\x00TFL3" + bytes(24))        # a flatbuffer's header
    export_model.check_output(str(model), "tflite")
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(UserError, match="an existing file that is not a .tflite model"):
        export_model.check_output(str(tmp_path / "photo.jpg"), "tflite")
    export_model.check_output(str(tmp_path / "photo.jpg"), "tflite", overwrite=True)


def test_a_failed_export_leaves_the_earlier_one_and_no_temporary_files(full_model, tmp_path, monkeypatch):
    output = tmp_path / "exported" / "pynet_level_5"
    output.mkdir(parents=True)
    (output / "saved_model.pb").write_bytes(b"earlier export")

    def interrupted(module, path, signatures=None):
        os.makedirs(path)
        (open(os.path.join(path, "saved_model.pb"), "wb")).close()
        raise KeyboardInterrupt

    monkeypatch.setattr(tf.saved_model, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_model.export(full_model, 5, 0, "saved_model", str(output))
    assert os.listdir(tmp_path / "exported") == ["pynet_level_5"]
    assert (output / "saved_model.pb").read_bytes() == b"earlier export"


def test_default_output_names_say_what_is_inside():
    def output(*tokens):
        return export_model.checked_args(cli.parse_args(list(tokens), export_model.ARGS, "export_model.py"))

    assert output()["output"] == os.path.join("exported", "pynet_level_0")
    args = output("level=1", "format=tflite", "precision=fp16")
    assert args["output"] == os.path.join("exported", "pynet_level_1_1024x1024_fp16.tflite")
    assert args["size"] == (1024, 1024)
    assert output("format=tflite", "size=1024x512", "quantize=dynamic")["output"] == \
        os.path.join("exported", "pynet_level_0_1024x512_dynamic.tflite")
