"""Zurich RAW-to-RGB (ZRR) data: Bayer packing and the dataset readers."""

import numpy as np

# The reference divides 10-bit code values by 4 * 255, not by 1023.
RAW_SCALE = 4 * 255


def extract_bayer_channels(raw):
    """Pack an RGGB mosaic (H x W) into the network's (H/2) x (W/2) x 4 input, divided by 1020.

    Channel order is the reference's [B, Gb, R, Gr], taken at the mosaic positions
    (1,1), (0,1), (0,0), (1,0); "Gb" is the green on the red rows, as the reference names it.
    """
    raw = np.asarray(raw)
    # An odd row or column has no partner in its 2x2 cell: drop it, as the packing cannot use it.
    raw = raw[: raw.shape[0] // 2 * 2, : raw.shape[1] // 2 * 2]
    ch_b = raw[1::2, 1::2]
    ch_gb = raw[0::2, 1::2]
    ch_r = raw[0::2, 0::2]
    ch_gr = raw[1::2, 0::2]
    packed = np.stack((ch_b, ch_gb, ch_r, ch_gr), axis=-1).astype(np.float32)
    return packed / RAW_SCALE
