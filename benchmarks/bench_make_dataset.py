"""Benchmark of the alignment engine (align.align_scene) on a 12 MP pair, the size of a phone's
photo: the wall time and peak memory of aligning one scene and cutting its 448 x 448 windows,
everything the engine does included, the file reading excluded.

The pair is synthetic and built in memory: a collage of scikit-image's bundled photographs
upscaled to a 24 MP reference (6000 x 4000 by default), and the RAW mosaic (4000 x 3000) of the
same scene seen through a known homography (0.75 mosaic pixels per reference pixel, a 1.5 degree
rotation, a little perspective, a narrower field of view), unprocessed into a 10-bit RGGB mosaic
as tests/scenes.py does, in a process of its own. The engine runs in a fresh child process that
loads the two arrays and reports its own peak RSS (getrusage), so the figure is the engine's
with its inputs.

    python benchmarks/bench_make_dataset.py [patch_size=448] [width=6000] [height=4000] [scale=0.75]
                                            [workers=2] [json=out.json]

Prints one line per measurement: the machine and its load (the cores are shared: compare the
CPU seconds, which the load does not inflate, as well as the wall time), the pair, the wall
time and CPU seconds, the peak RSS of the engine's process and of its largest worker (a forked
worker's RSS counts the pages it shares with the engine, so their sum is an upper bound), the
keypoints, the windows kept and dropped by reason, and the error of the recovered homography
against the true one (mosaic pixels, over the frame).
"""

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

DEFAULTS = {"patch_size": 448, "width": 6000, "height": 4000, "scale": 0.75, "workers": 2, "json": ""}
TILES = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle", "astronaut", "rocket", "coffee", "chelsea")


def parse(argv):
    """Return the options from ``key=value`` arguments."""
    options = dict(DEFAULTS)
    for arg in argv:
        key, _, value = arg.partition("=")
        if key not in options or not value and key != "json":
            raise SystemExit(f"unknown or empty argument {arg!r}; expected key=value with key in {sorted(options)}")
        options[key] = type(DEFAULTS[key])(value)
    return options


