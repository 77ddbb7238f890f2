"""Image files: PNG mosaics, JPEG targets and reference photos read and checked, pictures written.

Every reader checks before it decodes and reports a bad file in one line naming it; every
writer encodes in memory and writes atomically (files.write_file).
"""

import io
import struct
import zlib

import numpy as np
import simplejpeg
from PIL import Image

import runtime
from cli import UserError
from files import open_file, read_bytes, require_file, write_file

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*")  # a DNG is a TIFF
_PNG_COLOUR_TYPES = {0: "greyscale", 2: "RGB", 3: "palette", 4: "greyscale+alpha", 6: "RGBA"}


def _not_png(path: str, head: bytes) -> str:
    if path.lower().endswith(".dng") or head[:4] in _TIFF_SIGNATURES:
        return (f"{path}: a DNG/TIFF raw file, not a PNG mosaic: convert it first with "
                f"python dng_to_png.py {path} (see its help for rggb= and normalize=)")
    return f"{path}: not a PNG file (expected a single-channel PNG Bayer mosaic)"


def png_header(path: str, data: bytes = None) -> dict:
    """Width, height, bit depth and colour type of a PNG from its IHDR chunk, without decoding;
    a one-line UserError for a missing file, a DNG (pointing to dng_to_png.py) or anything not a PNG."""
    if data is None:
        require_file(path)
        with open_file(path, "rb") as handle:
            data = handle.read(33)
    if not data:
        raise UserError(f"{path}: the file is empty (0 bytes), expected a PNG mosaic")
    if data[:8] != PNG_SIGNATURE:
        raise UserError(_not_png(path, data[:8]))
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise UserError(f"{path}: cannot read the PNG (no IHDR header): the file is corrupt or truncated")
    width, height, bits, colour = struct.unpack(">IIBB", data[16:26])
    return {"width": width, "height": height, "bits": bits, "colour": colour,
            "kind": _PNG_COLOUR_TYPES.get(colour, f"colour type {colour}")}


def mosaic_header(path: str, data: bytes = None) -> dict:
    """png_header, refusing anything but a single-channel 8- or 16-bit PNG."""
    header = png_header(path, data)
    if header["colour"] != 0 or header["bits"] not in (8, 16):
        raise UserError(f"{path}: expected a single-channel Bayer mosaic (8- or 16-bit greyscale PNG), found a "
                        f"PNG of type {header['kind']}, {header['bits']}-bit")
    return header


def _check_png_chunks(path: str, data: bytes) -> None:
    """Every chunk's CRC, up to IEND: corrupt data that a decoder might let through is refused."""
    pos = 8
    while True:
        if pos + 12 > len(data):
            raise UserError(f"{path}: cannot read the PNG (it ends before its IEND chunk): the file is truncated")
        length, kind = struct.unpack(">I4s", data[pos: pos + 8])
        end = pos + 12 + length
        if end > len(data):
            raise UserError(f"{path}: cannot read the PNG (chunk {kind!r} at byte {pos} runs past the end of "
                            f"the file): the file is truncated")
        (crc,) = struct.unpack(">I", data[end - 4: end])
        if zlib.crc32(data[pos + 4: end - 4]) != crc:
            raise UserError(f"{path}: cannot read the PNG (chunk {kind.decode('latin-1')!r} at byte {pos} fails its "
                            f"CRC check): the file is corrupt")
        if kind == b"IEND":
            return
        pos = end


def read_mosaic(path: str):
    """Read a single-channel Bayer mosaic PNG (8- or 16-bit container) as a 2-D uint16 array.

    One reader for every script: the PNG signature, header and every chunk's CRC are checked
    before Pillow decodes it, each failure a one-line UserError naming the file."""
    require_file(path)
    data = read_bytes(path)
    mosaic_header(path, data)
    _check_png_chunks(path, data)
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            image.load()
            raw = np.asarray(image)
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... for bad files
        raise UserError(f"{path}: cannot read the PNG ({pillow_reason(exc, data)})") from None
    if raw.ndim != 2:
        raise UserError(f"{path}: expected a single-channel Bayer mosaic, found an image of shape {raw.shape}")
    return raw.astype(np.uint16)


def read_jpeg(path: str, data: bytes = None):
    """Decode a JPEG strictly, as H x W x 3 uint8 RGB (the same pixels as Pillow's decoder);
    ``data``: the file's bytes when the caller has read them already.

    Pillow and TensorFlow decode a JPEG whose data are corrupt with at most a warning on
    stderr; libjpeg-turbo through simplejpeg with ``strict=True`` refuses it, naming the file."""
    if data is None:
        require_file(path)
        data = read_bytes(path)
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=False, fastupsample=False, strict=True)
    except ValueError as exc:
        reason = str(exc).strip() or exc.__class__.__name__
        raise UserError(f"{path}: cannot decode the JPEG ({reason}): the file is corrupt or truncated") from None


