"""dng_to_png.py against real DNG files written with pidng and read back through rawpy/LibRaw.

The PNGs are read with pypng (not the imageio/Pillow writer) and compared pixel for pixel with
the mosaic that was written into the DNG, cropped/normalised here with plain NumPy.
"""

import os
import struct
import subprocess
import sys

import numpy as np
import png  # pypng
import pytest
import rawpy

import cli
import dng_to_png
from helpers import ROOT, natural_mosaic, write_dng


def read_png(path):
    width, height, rows, info = png.Reader(filename=str(path)).read()
    assert info["greyscale"] and info["bitdepth"] == 16 and info["planes"] == 1
    return np.vstack([np.asarray(row, dtype=np.uint16) for row in rows])


def convert(path, **options):
    lines = []
    out = dng_to_png.convert(str(path), log=lines.append, **options)
    return out, "\n".join(lines)


def r_position(pattern):
    index = pattern.index("R")
    return index // 2, index % 2


@pytest.mark.parametrize("bits", [10, 12, 14])
@pytest.mark.parametrize("pattern", ["RGGB", "BGGR", "GRBG", "GBRG"])
def test_patterns_and_bit_depths_round_trip(tmp_path, pattern, bits):
    rng = np.random.default_rng(bits)
    white, black = (1 << bits) - 1, 16 << (bits - 8)
    mosaic = rng.integers(0, white + 1, (38, 56)).astype(np.uint16)
    path = write_dng(tmp_path / f"{pattern}_{bits}.dng", mosaic, pattern, bits, black)
    with rawpy.imread(path) as raw:  # the file says what was written
        np.testing.assert_array_equal(raw.raw_image, mosaic)
        assert raw.white_level == white and list(raw.black_level_per_channel) == [black] * 4

    # faithful default: the whole raw_image, values untouched, PNG named after the DNG
    out, log = convert(path)
    assert out == str(tmp_path / f"{pattern}_{bits}.png")
    np.testing.assert_array_equal(read_png(out), mosaic)
    assert f"pattern {pattern}" in log

    # rggb=true: the mosaic now starts with the R pixel of the written pattern
    rows, cols = r_position(pattern)
    out, log = convert(path, output_dir=str(tmp_path / "rggb"), rggb=True)
    np.testing.assert_array_equal(read_png(out), mosaic[rows:, cols:])

    # normalize=true: black -> 64, white -> 1023, per pixel, rounded and clipped
    out, _ = convert(path, output_dir=str(tmp_path / "norm"), rggb=True, normalize=True)
    expected = 64 + (mosaic[rows:, cols:].astype(np.float64) - black) * (1023 - 64) / (white - black)
    expected = np.clip(np.floor(expected + 0.5), 0, 1023)
    np.testing.assert_array_equal(read_png(out), expected)


def test_per_channel_black_levels(tmp_path):
    rng = np.random.default_rng(0)
    mosaic = rng.integers(0, 4096, (24, 30)).astype(np.uint16)
    blacks = [60, 62, 64, 66]  # per 2x2 position, row-major, as BlackLevelRepeatDim 2x2 writes them
    path = write_dng(tmp_path / "b.dng", mosaic, "GBRG", 12, blacks)
    out, _ = convert(path, normalize=True, black_level=0)
    black_map = np.tile(np.array(blacks, dtype=np.float64).reshape(2, 2), (12, 15))
    expected = np.clip(np.floor((mosaic - black_map) * 1023 / (4095 - black_map) + 0.5), 0, 1023)
    np.testing.assert_array_equal(read_png(out), expected)


def test_visible_area(tmp_path):
    rng = np.random.default_rng(1)
    mosaic = rng.integers(0, 1024, (48, 72)).astype(np.uint16)
    path = write_dng(tmp_path / "a.dng", mosaic, "RGGB", 10, 64, active=(2, 4, 46, 70))
    out, _ = convert(path, visible=True)
    np.testing.assert_array_equal(read_png(out), mosaic[2:46, 4:70])
    out, _ = convert(path, output_dir=str(tmp_path / "full"))
    np.testing.assert_array_equal(read_png(out), mosaic)


def test_crop_to_multiple_of_32_keeps_the_top_left(tmp_path):
    rng = np.random.default_rng(2)
    mosaic = rng.integers(0, 1024, (101, 141)).astype(np.uint16)
    path = write_dng(tmp_path / "c.dng", mosaic, "BGGR", 10, 64)
    out, _ = convert(path, rggb=True, crop32=True)
    np.testing.assert_array_equal(read_png(out), mosaic[1:97, 1:129])


