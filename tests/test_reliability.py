"""Faults and bad inputs across the scripts: each is one `error: ...` line with the right exit
code, and nothing is written (no output, no temporary file, no checkpoint under a final name).

Per script, a table of bad inputs runs ``main`` in-process through ``cli.run`` (as the script's
``__main__`` does); then the faults that need more than a command line: damaged checkpoints (with
the intact earlier one named), NaN weights, a training run gone non-finite, a full disk (a small
tmpfs), temporary files of killed writers, a fresh run into a folder of an older run, a corrupt
JPEG target. Checkpoints are real ones, written by one short level-5 run of the shared model.
"""

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import checkpoints
import cli
import data_pipeline
import dng_to_png
import evaluate_accuracy
import files
import images
import load_dataset
import make_sample_dataset
import test_model
import train_model
import trainer
from helpers import natural_mosaic, write_dng

DATA = ".data-00000-of-00001"


# ---------------------------------------------------------------------------------------
# helpers

def snapshot(root):
    """Every file and folder under ``root`` with its size and modification time."""
    found = {}
    for folder, dirs, names in os.walk(root):
        for name in dirs + names:
            path = os.path.join(folder, name)
            stat = os.lstat(path)
            found[os.path.relpath(path, root)] = (stat.st_size, stat.st_mtime_ns) if name in names else "dir"
    return found


def run_main(main, argv, capsys):
    """(exit code, stderr lines) of ``main`` run as its script runs it."""
    code = cli.run(main, [str(a) for a in argv])
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


def assert_one_line(code, lines, want_code, pattern):
    errors = [line for line in lines if line.startswith("error: ")]
    assert code == want_code, lines
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    assert re.search(pattern, errors[0]), errors[0]
    assert not any("Traceback" in line for line in lines)


def dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def write_mosaic(path, array):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint16)).save(str(path))
    return str(path)


def replace_file(path, data):
    """Write ``data`` as a new file at ``path`` (a hard link elsewhere keeps the old content)."""
    if os.path.lexists(path):
        os.remove(path)
    with open(path, "wb") as handle:
        handle.write(data)


def truncate(path, keep=0.5):
    with open(path, "rb") as handle:
        data = handle.read()
    replace_file(path, data[: int(len(data) * keep)])


def link_tree(source, target):
    """A copy of ``source`` made of hard links: cheap for 190 MB checkpoints; damage files with
    replace_file/truncate, which never write through the link."""
    shutil.copytree(source, target, copy_function=os.link)
    return str(target)


def write_nan_checkpoint(source_prefix, prefix):
    """``source_prefix``'s tensors with one NaN, written by TensorFlow's own SaveV2 (our writer refuses)."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(source_prefix)
    keys = sorted(reader.get_variable_to_shape_map())
    tensors = [reader.get_tensor(k) for k in keys]
    tensors[5] = tensors[5].copy()
    tensors[5].flat[0] = np.nan
    for suffix in (".index", DATA):  # never write through a hard link
        if os.path.lexists(prefix + suffix):
            os.remove(prefix + suffix)
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=keys, shape_and_slices=[""] * len(keys), tensors=tensors)
    return prefix


def train_args(data, tmp, **overrides):
    values = dict(level=5, dataset_dir=data, patch_size=32, batch_size=2, models_dir=tmp / "models",
                  results_dir=tmp / "results", progress="false", tensorboard="false", eval_batch_size=1)
    values.update(overrides)
    return train_model.parse_arguments([f"{k}={v}" for k, v in values.items()])


@pytest.fixture(scope="module")
def trained(full_model, sample_dataset, module_tmp):
    """models/ of a short level-5 run: pynet_level_5_iteration_{0,3}.ckpt, each with its
    training state. Read-only: tests take a link_tree copy."""
    saved = [v.numpy() for v in full_model.weights]
    root = module_tmp("trained")
    try:
        trainer.Trainer(train_args(sample_dataset, root, num_train_iters=3, eval_step=3), model=full_model,
                            out=lambda *a: None).run()
    finally:
        for var, value in zip(full_model.weights, saved):
            var.assign(value)
    assert sorted(n for n in os.listdir(root / "models") if n.endswith(".index")) == [
        f"pynet_level_5_iteration_{i}.ckpt{s}.index" for i in (0, 3) for s in ("", ".train_state")]
    return str(root / "models")


@pytest.fixture
def tmpfs(tmp_path):
    """A 2 MB tmpfs (root only; the test is skipped where mounting is not allowed)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                                                       capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=True)   # still busy: detach it all the same


