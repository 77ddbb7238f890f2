"""Convert camera DNG files to the single-channel 16-bit PNG mosaics that PyNET reads.

Faithful default (the reference's dng_to_png.py): ``python dng_to_png.py photo.dng`` writes rawpy's full
``raw_image`` (all sensor rows and columns, camera code values untouched) as ``photo.png``
beside the DNG. Beyond the reference, all optional:

* several files and/or folders at once (every ``*.dng``/``*.DNG`` in a folder), with a progress bar;
* ``output_dir=``: where the PNGs go;
* ``visible=true``: only LibRaw's visible area (``raw_image_visible``), without masked margins;
* ``rggb=true``: the Bayer pattern is read from the file and the mosaic loses its first row
  and/or column so that it starts with R at (0,0), as PyNET expects;
* ``normalize=true``: per-channel black level subtracted and the white level mapped to the
  10-bit range of the Huawei P20's IMX380 (black ``black_level``, white 1023);
* ``crop32=true``: height and width cut down (bottom/right) to multiples of 32, so that the
  packed image is a multiple of 16 and goes straight into test_model.py.

The pattern is always printed. X-Trans (6x6), Quad-Bayer and other non-Bayer files are refused
in every mode: PyNET's packing only makes sense for a 2x2 Bayer mosaic.
"""

import contextlib
import os
import sys
import tempfile

import numpy as np

import utils

PYNET_WHITE = utils.WHITE_LEVEL
DEFAULT_BLACK = utils.BLACK_LEVEL
DNG_EXTENSIONS = (".dng",)
PATTERNS = {"RGGB": (0, 0), "GRBG": (0, 1), "GBRG": (1, 0), "BGGR": (1, 1)}  # pattern -> (rows, cols) to drop


@contextlib.contextmanager
def _capture_c_stderr():
    """LibRaw prints some errors straight to file descriptor 2; collect them instead."""
    captured = {"text": ""}
    try:
        saved = os.dup(2)
    except OSError:  # no usable fd 2: nothing to capture
        yield captured
        return
    with tempfile.TemporaryFile() as sink:
        sys.stderr.flush()
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured["text"] = sink.read().decode("utf-8", "replace").strip()


def _libraw_reason(exc, captured) -> str:
    message = exc.args[0] if exc.args else ""
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    detail = captured.get("text", "").replace("\n", "; ")
    return "; ".join(part for part in (message or exc.__class__.__name__, detail) if part)


def read_dng(path: str, visible: bool = False):
    """Read a raw file with rawpy/LibRaw.

    Returns (mosaic uint16 H x W, colours int H x W as LibRaw's colour indices, info dict with
    color_desc, black_levels (per colour index), white_level, num_colors, pattern_shape).
    """
    import rawpy

    if not os.path.isfile(path):
        raise utils.UserError(f"{path}: file not found")
    captured = {}
    try:
        with _capture_c_stderr() as captured:
            with rawpy.imread(path) as raw:
                if raw.raw_type != rawpy.RawType.Flat:
                    raise utils.UserError(f"{path}: a linear (already demosaiced) DNG, not a colour-filter mosaic: "
                                          "PyNET needs the single-channel Bayer data")
                pattern = raw.raw_pattern
                mosaic = np.array(raw.raw_image_visible if visible else raw.raw_image, dtype=np.uint16)
                colours = np.array(raw.raw_colors_visible if visible else raw.raw_colors)
                info = {
                    "color_desc": raw.color_desc.decode("ascii", "replace"),
                    "black_levels": [int(v) for v in raw.black_level_per_channel],
                    "white_level": int(raw.white_level),
                    "num_colors": int(raw.num_colors),
                    "pattern_shape": None if pattern is None else tuple(pattern.shape),
                }
    except utils.UserError:
        raise
    except Exception as exc:  # rawpy.LibRawError and its many subclasses
        raise utils.UserError(f"{path}: cannot read it as a raw DNG ({_libraw_reason(exc, captured)})") from None
    if mosaic.ndim != 2:
        raise utils.UserError(f"{path}: expected a single-channel mosaic, LibRaw gives shape {mosaic.shape}")
    return mosaic, colours, info


def _letters(colours, color_desc):
    return np.array([[color_desc[c] if c < len(color_desc) else "?" for c in row] for row in colours])