def test_several_files_a_folder_and_output_dir(tmp_path, capsys):
    rng = np.random.default_rng(3)
    folder = tmp_path / "shots"
    folder.mkdir()
    mosaics = {}
    for name in ("a.dng", "b.DNG"):
        mosaics[name] = rng.integers(0, 1024, (24, 32)).astype(np.uint16)
        write_dng(folder / name, mosaics[name])
    single = rng.integers(0, 1024, (24, 30)).astype(np.uint16)
    write_dng(tmp_path / "c.dng", single)
    (folder / "notes.txt").write_text("not a dng")
    out_dir = tmp_path / "out"
    assert cli.run(dng_to_png.main, [str(folder), str(tmp_path / "c.dng"), f"output_dir={out_dir}"]) == 0
    assert sorted(os.listdir(out_dir)) == ["a.png", "b.png", "c.png"]
    np.testing.assert_array_equal(read_png(out_dir / "a.png"), mosaics["a.dng"])
    np.testing.assert_array_equal(read_png(out_dir / "b.png"), mosaics["b.DNG"])
    np.testing.assert_array_equal(read_png(out_dir / "c.png"), single)
    assert "converted 3 files" in capsys.readouterr().out


NON_BAYER = {
    "X-Trans": dict(dims=(6, 6), cfa=[1, 1, 0, 1, 1, 2, 1, 1, 2, 1, 1, 0, 2, 0, 1, 0, 2, 1,
                                      1, 1, 2, 1, 1, 0, 1, 1, 0, 1, 1, 2, 0, 2, 1, 2, 0, 1]),
    "Quad-Bayer": dict(dims=(4, 4), cfa=[0, 0, 1, 1, 0, 0, 1, 1, 1, 1, 2, 2, 1, 1, 2, 2]),
    "non-Bayer colour filter": dict(cfa=[3, 5, 1, 4]),  # CYGM
    "linear": dict(linear=True),
}


@pytest.mark.parametrize("kind", sorted(NON_BAYER))
def test_non_bayer_files_are_refused(tmp_path, kind):
    options = NON_BAYER[kind]
    shape = (24, 36, 3) if options.get("linear") else (24, 36)
    path = write_dng(tmp_path / "x.dng", np.random.default_rng(4).integers(0, 1024, shape), **options)
    with pytest.raises(cli.UserError, match=kind) as error:
        dng_to_png.convert(path, log=lambda line: None)
    assert path in str(error.value) and "\n" not in str(error.value)
    assert not os.path.exists(tmp_path / "x.png")


def test_bad_input_is_one_line_and_leaves_existing_output_alone(tmp_path):
    junk = tmp_path / "photo.dng"
    junk.write_bytes(b"this is no raw file" * 100)
    existing = tmp_path / "photo.png"
    existing.write_bytes(b"previous result")
    env = dict(os.environ, PYTHONPATH=ROOT)
    script = os.path.join(ROOT, "dng_to_png.py")

    def run(*args):
        return subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env, timeout=120)

    for args, code, words in [((str(junk),), 1, "cannot read it as a raw DNG"),
                              ((str(tmp_path / "missing.dng"),), 1, "file not found"),
                              ((os.path.join(ROOT, "utils.py"),), 1, "expected a .dng file"),
                              ((), 2, "no DNG file given"),
                              ((str(junk), "crop=32"), 2, "unknown argument")]:
        result = run(*args)
        assert result.returncode == code, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], result.stderr
    assert existing.read_bytes() == b"previous result"
    helped = run("help")
    assert helped.returncode == 0 and "normalize" in helped.stdout and "[false]" in helped.stdout


def test_a_dng_cut_inside_its_header_is_refused(tmp_path):
    good = write_dng(tmp_path / "g.dng", natural_mosaic(64, 96))
    (tmp_path / "t.dng").write_bytes(open(good, "rb").read()[:200])   # within IFD0's entries
    with pytest.raises(cli.UserError, match="cannot read it as a raw DNG") as error:
        dng_to_png.convert(str(tmp_path / "t.dng"), log=lambda line: None)
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------
# raw files whose image data are missing: a metadata tool strips the pixels and keeps the header

COMPRESSION, TILE_OFFSETS, TILE_BYTE_COUNTS = 259, 324, 325   # TIFF tags pidng writes in IFD0


