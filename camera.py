"""The camera profile: the phone sensor PyNET reads, and the Bayer packing of its mosaic.

The released PyNET was trained on the Huawei P20's Sony IMX380: 10-bit RGGB mosaics with a
black level of 64. Everything that reads, writes or makes mosaics takes these constants and
the packing from here (dng_to_png.py, make_dataset.py, load_dataset.py, test_model.py, the
export, the synthetic sample), so adapting the project to another sensor's native data means
changing this one module.
"""

import numpy as np

from cli import UserError

NAME = "Sony IMX380 (Huawei P20)"
BITS = 10
# ZRR does not document the sensor's black level (pedestal); 64 is the usual black level of
# 10-bit Sony IMX sensors (256 at 12 bits), taken as an assumption by the baseline ISP, the
# synthetic sample and dng_to_png.py normalize=true.
BLACK_LEVEL = 64
WHITE_LEVEL = (1 << BITS) - 1
# The reference divides 10-bit code values by 4 * 255, not by 1023.
RAW_SCALE = 4 * 255

# Colours of the 2x2 cell at (0, 0), (0, 1), (1, 0), (1, 1): R at the top left.
CFA = "RGGB"
# The network's four input channels, the reference's [B, Gb, R, Gr], and the (row, column) of
# each in the 2x2 cell; "Gb" is the green on the red rows, as the reference names it.
PACKED_CHANNELS = ("B", "Gb", "R", "Gr")
PACKED_SITES = ((1, 1), (0, 1), (0, 0), (1, 0))


def bayer_planes(mosaic) -> list:
    """The four colour planes of a mosaic of even height and width, in the network's channel
    order: plain slicing, so NumPy arrays and TensorFlow tensors alike."""
    return [mosaic[row::2, column::2] for row, column in PACKED_SITES]


def even_crop(mosaic):
    """A NumPy mosaic without its odd last row or column: it has no partner in its 2x2 cell."""
    return mosaic[: mosaic.shape[0] // 2 * 2, : mosaic.shape[1] // 2 * 2]


def extract_bayer_channels(raw):
    """Pack an RGGB mosaic (H x W) into the network's (H/2) x (W/2) x 4 input, divided by
    RAW_SCALE, as the reference's function of this name."""
    planes = bayer_planes(even_crop(np.asarray(raw)))
    return np.stack(planes, axis=-1).astype(np.float32) / RAW_SCALE


def mosaic_from_packed(packed):
    """The inverse of extract_bayer_channels: (..., h, w, 4) packed inputs back to (..., 2h, 2w)
    code values, float64."""
    packed = np.asarray(packed, np.float64) * RAW_SCALE
    mosaic = np.empty(packed.shape[:-3] + (2 * packed.shape[-3], 2 * packed.shape[-2]))
    for channel, (row, column) in enumerate(PACKED_SITES):
        mosaic[..., row::2, column::2] = packed[..., channel]
    return mosaic


def mosaic_from_rgb(image):
    """H x W x 3 -> H x W mosaic: each site keeps its own colour of the CFA."""
    mosaic = np.empty(image.shape[:2], dtype=image.dtype)
    for site, colour in enumerate(CFA):
        row, column = divmod(site, 2)
        mosaic[row::2, column::2] = image[row::2, column::2, "RGB".index(colour)]
    return mosaic


def site_colours(height: int, width: int) -> np.ndarray:
    """H x W array of 0 (R), 1 (G), 2 (B): the colour of every site of a mosaic."""
    cell = np.array(["RGB".index(colour) for colour in CFA]).reshape(2, 2)
    return np.tile(cell, ((height + 1) // 2, (width + 1) // 2))[:height, :width]


# A mosaic whose most common value covers more of it than this carries no picture: a raw file
# whose image data a tool stripped reads as zeros or one value (a real photo, even black or
# clipped, has noise and some detail).
BLANK_SHARE = 0.99


def check_not_blank(mosaic, path: str) -> None:
    """UserError naming ``path`` when the mosaic is constant or nearly so (BLANK_SHARE)."""
    counts = np.bincount(np.asarray(mosaic, np.uint16).ravel(), minlength=1)
    value = int(counts.argmax())
    share = counts[value] / max(1, mosaic.size)
    if share > BLANK_SHARE:
        what = "constant" if share == 1 else f"nearly constant ({100 * share:.1f}% of its pixels)"
        raise UserError(f"{path}: the mosaic is {what} at value {value}: no image data (a raw file whose pixel "
                        f"data were stripped, or a blank frame)")
