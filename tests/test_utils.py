"""utils.py: the key=value parser shared by every script, atomic writes and image output."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import checkpoints
import cli
import files
import images
import runtime
import utils
from cli import Arg, UsageError
from helpers import ROOT

SPEC = [
    utils.level_arg(),
    Arg("batch_size", int, 50, "patches per step", check=cli.positive),
    Arg("learning_rate", float, 5e-5, "Adam step size", check=cli.positive),
    Arg("orig", cli.BOOL, False, "released weights"),
    utils.restore_iter_arg(),
    Arg("num_train_iters", int, lambda p: utils.NUM_DEFAULT_TRAIN_ITERS[p["level"]], "iterations"),
]


def parse(*tokens):
    return cli.parse_args(list(tokens), SPEC, "prog.py", "A test program.")


def test_defaults_and_types():
    values = parse()
    assert values == {"level": 0, "batch_size": 50, "learning_rate": 5e-5, "orig": False,
                      "restore_iter": None, "num_train_iters": 100000}
    values = parse("level=3", "batch_size=48", "learning_rate=1e-4", "orig=true", "restore_iter=20000")
    assert values["level"] == 3 and values["batch_size"] == 48 and values["learning_rate"] == 1e-4
    assert values["orig"] is True and values["restore_iter"] == 20000


@pytest.mark.parametrize("level,iters", [(0, 100000), (1, 35000), (2, 20000), (3, 20000), (4, 5000), (5, 5000)])
def test_per_level_default_follows_level(level, iters):
    assert parse(f"level={level}")["num_train_iters"] == iters
    assert parse(f"level={level}", "num_train_iters=7")["num_train_iters"] == 7


@pytest.mark.parametrize("token,message", [
    ("level=7", "level=7: expected one of 0, 1, 2, 3, 4, 5"),
    ("level=x", "level=x: expected an integer"),
    ("batch_size=-1", "batch_size=-1: expected a value greater than 0"),
    ("orig=maybe", "orig=maybe: expected true or false"),
    ("learning_rate=fast", "learning_rate=fast: expected a number"),
    ("restore_iter=-3", "restore_iter=-3: expected a value of 0 or more"),
    ("colour=red", "unknown argument 'colour'"),
    ("level", "level: expected key=value"),
])
def test_bad_values_are_usage_errors(token, message):
    with pytest.raises(UsageError) as info:
        parse(token)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_repeated_key_is_an_error():
    with pytest.raises(UsageError, match="level given twice"):
        parse("level=1", "level=2")


@pytest.mark.parametrize("flag", ["help", "-h", "--help"])
def test_help_lists_every_argument_with_its_default(flag, capsys):
    with pytest.raises(cli.HelpRequested):
        parse(flag)
    text = capsys.readouterr().out
    for arg in SPEC:
        assert arg.name in text
    assert "[50]" in text and "[false]" in text and "[none]" not in text and "[None]" in text


def test_run_maps_errors_to_one_line_and_exit_codes(capsys):
    def bad_value(argv):
        parse(*argv)

    assert cli.run(bad_value, ["level=9"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: level=9: expected one of 0, 1, 2, 3, 4, 5"]

    def missing(argv):
        raise cli.UserError("data/x.png: file not found")

    assert cli.run(missing, []) == 1
    assert capsys.readouterr().err == "error: data/x.png: file not found\n"
    assert cli.run(bad_value, ["help"]) == 0


def test_a_closed_pipe_stops_quietly():
    """`python test_model.py help | head -1`: the reader leaves early; no traceback."""
    code = ("import sys, cli\n"
            "def main(argv):\n"
            "    raise BrokenPipeError(32, 'Broken pipe')\n"
            "sys.exit(cli.run(main))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 141
    assert "Traceback" not in result.stderr and "Broken pipe" not in result.stderr


def test_get_last_iter_reads_complete_checkpoints_only(tmp_path):
    for name in ["pynet_level_4_iteration_1000.ckpt.index", "pynet_level_4_iteration_5000.ckpt.index",
                 "pynet_level_4_iteration_9000.ckpt.data-00000-of-00001",  # no index: incomplete
                 "pynet_level_40_iteration_7000.ckpt.index", "pynet_level_3_iteration_8000.ckpt.index"]:
        (tmp_path / name).write_bytes(b"")
    assert checkpoints.get_last_iter(4, str(tmp_path)) == 5000
    assert checkpoints.get_last_iter(2, str(tmp_path)) is None
    assert checkpoints.get_last_iter(4, str(tmp_path / "absent")) is None


def test_atomic_path_keeps_the_old_file_when_the_write_fails(tmp_path):
    target = tmp_path / "out.png"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with files.atomic_path(str(target)) as tmp:
            with open(tmp, "wb") as handle:
                handle.write(b"half")
            raise RuntimeError("crash")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.png"]


@pytest.mark.parametrize("bits", [8, 16])
def test_write_png_round_trips(tmp_path, bits):
    rng = np.random.default_rng(0)
    image = images.to_uint(rng.uniform(-0.1, 1.1, (5, 7, 3)), bits)
    path = str(tmp_path / "x.png")
    images.write_png(path, image)
    if bits == 8:
        np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
    else:  # Pillow has no 16-bit RGB mode: read it with pypng, an independent decoder
        import png
        width, height, rows, info = png.Reader(filename=path).read()
        assert info["bitdepth"] == 16 and info["planes"] == 3
        read = np.array([np.asarray(row, np.uint16) for row in rows]).reshape(height, width, 3)
        np.testing.assert_array_equal(read, image)


def test_to_uint_clips_or_stretches():
    image = np.array([[[-0.5, 0.5, 1.5]]])
    np.testing.assert_array_equal(images.to_uint(image, 8), [[[0, 128, 255]]])
    np.testing.assert_array_equal(images.to_uint(image, 8, stretch=True), [[[0, 128, 255]]])
    image = np.array([[[0.25, 0.5, 0.75]]])
    np.testing.assert_array_equal(images.to_uint(image, 8, stretch=True), [[[0, 128, 255]]])
    np.testing.assert_array_equal(images.to_uint(image, 16), [[[16384, 32768, 49151]]])


def test_read_mosaic_rejects_colour_images_and_missing_files(tmp_path):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(cli.UserError, match="rgb.png: expected a single-channel Bayer mosaic"):
        images.read_mosaic(str(tmp_path / "rgb.png"))
    with pytest.raises(cli.UserError, match="nope.png: file not found"):
        images.read_mosaic(str(tmp_path / "nope.png"))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(cli.UserError, match="broken.png: cannot read the PNG"):
        images.read_mosaic(str(tmp_path / "broken.png"))


# glibc's malloc on transparent huge pages (runtime.run_with_huge_pages, test_model.py's start)

GLIBC = ("glibc", "2.36")


def test_huge_pages_are_asked_for_only_where_glibc_and_the_kernel_can_give_them():
    env = {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    chosen = runtime.huge_pages_environment(env, GLIBC, "madvise")
    assert chosen == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}
    assert runtime.huge_pages_environment({}, ("glibc", "2.39"), "always")["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert runtime.huge_pages_environment({}, ("glibc", "2.31"), "madvise") is None   # no such tunable before 2.35
    assert runtime.huge_pages_environment({}, ("", ""), "madvise") is None            # musl, macOS, Windows
    assert runtime.huge_pages_environment({}, GLIBC, "never") is None
    assert runtime.huge_pages_environment({}, GLIBC, "") is None                      # no THP in this kernel
    # a user's value wins (and a process started again with the tunable is not started a third time)
    assert runtime.huge_pages_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC, "madvise") is None


def test_thp_mode_reads_the_kernels_bracketed_choice(tmp_path):
    setting = tmp_path / "enabled"
    setting.write_text("always [madvise] never\n")
    assert runtime.thp_mode(str(setting)) == "madvise"
    setting.write_text("[always] madvise never\n")
    assert runtime.thp_mode(str(setting)) == "always"
    assert runtime.thp_mode(str(tmp_path / "missing")) == ""


# Started as a script: runs itself again on huge pages, then mallocs 64 MiB through glibc (as
# TensorFlow's CPU allocator does), writes it, and reports the huge pages mapped meanwhile.
HUGE_PAGE_SCRIPT = """
import ctypes, os, sys
sys.path.insert(0, {root!r})
import runtime
print("start", sys.argv[1:], flush=True)
if __name__ == "__main__":
    runtime.run_with_huge_pages()