# Pillow's modes a photo may come in, and how each becomes RGB: an alpha or padding channel
# dropped, a palette or YCbCr converted. 16-bit RGB PNGs and TIFFs open as "RGB", each sample
# reduced to its high byte by Pillow's decoder.
_COLOUR_MODES = ("RGB", "RGBA", "RGBX", "RGBa", "P", "PA", "YCbCr")
_GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def read_photo(path: str):
    """A colour photo (JPEG, PNG or TIFF, told by its content) as H x W x 3 uint8 RGB: a JPEG
    strictly (read_jpeg), a PNG or TIFF through Pillow, 16-bit samples reduced to 8 bits (their
    high byte), an alpha channel dropped. Greyscale, CMYK and other non-RGB images are refused
    with one line naming the file, as are files of other formats and damaged ones."""
    require_file(path)
    data = read_bytes(path)
    if data[:3] == b"\xff\xd8\xff":
        return read_jpeg(path, data)
    try:
        with Image.open(io.BytesIO(data), formats=["PNG", "TIFF"]) as image:
            mode = image.mode
            if mode in _GREY_MODES:
                raise UserError(f"{path}: a greyscale image (mode {mode}): expected the reference camera's colour "
                                f"photo (RGB)")
            if mode not in _COLOUR_MODES:
                raise UserError(f"{path}: a {mode} image: expected an RGB photo (save it as RGB JPEG, PNG or TIFF)")
            image.load()
            rgb = np.asarray(image if mode == "RGB" else image.convert("RGB"))
    except UserError:
        raise
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... for bad files
        if isinstance(exc, Image.UnidentifiedImageError) and data:
            raise UserError(f"{path}: not a JPEG, PNG or TIFF photo") from None
        raise UserError(f"{path}: cannot read the photo ({pillow_reason(exc, data)})") from None
    return np.ascontiguousarray(rgb, dtype=np.uint8)


def to_uint(image, bits: int = 8, stretch: bool = False):
    """Float RGB in [0, 1] to uint8/uint16: clipped, or min-max stretched per image as the
    reference's ``scipy.misc.imsave`` did (``stretch=True``)."""
    image = np.asarray(image, dtype=np.float64)
    if stretch:
        low, high = image.min(), image.max()
        image = (image - low) / (high - low) if high > low else np.zeros_like(image)
    top = 255 if bits == 8 else 65535
    # floor(x + 0.5), as scipy's bytescale rounded, rather than numpy's round-half-to-even
    return np.floor(np.clip(image, 0.0, 1.0) * top + 0.5).astype(np.uint8 if bits == 8 else np.uint16)


def write_png(path: str, image, compression: int = -1) -> None:
    """Write an HxW or HxWxC uint8/uint16 array as PNG, atomically; ``compression`` 0-9 (-1:
    zlib's default).

    Every PNG of the project goes through here, encoded by tf.io.encode_png: it writes every
    kind the project needs, 16-bit RGB included, which Pillow cannot. TensorFlow is started
    here, not at the top, so that a script's ``help`` does not start it."""
    tf = runtime.start_tensorflow()
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if not image.size:
        raise UserError(f"{path}: not written: the image is empty ({image.shape[1]}x{image.shape[0]})")
    if image.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"write_png takes uint8 or uint16 images, not {image.dtype}")
    write_file(path, tf.io.encode_png(image, compression=compression).numpy())


def write_mosaic(path: str, mosaic) -> None:
    """Write a Bayer mosaic as ZRR stores them: an 8-bit PNG when every value fits in 8 bits,
    else a 16-bit PNG (fast compression: mosaics are noisy and compress little more)."""
    mosaic = np.asarray(mosaic)
    small = mosaic.size and int(mosaic.max()) <= 255
    write_png(path, mosaic.astype(np.uint8) if small else mosaic.astype(np.uint16), compression=1)


def write_jpeg(path: str, image, quality: int = 95) -> None:
    """Write an HxWx3 uint8 array as JPEG, atomically."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    write_file(path, buffer.getvalue())


def pillow_header(path: str, what: str, data: bytes = None) -> tuple:
    """(format, mode, (width, height)) of an image file from its header, through Pillow, without
    decoding the pixels; ``data``: the file's bytes when the caller has read them, else only the
    header is read (a dataset check reads headers). What Pillow cannot open is a UserError naming
    the file and saying why (pillow_reason), ``what`` naming the kind expected."""
    with open_file(path, "rb") if data is None else io.BytesIO(data) as handle:
        head = handle.read(1)
        handle.seek(0)
        try:
            with Image.open(handle) as image:
                return image.format, image.mode, image.size
        except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... for bad files
            raise UserError(f"{path}: cannot read the {what} ({pillow_reason(exc, head)})") from None


def pillow_reason(exc, data: bytes = None) -> str:
    """Why Pillow could not read a file, in words: an empty file, an image above Pillow's
    decompression-bomb limit, an unknown format or damaged data (never a Python object's repr).
    ``data``: the file's bytes (or its first), which tell an empty file."""
    if data is not None and not data:
        return "the file is empty (0 bytes)"
    if isinstance(exc, Image.DecompressionBombError):
        return (f"{str(exc).split(',')[0]}: too large to decode safely (a decompression bomb, or an image far "
                f"larger than any photo)")
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not an image format Pillow recognises"
    return f"{str(exc) or exc.__class__.__name__}: the file is corrupt or truncated"