def collage(width, height):
    """Return a width x height RGB photo: nine bundled photos in a 3 x 3 grid, upscaled (bicubic)."""
    from PIL import Image

    import scenes

    cell_w, cell_h = width // 3, height // 3
    canvas = Image.new("RGB", (cell_w * 3, cell_h * 3))
    for i, name in enumerate(TILES):
        tile = Image.fromarray(scenes.photo(name))
        if i >= 5:  # the repeated photos mirrored, so that no two tiles match each other's keypoints
            tile = tile.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        canvas.paste(tile.resize((cell_w, cell_h), Image.Resampling.BICUBIC), (i % 3 * cell_w, i // 3 * cell_h))
    return np.asarray(canvas.resize((width, height), Image.Resampling.BICUBIC))


def synthetic_pair(width, height, scale, seed=0):
    """Return (mosaic, reference, true homography) for a 4:3 mosaic of 2/3 the reference's width."""
    from scipy import ndimage

    import scenes

    reference = collage(width, height)
    shape = (height * 3 // 4 // 2 * 2, width * 2 // 3 // 2 * 2)
    matrix = scenes.homography(shape, reference.shape, scale=scale, angle=1.5, tilt=(2e-6, -1e-6), offset=(40.0, -25.0))
    sigma = 0.5 / scale
    channels = [ndimage.gaussian_filter(reference[..., c].astype(np.float32), sigma) for c in range(3)]
    rgb = np.empty(shape + (3,), np.uint8)
    for top in range(0, shape[0], 500):  # in bands of rows: a 12 MP frame of float64 coordinates is 200 MB
        y, x = np.mgrid[top:min(top + 500, shape[0]), 0:shape[1]].astype(np.float64)
        rx, ry = scenes.apply(matrix, x, y)
        band = np.stack([ndimage.map_coordinates(c, [ry, rx], order=1, mode="nearest") for c in channels], -1)
        rgb[top:top + len(y)] = np.clip(np.rint(band), 0, 255)
    mosaic = scenes.to_mosaic(rgb, seed)  # one camera for the whole frame
    return mosaic, reference, matrix


def child(folder, patch_size, workers):
    """Run the engine on the saved pair and write its figures (this is the fresh process)."""
    import align

    mosaic, reference = np.load(os.path.join(folder, "mosaic.npy")), np.load(os.path.join(folder, "reference.npy"))
    start, cpu = time.perf_counter(), os.times()
    result = align.align_scene(mosaic, reference, patch_size=patch_size, workers=workers)
    wall, end = time.perf_counter() - start, os.times()
    seconds = (end.user + end.system + end.children_user + end.children_system
               - cpu.user - cpu.system - cpu.children_user - cpu.children_system)
    figures = {"wall_s": wall, "cpu_s": seconds, "workers": workers,
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
               "worker_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0,
               "matches": result.matches, "inliers": result.inliers, "residual_px": result.residual,
               "statuses": dict(Counter(w.status for w in result.windows)), "homography": result.homography.tolist()}
    with open(os.path.join(folder, "figures.json"), "w") as handle:
        json.dump(figures, handle)


def homography_error(found, true, shape):
    """Return the largest distance (mosaic pixels) between the two homographies over the frame."""
    import scenes

    y, x = np.mgrid[0:shape[0]:50, 0:shape[1]:50].astype(np.float64)
    rx, ry = scenes.apply(np.asarray(found), x, y)
    bx, by = scenes.apply(np.linalg.inv(true), rx, ry)
    return float(np.max(np.hypot(bx - x, by - y)))


def make(folder, width, height, scale):
    """Build the pair and save it with its true homography (a process of its own, see main)."""
    mosaic, reference, matrix = synthetic_pair(width, height, scale)
    for name, array in (("mosaic", mosaic), ("reference", reference), ("homography", matrix)):
        np.save(os.path.join(folder, f"{name}.npy"), array)


def main(argv):
    if argv[:1] == ["--make"]:
        return make(argv[1], int(argv[2]), int(argv[3]), float(argv[4]))
    if argv[:1] == ["--child"]:
        return child(argv[1], int(argv[2]), int(argv[3]))
    if argv[:1] in (["help"], ["-h"], ["--help"]):
        print(__doc__)
        return
    options = parse(argv)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}, Python {platform.python_version()}")
    script = os.path.abspath(__file__)
    # This process never holds the pair: a child's getrusage peak starts from its parent's
    # memory (it is forked before it executes), so the parent stays small.
    with tempfile.TemporaryDirectory(prefix="bench_align_") as folder:
        start = time.perf_counter()
        subprocess.run([sys.executable, script, "--make", folder, str(options["width"]), str(options["height"]),
                        str(options["scale"])], check=True)
        built = time.perf_counter() - start
        mosaic = np.load(os.path.join(folder, "mosaic.npy"), mmap_mode="r")
        reference = np.load(os.path.join(folder, "reference.npy"), mmap_mode="r")
        shape, matrix = mosaic.shape, np.load(os.path.join(folder, "homography.npy"))
        print(f"pair: mosaic {shape[1]}x{shape[0]} ({mosaic.size / 1e6:.1f} MP), reference "
              f"{reference.shape[1]}x{reference.shape[0]} ({reference.shape[0] * reference.shape[1] / 1e6:.1f} MP), "
              f"built in {built:.1f} s")
        del mosaic, reference
        subprocess.run([sys.executable, script, "--child", folder, str(options["patch_size"]),
                        str(options["workers"])], check=True)
        with open(os.path.join(folder, "figures.json")) as handle:
            figures = json.load(handle)
    figures["homography_error_px"] = homography_error(figures["homography"], matrix, shape)
    statuses = figures["statuses"]
    print(f"align_scene wall time: {figures['wall_s']:.1f} s with {figures['workers']} worker(s) (target <= 30 s), "
          f"load average {os.getloadavg()[0]:.1f} after")
    print(f"align_scene CPU: {figures['cpu_s']:.1f} s (engine and workers)")
    print(f"align_scene peak RSS: {figures['peak_rss_mib']:.0f} MiB engine (inputs and imports included), "
          f"{figures['worker_peak_rss_mib']:.0f} MiB largest worker (target <= 2048 MiB)")
    print(f"keypoints: {figures['matches']} matches, {figures['inliers']} inliers, "
          f"residual {figures['residual_px']:.2f} px")
    print(f"windows: {sum(statuses.values())}, kept {statuses.get('kept', 0)}, dropped "
          + ", ".join(f"{k} {v}" for k, v in sorted(statuses.items()) if k != "kept"))
    print(f"homography error against the truth: {figures['homography_error_px']:.2f} px (max over the frame)")
    if options["json"]:
        with open(options["json"], "w") as handle:
            json.dump(figures, handle, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
