"""Raw camera files (DNG and what else LibRaw reads) as Bayer mosaics in PyNET's convention.

    mosaic, notes = dng.read_raw("photo.dng", rggb=True, normalize=True)

``read_dng`` gives LibRaw's mosaic with the file's colours and levels; ``read_raw`` adds what
dng_to_png.py and make_dataset.py apply: the RGGB phase, the black and white levels mapped to
the sensor's range of camera.py, a crop to multiples of 32. Non-Bayer files (X-Trans,
Quad-Bayer, linear DNGs) are refused: PyNET's packing only makes sense for a 2x2 Bayer mosaic.
"""


import logging
import math
import os

import numpy as np
import rawpy
import tifffile

import camera
import files
import runtime
from cli import UserError

PATTERNS = {"RGGB": (0, 0), "GRBG": (0, 1), "GBRG": (1, 0), "BGGR": (1, 1)}  # pattern -> (rows, cols) to drop


def _libraw_reason(exc, captured) -> str:
    message = exc.args[0] if exc.args else ""
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    detail = captured.get("text", "").replace("\n", "; ")
    return "; ".join(part for part in (message or exc.__class__.__name__, detail) if part)


# TIFF tags of a DNG's raw image (the DNG specification)
_CFA, _LINEAR_RAW = 32803, 34892   # PhotometricInterpretation of raw data
_UNCOMPRESSED = 1                  # Compression


def _dng_raw_page(tif):
    """The IFD of a DNG's main raw image (NewSubFileType 0, colour-filter or linear raw data),
    in the IFD chain or a SubIFD; None for a file that is not a DNG or has none."""
    if not tif.is_dng:
        return None
    pages = []
    for page in tif.pages:
        pages.append(page)
        pages.extend(getattr(page, "pages", None) or [])  # SubIFDs: cameras put the raw there
    raws = [p for p in pages if int(p.subfiletype) == 0 and p.photometric in (_CFA, _LINEAR_RAW)]
    return max(raws, key=lambda p: p.imagewidth * p.imagelength, default=None)


def missing_data_reason(path: str):
    """Why a DNG's raw image data are not (all) in the file, or None: its strips or tiles lie
    past the file's end or have no bytes, or, uncompressed, hold fewer bytes than its declared
    width x height x bits need. A metadata tool that strips the pixels keeps the header, and
    LibRaw then reads zeros without an error. Files that are not DNGs are left to LibRaw."""

    log = logging.getLogger("tifffile")  # its notes on odd tags would reach stderr unasked
    level = log.level
    log.setLevel(logging.CRITICAL + 1)
    try:
        with tifffile.TiffFile(path) as tif:
            page = _dng_raw_page(tif)
            if page is None:
                return None
            size = os.path.getsize(path)
            width, height = page.imagewidth, page.imagelength
            extents = list(zip(page.dataoffsets, page.databytecounts))
            compressed = page.compression != _UNCOMPRESSED
            row_bytes = math.ceil(width * page.samplesperpixel * page.bitspersample / 8)
    except Exception:  # a structure tifffile cannot parse (it raises several types): LibRaw says what it reads
        return None
    finally:
        log.setLevel(level)
    declared = f"declares a {width}x{height} raw image"
    held = sum(max(0, min(offset + count, size) - offset) for offset, count in extents)
    if not held:
        return f"{declared} but holds {size:,} bytes: its image data is missing"
    if not compressed and held < height * row_bytes:
        return (f"{declared} of {height * row_bytes:,} bytes but its strips or tiles hold {held:,}: its image "
                f"data is incomplete (the file is truncated or its data stripped)")
    if any(count == 0 or offset + count > size for offset, count in extents):
        return (f"{declared} but part of its data is missing (strips or tiles empty or past the end of the "
                f"file, {size:,} bytes): the file is truncated or its data stripped")
    return None


