"""Benchmark of make_dataset.py on a 12 MP pair, the size of a phone's photo: the alignment
engine alone (align.align_scene on arrays in memory) and the whole path of one scene (reading a
12 MP DNG and a 24 MP JPEG, aligning, cutting and writing the 448 x 448 patches), each in a
fresh child process that reports its wall time, CPU seconds and peak RSS.

The pair is synthetic: a collage of scikit-image's bundled photographs upscaled to a 24 MP
reference (6000 x 4000 by default), and the RAW mosaic (4000 x 3000) of the same scene seen
through a known homography (0.75 mosaic pixels per reference pixel, a 1.5 degree rotation, a
little perspective, a narrower field of view), unprocessed into a 10-bit RGGB mosaic as
tests/scenes.py does, in a process of its own; the whole path reads it as a 10-bit DNG (pidng)
beside the reference as a JPEG of quality 95.

    python benchmarks/bench_make_dataset.py [patch_size=448] [width=6000] [height=4000] [scale=0.75]
                                            [workers=2] [parts=align,make] [json=out.json]

Prints one line per measurement: the machine and its load (the cores are shared: compare the
CPU seconds, which the load does not inflate, as well as the wall time); for align_scene, the
peak RSS of the engine's process and of its largest worker (a forked worker's RSS counts the
pages it shares with the engine, so their sum is an upper bound), the keypoints, the windows
kept and dropped by reason, and the error of the recovered homography against the true one
(mosaic pixels, over the frame); for make_dataset.py, the CPU seconds of all its processes
and the peak RSS of its main process (TensorFlow's PNG encoder included) and of the largest
of its helper processes (the alignment), sampled from /proc, with the largest sum of all its
processes' PSS at one time, and the patches written.
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

import cli  # noqa: E402

TILES = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle", "astronaut", "rocket", "coffee", "chelsea")


def parts_check(text):
    parts = text.split(",")
    return None if parts and set(parts) <= {"align", "make"} else "align and/or make (comma-separated)"


SPEC = [
    cli.Arg("patch_size", int, 448, "window side on the mosaic (even)", check=cli.positive),
    cli.Arg("width", int, 6000, "the reference photo's width", check=cli.positive),
    cli.Arg("height", int, 4000, "the reference photo's height", check=cli.positive),
    cli.Arg("scale", float, 0.75, "mosaic pixels per reference pixel", check=cli.positive),
    cli.Arg("workers", int, 2, "alignment worker processes", check=cli.positive),
    cli.Arg("parts", str, "align,make", "what to time: align, make (comma-separated)", check=parts_check),
    cli.Arg("json", str, "", "also write the results to this JSON file"),
]


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


def cpu_seconds(start, end):
    """CPU seconds of this process and of its children waited for, between two os.times()."""
    return (end.user + end.system + end.children_user + end.children_system
            - start.user - start.system - start.children_user - start.children_system)


def peaks():
    """Peak RSS (MiB) of this process and of the largest of its children waited for."""
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0)


def child(folder, patch_size, workers):
    """Run the engine on the saved pair and write its figures (this is the fresh process)."""
    import align

    mosaic, reference = np.load(os.path.join(folder, "mosaic.npy")), np.load(os.path.join(folder, "reference.npy"))
    start, cpu = time.perf_counter(), os.times()
    result = align.align_scene(mosaic, reference, patch_size=patch_size, workers=workers)
    wall, seconds = time.perf_counter() - start, cpu_seconds(cpu, os.times())
    engine, worker = peaks()
    figures = {"wall_s": wall, "cpu_s": seconds, "workers": workers, "peak_rss_mib": engine,
               "worker_peak_rss_mib": worker, "matches": result.matches, "inliers": result.inliers,
               "residual_px": result.residual, "statuses": dict(Counter(w.status for w in result.windows)),
               "homography": result.homography.tolist()}
    with open(os.path.join(folder, "figures.json"), "w") as handle:
        json.dump(figures, handle)


def descendants(pid):
    """The process ids under ``pid`` (Linux /proc), children before their own children."""
    found = []
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            children = [int(c) for c in handle.read().split()]
    except OSError:
        return found
    for child_pid in children:
        found += [child_pid] + descendants(child_pid)
    return found


def status_kib(pid, field, table="status"):
    try:
        with open(f"/proc/{pid}/{table}") as handle:
            return next(int(line.split()[1]) for line in handle if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return 0


class MemorySampler:
    """Samples the memory of this process's descendants every 0.5 s: each one's peak (VmHWM:
    since its exec for a spawned helper, whose getrusage peak would start from the RSS of the
    process it was forked from) and the largest sum of their proportional set sizes and this
    process's RSS at one time (PSS: a page that n processes share counts 1/n in each, so that
    forked workers' shared pages are counted once). ``cpu``: the CPU seconds the sampling took (this
    process's, to be left out of the figures)."""

    def __init__(self):
        import threading

        self.peaks, self.total, self.cpu, self._stop = {}, 0, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        while not self._stop.wait(0.5):
            total = status_kib(os.getpid(), "VmRSS")  # shares little with the spawned helper; its PSS is costly
            for pid in descendants(os.getpid()):
                self.peaks[pid] = max(self.peaks.get(pid, 0), status_kib(pid, "VmHWM"))
                total += status_kib(pid, "Pss", "smaps_rollup")
            self.total = max(self.total, total)
            self.cpu = time.thread_time()