def fill(folder):
    """Fill the file system of ``folder`` up to the last byte."""
    handle = os.open(os.path.join(folder, "filler"), os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(handle, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(handle)


# ---------------------------------------------------------------------------------------
# test_model.py

def x_trans_dng(path):
    cfa = [1, 1, 0, 1, 1, 2, 1, 1, 2, 1, 1, 0, 2, 0, 1, 0, 2, 1, 1, 1, 2, 1, 1, 0, 1, 1, 0, 1, 1, 2,
           0, 2, 1, 2, 0, 1]
    return write_dng(path, np.zeros((48, 48), np.uint16), cfa=cfa, dims=(6, 6))


def a_file(tmp):
    (tmp / "afile").write_text("")
    return tmp / "afile"


def ckpt(models, iteration, suffix=""):
    return os.path.join(models, f"pynet_level_5_iteration_{iteration}.ckpt{suffix}")


def case_table():
    """A table of cases filled by a decorator: name -> (setup, exit code, pattern of the error line)."""
    table = {}

    def case(name, code, pattern):
        def register(setup):
            table[name] = (setup, code, pattern)
            return setup
        return register
    return table, case


RENDER_CASES, render_case = case_table()   # setup(tmp, models) -> extra arguments


@render_case("output_dir is a file", 1, r"output_dir=.*afile: is a file, not a folder")
def _(tmp, models):
    return [f"output_dir={a_file(tmp)}"]


@render_case("output_dir under a file", 1, r"output_dir=.*afile/sub: cannot make this folder, .*afile is a file")
def _(tmp, models):
    return [f"output_dir={a_file(tmp)}/sub"]


@render_case("a text file named .png", 1, r"x\.png: not a PNG file")
def _(tmp, models):
    (tmp / "x.png").write_text("hello")
    return [f"input={tmp / 'x.png'}"]


@render_case("an X-Trans DNG", 1, r"x\.dng: a DNG/TIFF raw file, not a PNG mosaic: convert it first with "
                                  r"python dng_to_png\.py")
def _(tmp, models):
    return [f"input={x_trans_dng(tmp / 'x.dng')}"]


@render_case("a DNG named .png", 1, r"dng\.png: a DNG/TIFF raw file")
def _(tmp, models):
    return [f"input={x_trans_dng(tmp / 'dng.png')}"]


@render_case("an RGB PNG", 1, r"c\.png: expected a single-channel Bayer mosaic .*found a PNG of type RGB, 8-bit")
def _(tmp, models):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp / "c.png")
    return [f"input={tmp / 'c.png'}"]


@render_case("a 9x7 mosaic", 1, r"s\.png: a 9x7 mosaic is too small: at least 32x32")
def _(tmp, models):
    return [f"input={write_mosaic(tmp / 's.png', np.ones((7, 9)))}"]


@render_case("a 1x1 mosaic", 1, r"s\.png: a 1x1 mosaic is too small")
def _(tmp, models):
    return [f"input={write_mosaic(tmp / 's.png', np.ones((1, 1)))}"]


@render_case("a truncated PNG", 1, r"t\.png: cannot read the PNG .*truncated")
def _(tmp, models):
    truncate(write_mosaic(tmp / "t.png", np.arange(4096).reshape(64, 64) % 1000))
    return [f"input={tmp / 't.png'}"]


@render_case("a 12-bit mosaic", 1, rf"b\.png: values up to {int((natural_mosaic(64, 64) * 4 + 3).max())} exceed the "
                                   r"10-bit range .*range_check=false")
def _(tmp, models):
    return [f"input={write_mosaic(tmp / 'b.png', natural_mosaic(64, 64) * 4 + 3)}"]


@render_case("a folder with only a killed writer's temporary", 1, r"in: no PNG mosaics found")
def _(tmp, models):
    write_mosaic(tmp / "in" / f".a.tmp{dead_pid()}.png", np.ones((64, 64)))
    return [f"input={tmp / 'in'}"]


@render_case("restore_iter of no checkpoint", 1, r"iteration_2\.ckpt: no checkpoint there \(restore_iter=2\); "
                                                 r"the latest level-5 one is iteration 3")
def _(tmp, models):
    return ["restore_iter=2"]


@render_case("orig=true with restore_iter", 2, r"leave out restore_iter")
def _(tmp, models):
    return ["orig=true", "restore_iter=3"]


@render_case("the latest .data truncated", 1,
             r"iteration_3\.ckpt\.data-00000-of-00001: damaged or truncated: .* reading generator/Variable_\d+.*; "
             r"the latest intact level-5 checkpoint before it is .*iteration_0\.ckpt: use restore_iter=0$")
def _(tmp, models):
    truncate(ckpt(models, 3, DATA))
    return []


@render_case("the latest .index without its .data", 1,
             r"iteration_3\.ckpt\.data-00000-of-00001: missing .*use restore_iter=0$")
def _(tmp, models):
    os.remove(ckpt(models, 3, DATA))
    return []


@render_case("the latest .index truncated", 1,
             r"iteration_3\.ckpt\.index: damaged, cannot read the checkpoint's index .*use restore_iter=0$")
def _(tmp, models):
    truncate(ckpt(models, 3, ".index"))
    return []


@render_case("every checkpoint damaged", 1,
             r"iteration_3\.ckpt\.data.*: damaged .*; no earlier level-5 checkpoint in .* is intact$")
def _(tmp, models):
    for i in (0, 3):
        truncate(ckpt(models, i, DATA), 0.9)
    return []


@render_case("NaN weights", 1, r"iteration_9\.ckpt: 1 values are NaN or Inf \(first in generator/Variable_\d+.*\): "
                               r"the weights are not usable; .*use restore_iter=3$")
def _(tmp, models):
    write_nan_checkpoint(ckpt(models, 3), ckpt(models, 9))
    return []


@pytest.mark.parametrize("name", sorted(RENDER_CASES))
def test_render_refuses(name, trained, tmp_path, capsys):
    models = link_tree(trained, tmp_path / "models")
    good = write_mosaic(tmp_path / "good.png", natural_mosaic(64, 64))
    setup, want_code, pattern = RENDER_CASES[name]
    extra = setup(tmp_path, models)
    argv = ["level=5", f"models_dir={models}", f"input={good}", f"output_dir={tmp_path / 'out'}"]
    given = {a.split("=")[0] for a in extra}
    argv = [a for a in argv if a.split("=")[0] not in given] + extra
    before = snapshot(tmp_path)
    code, lines = run_main(test_model.main, argv, capsys)
    assert_one_line(code, lines, want_code, pattern)
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_render_goes_on_after_a_bad_mosaic_and_reports_all(trained, tmp_path, capsys):
    """As dng_to_png.py: every mosaic of a folder is tried, each bad one a warning, then one error."""
    folder = tmp_path / "in"
    write_mosaic(folder / "a_odd.png", np.random.default_rng(0).integers(0, 1024, (65, 97)))
    write_mosaic(folder / "b_12bit.png", natural_mosaic(64, 64) * 4 + 3)
    (folder / "c_text.png").write_text("not an image")
    write_mosaic(folder / "d_good.png", natural_mosaic(64, 64))
    write_mosaic(folder / f".d_good.tmp{dead_pid()}.png", np.ones((64, 64)))  # a killed writer's temporary
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f".d_good_level_5_iteration_3.tmp{dead_pid()}.png"
    stale.write_bytes(b"half a picture")
    alive = out / f".x.tmp{os.getpid()}.png"  # a live process's temporary: not touched
    alive.write_bytes(b"being written")
    code = cli.run(test_model.main, ["level=5", f"models_dir={trained}", f"input={folder}", f"output_dir={out}"])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 1
    assert lines[-1] == f"error: 2 of 4 mosaics could not be rendered (first: {folder / 'b_12bit.png'}; see the " \
                        f"warnings above)"
    warnings = [line for line in lines if line.startswith("warning: ")]
    top = int((natural_mosaic(64, 64) * 4 + 3).max())
    assert len(warnings) == 2 and "c_text.png: not a PNG file" in warnings[0]
    assert f"b_12bit.png: values up to {top}" in warnings[1]
    assert f"note: {folder / 'a_odd.png'}: 97x65 mosaic: its last row and last column are dropped" in captured.out
    assert sorted(os.listdir(out)) == sorted([alive.name, "a_odd_level_5_iteration_3.png",
                                              "d_good_level_5_iteration_3.png"])
    with Image.open(out / "a_odd_level_5_iteration_3.png") as picture:
        assert picture.size == (3, 2)   # 96x64 used: (48x32 packed) * 2 / 32
    # range_check=false renders the 12-bit mosaic, with a warning
    code = cli.run(test_model.main, ["level=5", f"models_dir={trained}", f"input={folder / 'b_12bit.png'}",
                                       f"output_dir={out}", "range_check=false"])
    assert code == 0 and "rendering it anyway (range_check=false)" in capsys.readouterr().err
    assert (out / "b_12bit_level_5_iteration_3.png").exists()


def test_render_on_a_full_disk_is_one_line_and_leaves_nothing(trained, tmpfs, tmp_path, capsys):
    good = write_mosaic(tmp_path / "good.png", natural_mosaic(64, 64))
    fill(tmpfs)
    before = snapshot(tmpfs)
    code, lines = run_main(test_model.main, ["level=5", f"models_dir={trained}", f"input={good}",
                                             f"output_dir={tmpfs}"], capsys)
    assert_one_line(code, lines, 1, r"good_level_5_iteration_3\.png: No space left on device")
    assert snapshot(tmpfs) == before


# ---------------------------------------------------------------------------------------
# evaluate_accuracy.py

EVALUATE_CASES, evaluate_case = case_table()   # setup(tmp, models) -> extra arguments


@evaluate_case("csv is a folder", 1, r"csv=.*: is a folder, expected a file name")
def _(tmp, models):
    return [f"csv={tmp}"]


@evaluate_case("csv under a file", 1, r"csv=.*afile/x\.csv: cannot write there, .*afile is a file")
def _(tmp, models):
    return [f"csv={a_file(tmp)}/x.csv"]


@evaluate_case("black_level above the white level", 2, r"black_level=5000: expected a value from 0 to below 1023")
def _(tmp, models):
    return ["model=baseline", "level=0", "black_level=5000"]


@evaluate_case("a negative black_level", 2, r"black_level=-1: expected a value from 0")
def _(tmp, models):
    return ["model=baseline", "level=0", "black_level=-1"]


@evaluate_case("the latest .data truncated", 1,
               r"iteration_3\.ckpt\.data-00000-of-00001: damaged or truncated.*use restore_iter=0$")
def _(tmp, models):
    truncate(ckpt(models, 3, DATA))
    return []


@evaluate_case("NaN weights", 1, r"iteration_3\.ckpt: 1 values are NaN or Inf.*use restore_iter=0$")
def _(tmp, models):
    write_nan_checkpoint(ckpt(models, 3), ckpt(models, 3))
    return []


@pytest.mark.parametrize("name", sorted(EVALUATE_CASES))
def test_evaluate_refuses(name, trained, sample_dataset, tmp_path, capsys):
    models = link_tree(trained, tmp_path / "models")
    setup, want_code, pattern = EVALUATE_CASES[name]
    extra = setup(tmp_path, models)
    argv = ["orig=false", "level=5", f"models_dir={models}", f"dataset_dir={sample_dataset}"]
    given = {a.split("=")[0] for a in extra}
    argv = [a for a in argv if a.split("=")[0] not in given] + extra
    before = snapshot(tmp_path)
    code, lines = run_main(evaluate_accuracy.main, argv, capsys)
    assert_one_line(code, lines, want_code, pattern)
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------
# dng_to_png.py and make_sample_dataset.py

def test_dng_to_png_refuses_and_ignores_temporaries(tmp_path, capsys):
    folder = tmp_path / "shots"
    folder.mkdir()
    write_dng(folder / f".a.tmp{dead_pid()}.dng", np.zeros((32, 32), np.uint16))
    (tmp_path / "afile").write_text("")
    before = snapshot(tmp_path)
    code, lines = run_main(dng_to_png.main, [folder], capsys)
    assert_one_line(code, lines, 1, r"shots: no \.dng files in this folder")
    good = write_dng(folder / "a.dng", np.zeros((32, 32), np.uint16))
    before = snapshot(tmp_path)
    code, lines = run_main(dng_to_png.main, [good, f"output_dir={tmp_path / 'afile'}"], capsys)
    assert_one_line(code, lines, 1, r"output_dir=.*afile: is a file, not a folder")
    assert snapshot(tmp_path) == before


def test_dng_to_png_on_a_full_disk_is_one_line_and_leaves_nothing(tmpfs, tmp_path, capsys):
    good = write_dng(tmp_path / "a.dng", np.random.default_rng(0).integers(0, 1024, (256, 256)))
    fill(tmpfs)
    before = snapshot(tmpfs)
    code, lines = run_main(dng_to_png.main, [good, f"output_dir={tmpfs}"], capsys)
    assert_one_line(code, lines, 1, r"No space left on device")
    assert snapshot(tmpfs) == before


SAMPLE_CASES = {
    "full_height not a multiple of 32": (["full_height=48"], 2, r"full_height=48: expected a multiple of 32"),
    "full_width not a multiple of 32": (["full_width=100"], 2, r"full_width=100: expected a multiple of 32"),
    "output_dir is a file": (["output_dir={tmp}/afile"], 1, r"output_dir=.*afile: is a file, not a folder"),
    "output_dir under a file": (["output_dir={tmp}/afile/x"], 1, r"cannot make this folder, .*afile is a file"),
}


@pytest.mark.parametrize("name", sorted(SAMPLE_CASES))
def test_make_sample_dataset_refuses(name, tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    argv, want_code, pattern = SAMPLE_CASES[name]
    argv = [a.format(tmp=tmp_path) for a in argv]
    if not any(a.startswith("output_dir=") for a in argv):
        argv.append(f"output_dir={tmp_path / 'out'}")
    before = snapshot(tmp_path)
    code, lines = run_main(make_sample_dataset.main, argv + ["train=1", "test=1", "full=0"], capsys)
    assert_one_line(code, lines, want_code, pattern)
    assert snapshot(tmp_path) == before


def test_make_sample_dataset_removes_a_killed_build(tmp_path, capsys):
    out = tmp_path / "out"
    stale = out / f".building-{dead_pid()}"
    (stale / "train").mkdir(parents=True)
    (stale / "train" / "big.png").write_bytes(b"x" * 1000)
    make_sample_dataset.build(str(out), train=1, test=1, full=0, progress=False)
    assert sorted(os.listdir(out)) == [load_dataset.MARKER_FILE, "test", "train"]
    assert ".building-" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# load_dataset.py: a corrupt JPEG target

def test_corrupt_jpeg_target_fails_the_deep_check_and_the_stream(tmp_path, capsys):
    """2000 zeroed bytes in the middle of a real photo's JPEG: Pillow decodes it with a third of
    its pixels wrong and no error; the dataset check and the reader must refuse it."""
    import skimage.data

    root = tmp_path / "d"
    photo = np.asarray(skimage.data.astronaut())[:448, :448]
    rng = np.random.default_rng(0)
    for split, count in (("train", 2), ("test", 1)):
        for i in range(count):
            write_mosaic(root / split / "huawei_raw" / f"{i}.png", rng.integers(0, 1024, (448, 448)))
            os.makedirs(root / split / "canon", exist_ok=True)
            Image.fromarray(photo).save(root / split / "canon" / f"{i}.jpg", quality=95)
    path = root / "train" / "canon" / "1.jpg"
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle: middle + 2000] = bytes(2000)
    path.write_bytes(bytes(data))
    # the damage is real: Pillow, the previous reader, decodes it without a word
    with Image.open(path) as image:
        lenient = np.asarray(image)
    assert np.mean(np.abs(lenient.astype(int) - photo).max(axis=-1) > 30) > 0.2
    with pytest.raises(load_dataset.DataError, match=r"train/canon/1\.jpg: cannot decode the JPEG \(Corrupt JPEG data"):
        load_dataset.check_dataset(str(root), "train", deep=True)
    code, lines = run_main(load_dataset.main, [f"dataset_dir={root}"], capsys)
    assert_one_line(code, lines, 1, r"train/canon/1\.jpg: cannot decode the JPEG \(Corrupt JPEG data")
    ds, log = data_pipeline.train_dataset(str(root), 5, batch_size=2, train_size=2, verbose=False)
    with pytest.raises(load_dataset.DataError, match=r"1\.jpg: cannot decode the JPEG \(Corrupt JPEG data"):
        for count, _ in enumerate(data_pipeline.batches(ds, log)):
            if count == 50:   # the stream ends at the bad file long before: 2 patches, batches of 2
                break
    # the intact ones decode to exactly Pillow's pixels
    np.testing.assert_array_equal(load_dataset.read_target_image(str(root / "train" / "canon" / "0.jpg")),
                                  np.asarray(Image.open(root / "train" / "canon" / "0.jpg")))


# ---------------------------------------------------------------------------------------
# train_model.py

TRAIN_CASES, train_case = case_table()   # setup(tmp) -> extra arguments


@train_case("models_dir is a file", 1, r"models_dir=.*afile: is a file, not a folder")
def _(tmp):
    return [f"models_dir={a_file(tmp)}"]


@train_case("results_dir under a file", 1, r"results_dir=.*afile/r: cannot make this folder")
def _(tmp):
    return [f"results_dir={a_file(tmp)}/r"]


@train_case("a fresh run into a folder of an older run", 1,
            r"models already holds level-5 checkpoints of an earlier run \(iterations 0, 20, 40\): continue that "
            r"run with resume=true, train into another models_dir, or give overwrite=true to delete them first")
def _(tmp):
    for i in (0, 20, 40):
        (tmp / "models" / f"pynet_level_5_iteration_{i}.ckpt.index").write_bytes(b"")
    return []


@train_case("resume=true with nothing to resume, into an older run", 1,
            r"already holds level-5 checkpoints of an earlier run \(iterations 40\)")
def _(tmp):
    (tmp / "models" / "pynet_level_5_iteration_40.ckpt.index").write_bytes(b"")
    return ["resume=true"]


@train_case("a level without the level above", 1, r"no level-4 checkpoint")
def _(tmp):
    return ["level=3", "vgg_dir=none"]


@train_case("init_from naming no checkpoint", 1, r"init_from=.*absent\.ckpt: no checkpoint there \(expected "
                                                  r".*absent\.ckpt\.index")
def _(tmp):
    return ["level=0", "loss=mse", f"init_from={tmp / 'absent.ckpt'}"]


@train_case("init_from with restore_iter", 2, r"init_from gives the weights the level starts from; restore_iter")
def _(tmp):
    return ["level=0", "init_from=models/original/pynet_level_0.ckpt", "restore_iter=5"]


@pytest.mark.parametrize("name", sorted(TRAIN_CASES))
def test_train_refuses(name, sample_dataset, tmp_path, capsys):
    (tmp_path / "models").mkdir()
    setup, want_code, pattern = TRAIN_CASES[name]
    extra = setup(tmp_path)
    argv = {"level": 5, "dataset_dir": sample_dataset, "patch_size": 32, "batch_size": 2, "num_train_iters": 0,
            "models_dir": tmp_path / "models", "results_dir": tmp_path / "results", "progress": "false"}
    argv.update(dict(a.split("=", 1) for a in extra))
    before = snapshot(tmp_path)
    code, lines = run_main(train_model.main, [f"{k}={v}" for k, v in argv.items()], capsys)
    assert_one_line(code, lines, want_code, pattern)
    assert snapshot(tmp_path) == before


def trainer_error(args, model):
    with pytest.raises(cli.UserError) as error:
        trainer.Trainer(args, model=model, out=lambda *a: None).run()
    assert "\n" not in str(error.value)
    return str(error.value)


@pytest.mark.slow
def test_damaged_checkpoints_are_named_at_handover_and_resume(model, trained, sample_dataset, tmp_path):
    models = link_tree(trained, tmp_path / "models")
    latest = os.path.join(models, "pynet_level_5_iteration_3.ckpt")
    # the level hand-over: the damaged latest level-5 checkpoint named, the intact one before it too
    truncate(latest + DATA)
    text = trainer_error(train_args(sample_dataset, tmp_path, level=4), model)
    assert re.match(re.escape(f"{latest}{DATA}: damaged or truncated: ") + r".* reading generator/Variable_\d+ \(",
                    text), text
    assert text.endswith(f"the latest intact level-5 checkpoint before it is "
                         f"{os.path.join(models, 'pynet_level_5_iteration_0.ckpt')}: use restore_iter=0")
    os.remove(latest + DATA)
    assert f"{latest}{DATA}: missing" in trainer_error(train_args(sample_dataset, tmp_path, level=4), model)
    # with NaN weights
    write_nan_checkpoint(os.path.join(models, "pynet_level_5_iteration_0.ckpt"), latest)
    assert trainer_error(train_args(sample_dataset, tmp_path, level=4), model).startswith(
        f"{latest}: 1 values are NaN or Inf")

    # resume=true with a truncated training state: the earlier one with an intact state is named
    models = link_tree(trained, tmp_path / "again")
    latest = os.path.join(models, "pynet_level_5_iteration_3.ckpt")
    truncate(latest + ".train_state" + DATA, 0.3)
    text = trainer_error(train_args(sample_dataset, tmp_path, models_dir=models, resume="true"), model)
    assert text.startswith(f"{latest}.train_state{DATA}: damaged or truncated")
    assert text.endswith(f"the latest intact level-5 checkpoint with its training state is "
                         f"{os.path.join(models, 'pynet_level_5_iteration_0.ckpt')}: move the files of "
                         f"pynet_level_5_iteration_3.ckpt away to resume from it")


def test_a_damaged_init_from_is_one_line_and_leaves_nothing(model, sample_dataset, tmp_path):
    given = tmp_path / "given" / "pynet_level_0.ckpt"
    given.parent.mkdir()
    (given.parent / "pynet_level_0.ckpt.index").write_bytes(b"not an index")
    text = trainer_error(train_args(sample_dataset, tmp_path, init_from=given), model)
    assert text.startswith(f"{given}.index: damaged, cannot read the checkpoint's index"), text
    assert os.listdir(tmp_path) == ["given"]  # models_dir, made for the run's lock, went with it


@pytest.mark.slow
def test_a_run_gone_non_finite_writes_nothing_and_names_no_bad_checkpoint(model, sample_dataset, tmp_path):
    """learning_rate=inf: the first update makes every weight NaN while the step-0 training loss
    is still finite; the step-0 evaluation must stop the run before its checkpoint."""
    args = train_args(sample_dataset, tmp_path, num_train_iters=4, eval_step=2)
    args["learning_rate"] = float("inf")  # past the parser, which refuses a non-finite number
    text = trainer_error(args, model)
    assert re.fullmatch(r"the test loss became (nan|inf) at iteration 0 of level 5: stopping without saving \(no "
                        r"checkpoint was written\); try a lower learning_rate", text), text
    assert not [n for n in os.listdir(tmp_path / "models") if ".ckpt" in n]


def test_non_finite_weights_are_never_saved(model, tmp_path):

    var = model.weights[7]
    value = var.numpy()
    value.flat[3] = np.inf
    var.assign(value)
    prefix = str(tmp_path / "m" / "pynet_level_5_iteration_0.ckpt")
    with pytest.raises(cli.UserError, match=r"iteration_0\.ckpt: not written: the weights hold 1 NaN"):
        checkpoints.save_checkpoint(model, prefix)
    assert not os.path.exists(tmp_path / "m") or os.listdir(tmp_path / "m") == []


def test_a_failed_checkpoint_write_leaves_nothing(model, tmp_path, monkeypatch):
    """SaveV2 failing half-way (as on a full disk): its temporaries go, nothing is renamed."""
    import tensorflow as tf


    real = tf.raw_ops.SaveV2

    def failing(prefix, tensor_names, shape_and_slices, tensors, name=None):
        real(prefix=prefix, tensor_names=tensor_names[:3], shape_and_slices=shape_and_slices[:3], tensors=tensors[:3])
        raise tf.errors.ResourceExhaustedError(None, None, f"{prefix}{DATA}; No space left on device")

    monkeypatch.setattr(tf.raw_ops, "SaveV2", failing)
    prefix = str(tmp_path / "pynet_level_5_iteration_0.ckpt")
    with pytest.raises(cli.UserError, match=r"iteration_0\.ckpt: cannot write the checkpoint \(.*No space left on "
                                              r"device\); nothing was saved"):
        checkpoints.save_checkpoint(model, prefix)
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_training_on_a_full_disk_is_one_line_and_leaves_nothing(model, sample_dataset, tmpfs, tmp_path):
    args = train_args(sample_dataset, tmp_path, models_dir=tmpfs, num_train_iters=0)
    text = trainer_error(args, model)
    assert text == (f"{tmpfs}/pynet_level_5_iteration_0.ckpt: cannot write the checkpoint (No space left on "
                    f"device); nothing was saved")
    assert sorted(os.listdir(tmpfs)) == ["logs.txt"]   # no temporary file, training state or checkpoint


@pytest.mark.slow
def test_overwrite_replaces_an_older_run_and_stale_temporaries_go(model, sample_dataset, tmp_path, capsys):
    models = tmp_path / "models"
    models.mkdir()
    for i in (0, 20, 40):
        for suffix in (".index", DATA, ".train_state.index"):
            (models / f"pynet_level_5_iteration_{i}.ckpt{suffix}").write_bytes(b"old run")
    (models / "pynet_level_4_iteration_40.ckpt.index").write_bytes(b"old run, level 4")
    pid = dead_pid()
    stale = [f"pynet_level_5_iteration_7.ckpt.train_state.tmp{pid}_temp",
             f"pynet_level_5_iteration_7.ckpt.tmp{pid}{DATA}"]
    (models / stale[0]).mkdir()
    (models / stale[1]).write_bytes(b"half")
    lines = []
    trainer.Trainer(train_args(sample_dataset, tmp_path, num_train_iters=1, eval_step=1, overwrite="true"),
                        model=model, out=lines.append).run()
    assert any("overwrite=true: deleted 3 level-5 checkpoint(s) of an earlier run" in line for line in lines)
    names = sorted(os.listdir(models))
    assert checkpoints.checkpoint_iterations(5, str(models)) == [0, 1]
    assert "pynet_level_4_iteration_40.ckpt.index" in names  # other levels are left alone
    assert not set(stale) & set(names)
    assert "removed 2 temporary file(s)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# utils

def test_a_refused_write_is_one_line(capsys):
    import errno

    def main(argv):
        raise OSError(errno.ENOSPC, "No space left on device", "out/x.png")

    assert cli.run(main, []) == 1
    assert capsys.readouterr().err == "error: out/x.png: No space left on device\n"


def test_stale_temporaries_of_dead_writers_only_are_removed(tmp_path):
    dead, alive = dead_pid(), os.getppid()
    names = [f".a.tmp{dead}.png", f".a.tmp{alive}.png", f"pynet_level_3_iteration_5.ckpt.tmp{dead}.index",
             f".building-{dead}", "a.tmp123.png", ".hidden", "photo.png"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert sorted(files.remove_stale_temps(str(tmp_path))) == sorted(
        [f".a.tmp{dead}.png", f"pynet_level_3_iteration_5.ckpt.tmp{dead}.index", f".building-{dead}"])
    assert sorted(os.listdir(tmp_path)) == sorted([f".a.tmp{alive}.png", "a.tmp123.png", ".hidden", "photo.png"])
    assert [n for n in names if not files.is_hidden(n)] == ["a.tmp123.png", "photo.png"]


def test_png_reader_checks_every_chunk(tmp_path):
    path = write_mosaic(tmp_path / "m.png", np.random.default_rng(0).integers(0, 1024, (64, 64)))
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01   # one bit inside the image data
    replace_file(path, bytes(data))
    with pytest.raises(cli.UserError, match=r"m\.png: cannot read the PNG \(chunk 'IDAT' at byte \d+ fails its CRC "
                                              r"check\): the file is corrupt"):
        images.read_mosaic(path)


def test_write_png_of_an_empty_image_creates_nothing(tmp_path):
    with pytest.raises(cli.UserError, match="the image is empty"):
        images.write_png(str(tmp_path / "out" / "x.png"), np.zeros((0, 3, 3), np.uint8))
    assert os.listdir(tmp_path) == []
