"""Scene pairs for make_dataset.py: each scene shot by the phone (its RAW) and by the reference
camera (a photo), found in a folder, read and aligned.

One scene per name: the phone's RAW as ``NAME.dng`` (any case) or a single-channel PNG Bayer
mosaic as dng_to_png.py writes it, the reference camera's photo as ``NAME.jpg``, ``.jpeg``,
``.png`` (in colour) or ``.tif``/``.tiff``; a PNG's header says which of the two it is.

    found = find_pairs("shots/")
    cut = cut_scene(found.pairs[0], patch_size=448)  # align.py forks: run it where TensorFlow is not

The RAW is read exactly as ``dng_to_png.py rggb=true normalize=true`` writes it (RGGB from the
top-left, the sensor's black and white levels of camera.py); a PNG RAW is taken as already in
that convention.
"""

import os
from dataclasses import dataclass, field

import numpy as np

import align
import camera
import dng
import files
import images
from cli import UserError

RAW_EXTENSIONS = (".dng",)  # and single-channel .png
PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".tif", ".tiff")  # and colour .png
_PHOTO_PNG_COLOURS = (2, 3, 6)  # RGB, palette, RGBA


@dataclass
class Pair:
    name: str
    raw: str
    reference: str


@dataclass
class Found:
    pairs: list  # of Pair, sorted by name
    skipped: list  # of (name, one-line reason): files that pair with nothing, ambiguous names


def find_pairs(folder: str) -> Found:
    """The scene pairs of ``folder`` (its files only, dotfiles and writers' temporaries left
    out), and a line for each file left out: unpaired, ambiguous, unreadable PNG header, or of
    another kind (one line for all of those)."""
    if not os.path.isdir(folder):
        raise UserError(f"{folder}: folder of scene pairs not found")
    raws, photos, skipped, others = {}, {}, [], []
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        if files.is_hidden(entry) or not os.path.isfile(path):
            continue
        stem, ext = os.path.splitext(entry)
        kind = _kind(path, ext.lower(), stem, skipped)
        if kind == "other":
            others.append(entry)
        elif kind:
            (raws if kind == "raw" else photos).setdefault(stem, []).append(path)
    pairs = []
    for name in sorted(raws.keys() | photos.keys()):
        raw, photo = raws.get(name, []), photos.get(name, [])
        if len(raw) > 1 or len(photo) > 1:
            several = raw if len(raw) > 1 else photo
            what = "RAW files" if len(raw) > 1 else "reference photos"
            names = ", ".join(os.path.basename(p) for p in several)
            skipped.append((name, f"{folder}: scene {name} has several {what} ({names}): keep one; skipped"))
        elif not photo:
            skipped.append((name, f"{raw[0]}: no reference photo {name}.jpg, .jpeg, .png, .tif or .tiff beside it: "
                                  "skipped"))
        elif not raw:
            skipped.append((name, f"{photo[0]}: no RAW {name}.dng (or single-channel {name}.png) beside it: skipped"))
        else:
            pairs.append(Pair(name, raw[0], photo[0]))
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        skipped.append(("", f"{folder}: {len(others)} file(s) of other kinds left out ({shown}): a RAW is .dng or a "
                            "single-channel .png, a reference photo .jpg, .jpeg, .png, .tif or .tiff"))
    return Found(pairs, skipped)


def _kind(path, ext, stem, skipped):
    """"raw", "photo", "other", or None for a PNG whose header rules it out (said in ``skipped``)."""
    if ext == ".png":
        try:
            header = images.png_header(path)
        except UserError as err:
            skipped.append((stem, f"{err}: skipped"))
            return None
        if header["colour"] == 0:
            return "raw"
        if header["colour"] in _PHOTO_PNG_COLOURS:
            return "photo"
        skipped.append((stem, f"{path}: a PNG of type {header['kind']}: neither a single-channel RAW mosaic nor a "
                              "colour photo: skipped"))
        return None
    if ext in RAW_EXTENSIONS:
        return "raw"
    return "photo" if ext in PHOTO_EXTENSIONS else "other"


# ---------------------------------------------------------------------------------------
# reading

def read_raw(path: str):
    """(mosaic, notes): the phone's Bayer mosaic in PyNET's convention, uint16 with even sides,
    and what was done to it. A DNG as ``dng_to_png.py rggb=true normalize=true`` writes it; a
    PNG as it is, refused above the sensor's white level or blank."""
    if path.lower().endswith(".png"):
        mosaic = images.read_mosaic(path)
        top = int(mosaic.max()) if mosaic.size else 0
        if top > camera.WHITE_LEVEL:
            raise UserError(f"{path}: values up to {top}, above the {camera.BITS}-bit white level "
                            f"{camera.WHITE_LEVEL}: convert the DNG with python dng_to_png.py FILE.dng rggb=true "
                            f"normalize=true, or give make_dataset.py the DNG itself")
        camera.check_not_blank(mosaic, path)
        notes = ["PNG mosaic taken as RGGB at the sensor's levels"]
    else:
        mosaic, notes, _, _ = dng.read_raw(path, rggb=True, normalize=True)
    even = camera.even_crop(mosaic)
    if even.shape != mosaic.shape:
        notes.append("odd last row or column dropped")
    return np.ascontiguousarray(even), notes


# ---------------------------------------------------------------------------------------
# one scene aligned and cut

@dataclass
class Cut:
    """What aligning one scene gave: ``result`` (align.SceneResult, the kept windows carrying
    their patches) or ``failure``, the one-line reason it gave nothing."""
    pair: Pair
    status: str  # "aligned", "unreadable" or "not aligned"
    failure: str = ""
    notes: list = field(default_factory=list)  # what reading the RAW did
    shape: tuple = ()  # the mosaic's
    result: align.SceneResult = None


def cut_scene(pair: Pair, patch_size=448, min_ncc=0.9, workers=align.WORKERS, seed=0) -> Cut:
    """Read the scene's two pictures and align them (align.align_scene); a file that cannot be
    read or a pair that does not match gives a Cut with its reason, not an exception."""
    try:
        mosaic, notes = read_raw(pair.raw)
        reference = images.read_photo(pair.reference)
    except UserError as err:
        return Cut(pair, "unreadable", str(err))
    if min(mosaic.shape) < patch_size:
        return Cut(pair, "not aligned", f"{pair.raw}: the mosaic ({mosaic.shape[1]}x{mosaic.shape[0]}) is smaller "
                                        f"than one {patch_size}x{patch_size} patch", notes, mosaic.shape)
    try:
        result = align.align_scene(mosaic, reference, patch_size, min_ncc, camera.BLACK_LEVEL, camera.WHITE_LEVEL,
                                   workers=workers, seed=seed)
    except align.AlignmentFailed as err:
        return Cut(pair, "not aligned", f"{pair.name}: not aligned with {pair.reference}: {err.reason}", notes,
                   mosaic.shape)
    return Cut(pair, "aligned", "", notes, mosaic.shape, result)