def ifd0_entry(data, tag):
    """(position of the value, struct format) of a one-value tag of a little-endian TIFF's IFD0."""
    assert data[:4] == b"II*\x00"
    ifd = struct.unpack_from("<I", data, 4)[0]
    for i in range(struct.unpack_from("<H", data, ifd)[0]):
        code, kind, count = struct.unpack_from("<HHI", data, ifd + 2 + 12 * i)
        if code == tag:
            assert count == 1 and kind in (3, 4)
            return ifd + 2 + 12 * i + 8, "<H" if kind == 3 else "<I"
    raise KeyError(tag)


def ifd0_value(data, tag):
    position, fmt = ifd0_entry(data, tag)
    return struct.unpack_from(fmt, data, position)[0]


def with_tag(data, tag, value):
    data = bytearray(data)
    position, fmt = ifd0_entry(data, tag)
    struct.pack_into(fmt, data, position, value)
    return bytes(data)


def stripped_variants(tmp_path):
    """{name: (file, what the error says)}: the same DNG of a photograph with its pixels cut off,
    its byte count rewritten, cut half-way (also when declared compressed), or zeroed."""
    data = open(write_dng(tmp_path / "photo.dng", natural_mosaic(128, 192)), "rb").read()
    offset, count = ifd0_value(data, TILE_OFFSETS), ifd0_value(data, TILE_BYTE_COUNTS)
    assert count == 128 * 192 * 10 // 8 and offset + count == len(data)  # packed 10-bit samples, last in the file
    half = offset + count // 2
    variants = {
        "cut": (data[:offset], f"declares a 192x128 raw image but holds {offset:,} bytes: its image data is missing"),
        "no byte count": (with_tag(data, TILE_BYTE_COUNTS, 0),
                          f"declares a 192x128 raw image but holds {len(data):,} bytes: its image data is missing"),
        "cut half-way": (data[:half], f"declares a 192x128 raw image of {count:,} bytes but its strips or tiles hold "
                                      f"{count // 2:,}: its image data is incomplete"),
        "compressed, cut half-way": (with_tag(data, COMPRESSION, 7)[:half],
                                     f"declares a 192x128 raw image but part of its data is missing (strips or "
                                     f"tiles empty or past the end of the file, {half:,} bytes)"),
        "zeroed": (data[:offset] + bytes(count), "the mosaic is constant at value 0: no image data"),
    }
    paths = {}
    for name, (content, message) in variants.items():
        path = tmp_path / f"{name.replace(' ', '_').replace(',', '')}.dng"
        path.write_bytes(content)
        paths[name] = (str(path), message)
    return paths


def test_a_dng_whose_image_data_are_missing_is_refused_and_nothing_written(tmp_path, capsys):
    for name, (path, message) in stripped_variants(tmp_path).items():
        for extra in ([], ["normalize=true", "rggb=true"]):
            assert cli.run(dng_to_png.main, [path, *extra]) == 1, name
            lines = capsys.readouterr().err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"error: {path}: {message}"), (name, lines)
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in tmp_path.glob("*.dng"))  # no PNG
    # the script itself: exit status 1, one line, nothing written
    (tmp_path / "script").mkdir()
    cut = stripped_variants(tmp_path / "script")["cut"][0]
    result = subprocess.run([sys.executable, os.path.join(ROOT, "dng_to_png.py"), cut], capture_output=True,
                            text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "its image data is missing" in result.stderr
    assert not any(p.suffix == ".png" for p in (tmp_path / "script").iterdir())


def test_a_mosaic_too_small_to_crop_names_its_file(tmp_path, capsys):
    (tmp_path / "shots").mkdir()
    small = write_dng(tmp_path / "shots" / "small.dng", natural_mosaic(24, 24))
    write_dng(tmp_path / "shots" / "large.dng", natural_mosaic(64, 64))
    message = f"{small}: the mosaic (24x24) is smaller than 32x32, too small to cut to multiples of 32"
    assert cli.run(dng_to_png.main, [small, "crop32=true"]) == 1
    assert capsys.readouterr().err.strip() == f"error: {message}"
    assert cli.run(dng_to_png.main, [str(tmp_path / "shots"), "crop32=true"]) == 1   # a folder: the others go on
    err = capsys.readouterr().err.strip().splitlines()
    assert f"warning: {message}" in err
    assert err[-1].startswith(f"error: 1 of 2 files could not be converted (first: {small}")
    assert sorted(os.listdir(tmp_path / "shots")) == ["large.dng", "large.png", "small.dng"]
