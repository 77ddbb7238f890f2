"""Bad input to the scripts (issue 27): one line naming the argument or file and the actual
reason, exit status 2 for an argument and 1 for anything else, nothing written; and
test_model.py stopped part-way saying which pictures it finished.

The scripts run in this process (cli.run(script.main, ...)); test_model.py's network is
replaced by a grey picture, which is all that these checks need. One subprocess checks that a
script's exit status is the one cli.run returns.
"""

import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import zlib

import numpy as np
import pytest

import checkpoints
import cli
import dng_to_png
import evaluate_accuracy
import files
import render
import test_model
import train_model
from helpers import ROOT, natural_mosaic, write_png_mosaic


def run(main, argv, capsys):
    """(exit status, stderr lines) of a script's main run as its command line runs it."""
    code = cli.run(main, [str(a) for a in argv])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.fixture
def renders(monkeypatch):
    """test_model.main without a checkpoint or a network: every picture is grey. ``renders.count``
    counts the pictures asked for; ``renders.before[n]`` is called before the n-th."""

    class Renders:
        count = 0
        before = {}

    state = Renders()

    def picture(model, mosaic, *rest):
        state.count += 1
        state.before.get(state.count, lambda: None)()
        return np.full(mosaic.shape + (3,), 0.5, np.float32)

    monkeypatch.setattr(checkpoints, "resolve", lambda args: ("unused", "1"))
    monkeypatch.setattr(checkpoints, "load_model", lambda level, prefix, precision="fp32": None)
    monkeypatch.setattr(render, "render", picture)
    return state


def png_declaring(width, height):
    """A valid, small PNG whose header declares ``width`` x ``height`` 8-bit grey pixels: every
    chunk's CRC right, its data the first row only, as a decompression bomb's header reads."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(width + 1)))
            + chunk(b"IEND", b""))


# ---------------------------------------------------------------------------------------
# arguments: refused at once, exit status 2

@pytest.mark.parametrize("token, expected", [
    ("learning_rate=inf", "learning_rate=inf: expected a number"),
    ("learning_rate=nan", "learning_rate=nan: expected a number"),
    ("learning_rate=-inf", "learning_rate=-inf: expected a number"),
    ("level=\u0663", "level=\u0663: expected an integer"),                   # an Arabic-Indic three
    ("batch_size=1_0", "batch_size=1_0: expected an integer"),
    ("level=+1", "level=+1: expected an integer"),
])
def test_numbers_are_ascii_digits_and_finite(token, expected):
    """Python's int() and float() take all of these; a learning rate of inf or nan trains NaNs."""
    with pytest.raises(cli.UsageError) as error:
        train_model.parse_arguments([token])
    assert str(error.value) == expected


def test_a_long_or_control_character_value_is_cut_and_escaped_in_the_echo():
    with pytest.raises(cli.UsageError) as error:
        train_model.parse_arguments(["dataset_dir=d", "level=" + "7" * 100_000])
    message = str(error.value)
    assert message == f"level={'7' * cli.SHOWN_CHARACTERS}... (100000 characters): expected an integer"
    with pytest.raises(cli.UsageError) as error:
        train_model.parse_arguments(["level=1\x1b[2J\r\n"])
    assert str(error.value) == "level=1\\x1b[2J\\r\\n: expected an integer"


def test_arguments_that_do_not_apply_are_usage_errors(capsys):
    for main, argv, expected in [
        (test_model.main, ["input="], "error: input=: no mosaics given (a PNG file, a folder, or several separated "
                                      "by commas)"),
        (evaluate_accuracy.main, ["model=baseline", "restore_iter=5"],
         "error: restore_iter=5: applies to the network, which model=baseline does not use"),
        (evaluate_accuracy.main, ["black_level=10"],
         "error: black_level=10: applies to model=baseline only (the network learned its own)"),
    ]:
        assert run(main, argv, capsys) == (2, [expected]), argv


def test_a_script_exits_with_the_status_of_a_usage_error():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train_model.py"), "learning_rate=nan"],
                            capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    assert (result.returncode, result.stderr) == (2, "error: learning_rate=nan: expected a number\n")
    assert result.stdout == ""   # refused before anything starts


# ---------------------------------------------------------------------------------------
# input files: what is wrong with them, in words

def test_two_inputs_with_one_output_name_are_refused_before_rendering(tmp_path, renders, capsys):
    first = write_png_mosaic(tmp_path / "a" / "x.png", natural_mosaic(64, 64))
    second = write_png_mosaic(tmp_path / "b" / "x.png", natural_mosaic(64, 64))
    code, lines = run(test_model.main, [f"input={first},{second}", f"output_dir={tmp_path / 'out'}"], capsys)
    assert (code, lines) == (1, [f"error: {first} and {second} would both be written as x_level_*.png: render them "
                                 f"in two runs with different output_dir=, or rename one"])
    assert renders.count == 0 and not (tmp_path / "out").exists()


def test_an_empty_mosaic_says_the_file_is_empty(tmp_path, renders, capsys):
    empty = tmp_path / "shot.png"
    empty.write_bytes(b"")
    code, lines = run(test_model.main, [f"input={empty}", f"output_dir={tmp_path / 'out'}"], capsys)
    assert (code, lines) == (1, [f"error: {empty}: the file is empty (0 bytes), expected a PNG mosaic"])