def child_make(folder, patch_size, workers):
    """Run make_dataset.py's main on the DNG and JPEG of the pair (this is the fresh process)."""
    import contextlib
    import io

    import make_dataset

    output = os.path.join(folder, "dataset")
    printed = io.StringIO()
    start, cpu = time.perf_counter(), os.times()
    with contextlib.redirect_stdout(printed), MemorySampler() as memory:
        make_dataset.main([f"pairs={os.path.join(folder, 'pairs')}", f"output={output}", f"patch_size={patch_size}",
                           f"workers={workers}", "progress=false"])
    wall, seconds = time.perf_counter() - start, cpu_seconds(cpu, os.times()) - memory.cpu
    main_process = peaks()[0]
    figures = {"wall_s": wall, "cpu_s": seconds, "sampling_cpu_s": memory.cpu, "peak_rss_mib": main_process,
               "helper_peak_rss_mib": max(memory.peaks.values(), default=0) / 1024.0,
               "all_processes_peak_pss_mib": memory.total / 1024.0,
               "patches": len(os.listdir(os.path.join(output, "train", "huawei_raw"))),
               "scene_line": printed.getvalue().splitlines()[0]}
    with open(os.path.join(folder, "make.json"), "w") as handle:
        json.dump(figures, handle)


def homography_error(found, true, shape):
    """Return the largest distance (mosaic pixels) between the two homographies over the frame."""
    import scenes

    y, x = np.mgrid[0:shape[0]:50, 0:shape[1]:50].astype(np.float64)
    rx, ry = scenes.apply(np.asarray(found), x, y)
    bx, by = scenes.apply(np.linalg.inv(true), rx, ry)
    return float(np.max(np.hypot(bx - x, by - y)))


def make(folder, width, height, scale):
    """Build the pair and save it with its true homography, and as a DNG and a JPEG (a process
    of its own, see main)."""
    from PIL import Image

    from helpers import write_dng

    mosaic, reference, matrix = synthetic_pair(width, height, scale)
    for name, array in (("mosaic", mosaic), ("reference", reference), ("homography", matrix)):
        np.save(os.path.join(folder, f"{name}.npy"), array)
    os.makedirs(os.path.join(folder, "pairs"))
    write_dng(os.path.join(folder, "pairs", "scene.dng"), mosaic, "RGGB", 10, 64, 1023)
    Image.fromarray(reference).save(os.path.join(folder, "pairs", "scene.jpg"), quality=95)


def report_align(figures, matrix, shape):
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


def report_make(figures):
    print(f"make_dataset.py, one scene (DNG and JPEG read, aligned, {figures['patches']} patches written): wall time "
          f"{figures['wall_s']:.1f} s, CPU {figures['cpu_s']:.1f} s (all its processes; the memory sampling's "
          f"{figures['sampling_cpu_s']:.1f} s left out), load average "
          f"{os.getloadavg()[0]:.1f} after")
    print(f"make_dataset.py peak RSS: {figures['peak_rss_mib']:.0f} MiB main process (TensorFlow's PNG encoder "
          f"included), {figures['helper_peak_rss_mib']:.0f} MiB largest helper process (the alignment; target <= "
          f"2048 MiB), {figures['all_processes_peak_pss_mib']:.0f} MiB all processes at once (sum of their PSS, "
          f"shared pages counted once)")
    print(f"  {figures['scene_line']}")


def run_child(script, *args):
    subprocess.run([sys.executable, script, *map(str, args)], check=True)


def main(argv):
    if argv[:1] in (["--make"], ["--child"], ["--child-make"]):
        job = {"--make": lambda f, w, h, s: make(f, int(w), int(h), float(s)),
               "--child": lambda f, p, w: child(f, int(p), int(w)),
               "--child-make": lambda f, p, w: child_make(f, int(p), int(w))}[argv[0]]
        return job(*argv[1:])
    options = cli.parse_args(argv, SPEC, "benchmarks/bench_make_dataset.py",
                             "Time make_dataset.py on a 12 MP pair: align_scene alone and the whole path of one scene.")
    script = os.path.abspath(__file__)
    parts = options["parts"].split(",")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}, Python {platform.python_version()}")
    # This process never holds the pair: a child's getrusage peak starts from its parent's
    # memory (it is forked before it executes), so the parent stays small.
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_align_") as folder:
        start = time.perf_counter()
        run_child(script, "--make", folder, options["width"], options["height"], options["scale"])
        built = time.perf_counter() - start
        mosaic = np.load(os.path.join(folder, "mosaic.npy"), mmap_mode="r")
        reference = np.load(os.path.join(folder, "reference.npy"), mmap_mode="r")
        shape, matrix = mosaic.shape, np.load(os.path.join(folder, "homography.npy"))
        print(f"pair: mosaic {shape[1]}x{shape[0]} ({mosaic.size / 1e6:.1f} MP), reference "
              f"{reference.shape[1]}x{reference.shape[0]} ({reference.shape[0] * reference.shape[1] / 1e6:.1f} MP), "
              f"built in {built:.1f} s")
        del mosaic, reference
        if "align" in parts:
            run_child(script, "--child", folder, options["patch_size"], options["workers"])
            with open(os.path.join(folder, "figures.json")) as handle:
                results["align"] = json.load(handle)
            report_align(results["align"], matrix, shape)
        if "make" in parts:
            run_child(script, "--child-make", folder, options["patch_size"], options["workers"])
            with open(os.path.join(folder, "make.json")) as handle:
                results["make"] = json.load(handle)
            report_make(results["make"])
    if options["json"]:
        with open(options["json"], "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    sys.exit(cli.run(main))