def bayer_pattern(colours, info, path: str = "") -> str:
    """The 2x2 pattern at (0,0) as 'RGGB', 'GRBG', 'GBRG' or 'BGGR'; UserError for anything else."""
    where = f"{path}: " if path else ""
    if info.get("pattern_shape") == (6, 6):
        raise utils.UserError(f"{where}X-Trans (6x6) colour filter: not supported, PyNET needs a 2x2 Bayer mosaic")
    if info.get("num_colors", 3) == 1:
        raise utils.UserError(f"{where}monochrome sensor: PyNET needs a 2x2 Bayer mosaic")
    window = _letters(colours[:8, :8], info["color_desc"])
    if window.shape[0] < 2 or window.shape[1] < 2:
        raise utils.UserError(f"{where}the mosaic is smaller than 2x2")
    found = "/".join("".join(row) for row in window[:4, :4])
    others = sorted(set(window.ravel()) - set("RGB"))
    if others:
        raise utils.UserError(f"{where}non-Bayer colour filter (colours {''.join(sorted(set(window.ravel())))}, "
                              f"top-left {found}): PyNET needs an RGGB-type Bayer mosaic")
    neighbours = (window[:, 1:] == window[:, :-1]).any() or (window[1:, :] == window[:-1, :]).any()
    if neighbours:
        raise utils.UserError(f"{where}Quad-Bayer or other non-Bayer layout (neighbouring pixels of one colour, "
                              f"top-left {found}): PyNET needs a 2x2 Bayer mosaic")
    cell = "".join(window[:2, :2].ravel())
    tiled = np.tile(window[:2, :2], (window.shape[0] // 2 + 1, window.shape[1] // 2 + 1))
    if cell not in PATTERNS or not (tiled[: window.shape[0], : window.shape[1]] == window).all():
        raise utils.UserError(f"{where}not a 2x2 Bayer pattern (top-left {found}): PyNET needs a 2x2 Bayer mosaic")
    return cell


def crop_to_rggb(mosaic, colours, pattern: str):
    """Drop the first row and/or column so that the mosaic starts with R at (0,0)."""
    rows, cols = PATTERNS[pattern]
    return mosaic[rows:, cols:], colours[rows:, cols:]


def crop_to_multiple(mosaic, colours, multiple: int = 32):
    """Keep the top-left part whose height and width are multiples of ``multiple`` (phase kept)."""
    height, width = mosaic.shape[0] // multiple * multiple, mosaic.shape[1] // multiple * multiple
    if height == 0 or width == 0:
        raise utils.UserError(f"the mosaic ({mosaic.shape[1]}x{mosaic.shape[0]}) is smaller than {multiple}x{multiple}")
    return mosaic[:height, :width], colours[:height, :width]


def normalize_mosaic(mosaic, colours, black_levels, white_level, black_out=DEFAULT_BLACK, white_out=PYNET_WHITE):
    """Map each pixel's black level (of its colour) to ``black_out`` and the white level to
    ``white_out``, linearly; rounded and clipped to [0, white_out]. Returns uint16."""
    black = np.asarray(black_levels, dtype=np.float64)[colours]
    span = np.maximum(float(white_level) - black, 1.0)
    scaled = black_out + (mosaic.astype(np.float64) - black) * (white_out - black_out) / span
    return np.clip(np.floor(scaled + 0.5), 0, white_out).astype(np.uint16)


def output_path(dng_path: str, output_dir=None) -> str:
    folder, name = os.path.split(dng_path)
    stem, ext = os.path.splitext(name)
    if ext.lower() not in DNG_EXTENSIONS:
        raise utils.UserError(f"{dng_path}: expected a .dng file")
    return os.path.join(output_dir if output_dir else folder, stem + ".png")


def collect_inputs(paths) -> list:
    """Expand folders to their .dng/.DNG files (sorted; dotfiles and temporary files skipped);
    check that every path exists."""
    if not paths:
        raise utils.UsageError("no DNG file given (usage: python dng_to_png.py photo.dng [more.dng|folder ...])")
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(path, n) for n in os.listdir(path)
                           if os.path.splitext(n)[1].lower() in DNG_EXTENSIONS and not utils.is_hidden(n)
                           and os.path.isfile(os.path.join(path, n)))
            if not found:
                raise utils.UserError(f"{path}: no .dng files in this folder")
            files.extend(found)
        elif os.path.isfile(path):
            output_path(path)  # refuses other extensions
            files.append(path)
        else:
            raise utils.UserError(f"{path}: file not found")
    return files


def write_png16(path: str, mosaic) -> None:
    """Single-channel 16-bit PNG, written atomically (as the reference's imageio.imwrite)."""
    import imageio.v3 as iio

    utils.write_file(path, iio.imwrite("<bytes>", np.ascontiguousarray(mosaic, dtype=np.uint16), extension=".png"))


def convert(path, output_dir=None, visible=False, rggb=False, normalize=False, crop32=False,
            black_level=DEFAULT_BLACK, log=print) -> str:
    """Convert one DNG; returns the PNG path. ``log`` receives the per-file report lines."""
    mosaic, colours, info = read_dng(path, visible)
    pattern = bayer_pattern(colours, info, path)
    notes = [f"pattern {pattern}"]
    if rggb and pattern != "RGGB":
        mosaic, colours = crop_to_rggb(mosaic, colours, pattern)
        rows, cols = PATTERNS[pattern]
        notes.append("dropped the first " + " and ".join(w for w, n in (("row", rows), ("column", cols)) if n)
                     + " -> RGGB")
    if normalize:
        mosaic = normalize_mosaic(mosaic, colours, info["black_levels"], info["white_level"], black_level)
        notes.append(f"black {info['black_levels']} -> {black_level}, white {info['white_level']} -> {PYNET_WHITE}")
    if crop32:
        mosaic, colours = crop_to_multiple(mosaic, colours, 32)
    target = output_path(path, output_dir)
    write_png16(target, mosaic)
    log(f"{path}: {', '.join(notes)} -> {target} ({mosaic.shape[1]}x{mosaic.shape[0]})")
    if pattern != "RGGB" and not rggb:
        log("  note: PyNET expects RGGB; add rggb=true to start the mosaic with R at (0,0)")
    top = int(mosaic.max()) if mosaic.size else 0
    if not normalize and top > PYNET_WHITE:
        log(f"  note: values up to {top} (white level {info['white_level']}) exceed PyNET's 10-bit range; "
            "add normalize=true")
    return target


SPEC = [
    utils.Arg("output_dir", str, None, "folder for the PNGs; none = beside each DNG"),
    utils.Arg("visible", utils.BOOL, False, "write LibRaw's visible area only (raw_image_visible)"),
    utils.Arg("rggb", utils.BOOL, False, "drop the first row/column as needed so the mosaic starts with R at (0,0)"),
    utils.Arg("normalize", utils.BOOL, False, "subtract the black level and map the white level to 10 bits (1023)"),
    utils.Arg("black_level", int, DEFAULT_BLACK, "black level of the normalized output (IMX380-like pedestal)",
              check=lambda v: None if 0 <= v < PYNET_WHITE else f"a value from 0 to {PYNET_WHITE - 1}"),
    utils.Arg("crop32", utils.BOOL, False, "cut height and width to multiples of 32 (for test_model.py)"),
]


def main(argv):
    args = utils.parse_args(argv, SPEC, "dng_to_png.py",
                            "Write each DNG's Bayer mosaic as a 16-bit PNG: "
                            "python dng_to_png.py photo.dng [more.dng|folder ...] [key=value ...]",
                            positional="files")
    files = collect_inputs(args["files"])
    if args["output_dir"]:
        utils.check_output_dir(args["output_dir"], "output_dir")
    targets = {}
    for path in files:
        target = output_path(path, args["output_dir"])
        if target in targets:
            raise utils.UserError(f"{path} and {targets[target]} would both be written to {target}")
        targets[target] = path
    for folder in sorted({os.path.dirname(t) or "." for t in targets}):
        utils.remove_stale_temps(folder)
    options = {k: args[k] for k in ("output_dir", "visible", "rggb", "normalize", "crop32", "black_level")}
    if len(files) == 1:
        convert(files[0], **options)
        return
    from tqdm import tqdm

    failed = []
    with tqdm(files, unit="file", file=sys.stderr) as bar:
        for path in bar:
            try:
                convert(path, log=tqdm.write, **options)
            except utils.UserError as err:
                failed.append(path)
                tqdm.write(f"warning: {err}", file=sys.stderr)
    if failed:
        raise utils.UserError(f"{len(failed)} of {len(files)} files could not be converted "
                              f"(first: {failed[0]}; see the warnings above)")
    print(f"converted {len(files)} files")


if __name__ == "__main__":
    sys.exit(utils.run(main))