def test_a_decompression_bomb_is_called_too_large(tmp_path, renders, capsys):
    """Pillow refuses to decode more than 2 x Image.MAX_IMAGE_PIXELS pixels: that is no damage."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_declaring(20000, 20000))
    code, lines = run(test_model.main, [f"input={bomb}", f"output_dir={tmp_path / 'out'}"], capsys)
    assert code == 1 and len(lines) == 1 and lines[0].startswith(f"error: {bomb}: cannot read the PNG (Image size "
                                                                 f"(400000000 pixels) exceeds limit")
    assert "too large to decode safely" in lines[0] and "corrupt" not in lines[0]
    assert renders.count == 0 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("share", [1.0, 0.995])
def test_a_blank_mosaic_is_not_rendered(tmp_path, renders, capsys, share):
    """What LibRaw reads from a raw file whose pixels were stripped: one value, or nearly."""
    mosaic = natural_mosaic(64, 96)
    mosaic.ravel()[: round(mosaic.size * share)] = 64
    path = write_png_mosaic(tmp_path / "blank.png", mosaic)
    code, lines = run(test_model.main, [f"input={path}", f"output_dir={tmp_path / 'out'}"], capsys)
    what = "constant" if share == 1 else "nearly constant (99.5% of its pixels)"
    assert (code, lines) == (1, [f"error: {path}: the mosaic is {what} at value 64: no image data (a raw file whose "
                                 f"pixel data were stripped, or a blank frame)"])
    assert renders.count == 0 and not (tmp_path / "out").exists()


def test_an_empty_or_oversized_photo_of_the_sample_dataset_says_so(tmp_path, monkeypatch):
    """make_sample_dataset.py photos_dir=: the photographs the sample is made from."""
    from PIL import Image

    import make_sample_dataset

    (tmp_path / "a.jpg").write_bytes(b"")
    with pytest.raises(cli.UserError) as error:
        make_sample_dataset.load_photos(str(tmp_path))
    assert str(error.value) == f"{tmp_path / 'a.jpg'}: cannot read the photo (the file is empty (0 bytes))"
    Image.fromarray(natural_mosaic(64, 64).astype(np.uint8)).save(tmp_path / "a.jpg")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 4)   # 2 x this is Pillow's limit
    with pytest.raises(cli.UserError, match=r"a\.jpg: cannot read the photo \(Image size \(4096 pixels\) exceeds "
                                            r"limit of 2048 pixels: too large to decode safely"):
        make_sample_dataset.load_photos(str(tmp_path))


def test_a_loop_of_symbolic_links_says_so(tmp_path, capsys):
    for name, main in (("loop.png", test_model.main), ("loop.dng", dng_to_png.main)):
        loop = tmp_path / name
        os.symlink(loop, loop)
        argv = [f"input={loop}", f"output_dir={tmp_path / 'out'}"] if main is test_model.main else [loop]
        assert run(main, argv, capsys) == (1, [f"error: {loop}: a loop of symbolic links (it points back to "
                                               f"itself)"]), name


def _as_user_nobody(check) -> str:
    """The message of the UserError that ``check()`` raises (or "ok"), in a process of user
    nobody: a fork, not a new interpreter, which nobody may not be allowed to run."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            os.setgid(65534)
            os.setuid(65534)
            try:
                check()
                text = "ok"
            except cli.UserError as error:
                text = str(error)
            os.write(write, text.encode())
        except BaseException as error:
            os.write(write, f"the child failed: {error!r}".encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        text = pipe.read().decode()
    os.waitpid(pid, 0)
    return text


def test_a_read_only_output_folder_says_it_is_not_writable():
    """As root every folder is writable (os.access says so, and rightly): under root the check
    runs as user nobody, for whom the folder is read-only."""
    base = tempfile.mkdtemp(prefix="read_only_output_")
    folder = os.path.join(base, "out")
    try:
        os.chmod(base, 0o755)
        os.mkdir(folder)
        os.chmod(folder, 0o555)

        def check():
            files.check_output_dir(folder, "output_dir")

        if os.geteuid() == 0:
            message = _as_user_nobody(check)
        else:
            with pytest.raises(cli.UserError) as error:
                check()
            message = str(error.value)
        assert message == f"output_dir={folder}: this folder is not writable (permission denied)"
    finally:
        shutil.rmtree(base)


# ---------------------------------------------------------------------------------------
# test_model.py stopped part-way

@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT"])
def test_a_stopped_render_says_which_pictures_were_finished(tmp_path, renders, capsys, stop):
    """Stopped while rendering the second of three mosaics: exit status 130, one line naming the
    picture written, no temporary file; the signal handlers are put back."""
    inputs = [write_png_mosaic(tmp_path / "in" / f"{name}.png", natural_mosaic(64, 64)) for name in "abc"]
    out = tmp_path / "out"

    def reached_the_test(signum, frame):  # what runs if the render leaves SIGTERM to its caller
        raise AssertionError("SIGTERM reached the caller of test_model.main")

    if stop == "SIGTERM":
        renders.before[2] = lambda: os.kill(os.getpid(), signal.SIGTERM)
    else:
        def ctrl_c():
            raise KeyboardInterrupt
        renders.before[2] = ctrl_c
    previous = signal.signal(signal.SIGTERM, reached_the_test)
    try:
        code, lines = run(test_model.main, [f"input={tmp_path / 'in'}", f"output_dir={out}"], capsys)
        assert signal.getsignal(signal.SIGTERM) is reached_the_test
    finally:
        signal.signal(signal.SIGTERM, previous)
    finished = out / "a_level_0_iteration_1.png"
    assert code == 130 and lines[-1] == (f"error: stopped by {stop} (finished 1 of 3: {finished}); the picture under "
                                         f"way was not written")
    assert os.listdir(out) == [finished.name] and renders.count == 2
    assert len(inputs) == 3