def huge_kib():
    with open("/proc/self/smaps_rollup") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("AnonHugePages"))

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
before = huge_kib()
block = libc.malloc(64 << 20)
ctypes.memset(block, 1, 64 << 20)
print("huge", huge_kib() - before)
print(runtime.huge_pages_note())
"""


def run_huge_page_script(tmp_path, **env):
    script = tmp_path / "pages.py"
    script.write_text(HUGE_PAGE_SCRIPT.format(root=str(ROOT)))
    environment = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    proc = subprocess.run([sys.executable, str(script), "a=1", "b=two words"], env={**environment, **env},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


@pytest.mark.skipif(runtime.huge_pages_environment({}) is None,
                    reason="this machine's glibc or kernel has no transparent huge pages for malloc")
def test_a_script_started_on_huge_pages_runs_again_once_with_its_arguments_and_gets_them(tmp_path):
    lines = run_huge_page_script(tmp_path)
    assert lines[:2] == ["start ['a=1', 'b=two words']"] * 2   # started again once, same arguments
    assert int(lines[2].split()[1]) >= 2048                      # the block sits at least partly on 2 MiB pages
    assert lines[3].startswith("Memory: malloc on transparent huge pages (GLIBC_TUNABLES=glibc.malloc.hugetlb=1")
    # turned off by the user: not started again, and (where the kernel only gives huge pages to
    # those who ask) the block is on 4 KiB pages
    lines = run_huge_page_script(tmp_path, GLIBC_TUNABLES="glibc.malloc.hugetlb=0")
    assert lines[0] == "start ['a=1', 'b=two words']" and lines[1].startswith("huge")
    if runtime.thp_mode() == "madvise":
        assert int(lines[1].split()[1]) == 0
    assert lines[2] == "Memory: malloc on 4 KiB pages"