def read_dng(path: str, visible: bool = False):
    """Read a raw file with rawpy/LibRaw.

    Returns (mosaic uint16 H x W, colours int H x W as LibRaw's colour indices, info dict with
    color_desc, black_levels (per colour index), white_level, num_colors, pattern_shape).
    """
    files.require_file(path)
    reason = missing_data_reason(path)
    if reason:
        raise UserError(f"{path}: {reason}")
    captured = {}
    try:
        with runtime.c_stderr_captured() as captured:
            with rawpy.imread(path) as raw:
                if raw.raw_type != rawpy.RawType.Flat:
                    raise UserError(f"{path}: a linear (already demosaiced) DNG, not a colour-filter mosaic: "
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
    except UserError:
        raise
    except Exception as exc:  # rawpy.LibRawError and its many subclasses
        raise UserError(f"{path}: cannot read it as a raw DNG ({_libraw_reason(exc, captured)})") from None
    if mosaic.ndim != 2:
        raise UserError(f"{path}: expected a single-channel mosaic, LibRaw gives shape {mosaic.shape}")
    return mosaic, colours, info


def _letters(colours, color_desc):
    return np.array([[color_desc[c] if c < len(color_desc) else "?" for c in row] for row in colours])


def bayer_pattern(colours, info, path: str = "") -> str:
    """The 2x2 pattern at (0,0) as 'RGGB', 'GRBG', 'GBRG' or 'BGGR'; UserError for anything else."""
    where = f"{path}: " if path else ""
    if info.get("pattern_shape") == (6, 6):
        raise UserError(f"{where}X-Trans (6x6) colour filter: not supported, PyNET needs a 2x2 Bayer mosaic")
    if info.get("num_colors", 3) == 1:
        raise UserError(f"{where}monochrome sensor: PyNET needs a 2x2 Bayer mosaic")
    window = _letters(colours[:8, :8], info["color_desc"])
    if window.shape[0] < 2 or window.shape[1] < 2:
        raise UserError(f"{where}the mosaic is smaller than 2x2")
    found = "/".join("".join(row) for row in window[:4, :4])
    others = sorted(set(window.ravel()) - set("RGB"))
    if others:
        raise UserError(f"{where}non-Bayer colour filter (colours {''.join(sorted(set(window.ravel())))}, "
                              f"top-left {found}): PyNET needs an RGGB-type Bayer mosaic")
    neighbours = (window[:, 1:] == window[:, :-1]).any() or (window[1:, :] == window[:-1, :]).any()
    if neighbours:
        raise UserError(f"{where}Quad-Bayer or other non-Bayer layout (neighbouring pixels of one colour, "
                              f"top-left {found}): PyNET needs a 2x2 Bayer mosaic")
    cell = "".join(window[:2, :2].ravel())
    tiled = np.tile(window[:2, :2], (window.shape[0] // 2 + 1, window.shape[1] // 2 + 1))
    if cell not in PATTERNS or not (tiled[: window.shape[0], : window.shape[1]] == window).all():
        raise UserError(f"{where}not a 2x2 Bayer pattern (top-left {found}): PyNET needs a 2x2 Bayer mosaic")
    return cell


def crop_to_rggb(mosaic, colours, pattern: str):
    """Drop the first row and/or column so that the mosaic starts with R at (0,0)."""
    rows, cols = PATTERNS[pattern]
    return mosaic[rows:, cols:], colours[rows:, cols:]


def crop_to_multiple(mosaic, colours, multiple: int = 32, path: str = ""):
    """Keep the top-left part whose height and width are multiples of ``multiple`` (phase kept)."""
    height, width = mosaic.shape[0] // multiple * multiple, mosaic.shape[1] // multiple * multiple
    if height == 0 or width == 0:
        where = f"{path}: " if path else ""
        raise UserError(f"{where}the mosaic ({mosaic.shape[1]}x{mosaic.shape[0]}) is smaller than "
                        f"{multiple}x{multiple}, too small to cut to multiples of {multiple}")
    return mosaic[:height, :width], colours[:height, :width]


def normalize_mosaic(mosaic, colours, black_levels, white_level, black_out=camera.BLACK_LEVEL,
                     white_out=camera.WHITE_LEVEL):
    """Map each pixel's black level (of its colour) to ``black_out`` and the white level to
    ``white_out``, linearly; rounded and clipped to [0, white_out]. Returns uint16."""
    black = np.asarray(black_levels, dtype=np.float64)[colours]
    span = np.maximum(float(white_level) - black, 1.0)
    scaled = black_out + (mosaic.astype(np.float64) - black) * (white_out - black_out) / span
    return np.clip(np.floor(scaled + 0.5), 0, white_out).astype(np.uint16)


def read_raw(path, visible=False, rggb=False, normalize=False, crop32=False, black_level=camera.BLACK_LEVEL):
    """The mosaic of a raw file as dng_to_png.py writes it, and the notes saying what was done:
    (mosaic uint16, notes, pattern found, LibRaw's info)."""
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
        notes.append(f"black {info['black_levels']} -> {black_level}, white {info['white_level']} -> "
                     f"{camera.WHITE_LEVEL}")
    if crop32:
        mosaic, colours = crop_to_multiple(mosaic, colours, 32, path)
    camera.check_not_blank(mosaic, path)
    return mosaic, notes, pattern, info
