"""Make a training dataset in the ZRR layout from your own phone's RAWs and a reference
camera's photos of the same scenes, as Zurich RAW-to-RGB was made (PyNET, Ignatov et al.,
CVPRW 2020, section 2).

    python make_dataset.py pairs=shots/ output=raw_images/mine/

``pairs=`` holds one scene per name: the phone's RAW (NAME.dng, or a single-channel PNG mosaic
as dng_to_png.py writes it) and the reference camera's photo (NAME.jpg, .jpeg, .png, .tif or
.tiff). Each scene is aligned (align.py: a homography from keypoints, then each window refined
to a sub-pixel shift and a small rotation; windows that correlate below min_ncc, whose parts
disagree, or that are flat, black, clipped or outside the reference are dropped) and cut into
pairs of patches. Whole scenes go to train/ or test/, never parts of one scene to both.
Written as load_dataset.py reads it:

    train/huawei_raw/{i}.png  train/canon/{i}.jpg  test/...  test/huawei_full_resolution/NAME.png
    manifest.csv  one line per patch: scene, split, files, window, refinement, NCC
    report.csv    one line per scene: matches, inliers, residual, windows kept and dropped by reason
    MADE_BY_MAKE_DATASET.txt  what made it (the scripts then say "your camera's dataset")

The dataset is built in a hidden folder inside ``output`` and moved in when complete: an
interrupted or failed run leaves ``output`` as it was. See docs/own-camera.md.
"""

import csv
import datetime
import io
import os
import shutil
import sys
from collections import Counter

import numpy as np
from tqdm import tqdm

import align
import camera
import cli
import files
import images
import load_dataset
import pairs
import runtime

SPLITS = load_dataset.SPLITS
MANIFEST, REPORT = "manifest.csv", "report.csv"
MARKER = load_dataset.OWN_MARKER_FILE
# What a build writes in ``output`` and so replaces there, with the marker of another kind of dataset.
OUTPUTS = (*SPLITS, MANIFEST, REPORT, MARKER)
REPLACED = (*OUTPUTS, load_dataset.MARKER_FILE)
MANIFEST_COLUMNS = ("scene", "split", "index", "raw", "target", "y", "x", "dy", "dx", "angle", "ncc",
                    "reference_x", "reference_y")
REPORT_COLUMNS = ("scene", "raw", "reference", "status", "split", "patches", "matches", "inliers", "residual_px",
                  "windows", *align.STATUSES, "homography", "notes", "reason")


def _multiple_of_32(value):
    return None if value >= 32 and value % 32 == 0 else "a multiple of 32 (the packed patch a multiple of 16)"


SPEC = [
    cli.Arg("pairs", str, None, "required: the folder of the scenes, NAME.dng (or a single-channel NAME.png) and "
            "the reference's NAME.jpg, .jpeg, .png, .tif or .tiff"),
    cli.Arg("output", str, "raw_images/mine/", "where the dataset goes (an earlier make_dataset.py output there "
            "is replaced)"),
    cli.Arg("patch_size", int, load_dataset.MOSAIC, "side of the patches, in mosaic pixels (load_dataset.py and "
            "train_model.py read ZRR's 448)", check=_multiple_of_32),
    cli.Arg("min_ncc", float, 0.9, "windows whose luminance correlates less with the reference's are dropped",
            check=lambda v: None if 0 < v <= 1 else "a value above 0, at most 1"),
    cli.Arg("test_fraction", float, 0.1, "share of the scenes that go to test/ (at least one when there are 2 "
            "or more, never all)", check=lambda v: None if 0 < v < 1 else "a value between 0 and 1"),
    cli.Arg("seed", int, 0, "random seed of the split and of the keypoints' RANSAC"),
    cli.Arg("jpeg_quality", int, 95, "JPEG quality of the targets",
            check=lambda v: None if 1 <= v <= 100 else "a value from 1 to 100"),
    cli.Arg("workers", int, align.WORKERS, "processes aligning a scene's windows", check=cli.positive),
    cli.Arg("overwrite", cli.BOOL, False, "replace a dataset in output= that make_dataset.py did not make "
            "(its train/, test/ and marker files; other files stay)"),
    cli.Arg("progress", cli.BOOL, True, "show a progress bar over the scenes"),
]


def warn(message: str) -> None:
    tqdm.write(f"warning: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------
# checks before the work

def check_output(output: str, pairs_dir: str, overwrite: bool) -> None:
    """UserError unless ``output`` can take the dataset: missing, empty, an earlier output of
    make_dataset.py, or (``overwrite``) another dataset; never the pairs folder itself."""
    if files.is_url(output) or files.is_url(pairs_dir):
        raise cli.UsageError(f"output={output}, pairs={pairs_dir}: expected local folders")
    files.check_output_dir(output, "output")
    if os.path.realpath(output) == os.path.realpath(pairs_dir):
        raise cli.UsageError(f"output={output}: the folder of the pairs itself: choose another folder")
    if not os.path.isdir(output) or overwrite or os.path.isfile(os.path.join(output, MARKER)):
        return
    entries = sorted(n for n in os.listdir(output) if not files.is_hidden(n))
    present = [f"{n}/" for n in SPLITS if n in entries]
    if present:
        kind = load_dataset.dataset_kind(output)
        raise cli.UserError(f"{output}: already holds a dataset ({', '.join(present)}, {kind}) that make_dataset.py "
                            f"did not make: choose another output=, or add overwrite=true to replace it")
    if entries:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise cli.UserError(f"{output}: not empty ({shown}) and not made by make_dataset.py: choose another "
                            f"output=, or add overwrite=true to write the dataset there")


# ---------------------------------------------------------------------------------------
# the split, and what is said of each scene

def split_scenes(names, test_fraction: float, seed: int) -> set:
    """The test scenes among ``names``: test_fraction of them, rounded, at least one when
    there are two or more and never all; the same for the same names and seed."""
    names = sorted(names)
    if len(names) < 2:
        return set()
    count = min(len(names) - 1, max(1, round(test_fraction * len(names))))
    order = np.random.RandomState(seed).permutation(len(names))
    return {names[i] for i in order[:count]}


def window_counts(result) -> Counter:
    return Counter(w.status for w in result.windows)


def scene_line(cut) -> str:
    """The summary printed for an aligned scene: keypoints, residual, windows kept and dropped."""
    result, counts = cut.result, window_counts(cut.result)
    dropped = ", ".join(f"{s} {counts[s]}" for s in align.STATUSES[1:] if counts[s])
    return (f"{cut.pair.name}: {result.matches} keypoint matches, {result.inliers} inliers, residual "
            f"{result.residual:.2f} px; {counts['kept']} of {len(result.windows)} windows kept"
            + (f" (dropped: {dropped})" if dropped else ""))


def report_row(cut, split: str) -> dict:
    row = {"scene": cut.pair.name, "raw": os.path.basename(cut.pair.raw),
           "reference": os.path.basename(cut.pair.reference), "status": cut.status, "split": split,
           "patches": 0, "notes": "; ".join(cut.notes), "reason": cut.failure}
    if cut.result is not None:
        counts = window_counts(cut.result)
        result = cut.result
        row.update({s: counts[s] for s in align.STATUSES}, patches=counts["kept"], matches=result.matches,
                   inliers=result.inliers, residual_px=f"{result.residual:.3f}", windows=len(result.windows),
                   homography=" ".join(f"{v:.9g}" for v in result.homography.ravel()))
        if not counts["kept"]:
            row.update(status="no window kept", reason=f"{cut.pair.name}: every window was dropped")
    return row


def manifest_row(cut, window, split: str, index: int) -> dict:
    """A patch's line: where its window is in the mosaic, its refinement and where its centre
    lies in the reference photo."""
    centre = window.x + (cut.result.patch_size - 1) / 2, window.y + (cut.result.patch_size - 1) / 2
    x, y, w = cut.result.window_homography(window) @ np.array([*centre, 1.0])
    return {"scene": cut.pair.name, "split": split, "index": index,
            "raw": f"{split}/{load_dataset.RAW_FOLDER}/{index}.png",
            "target": f"{split}/{load_dataset.TARGET_FOLDER}/{index}.jpg", "y": window.y, "x": window.x,
            "dy": f"{window.shift[0]:.3f}", "dx": f"{window.shift[1]:.3f}", "angle": f"{window.angle:.4f}",
            "ncc": f"{window.ncc:.4f}", "reference_x": f"{x / w:.2f}", "reference_y": f"{y / w:.2f}"}


# ---------------------------------------------------------------------------------------
# writing, in the folder being built

def stage(folder: str, cut, jpeg_quality: int) -> None:
    """Write the scene's kept patches as {k}.png and {k}.jpg in ``folder``, then let their arrays go."""
    for k, window in enumerate(cut.result.kept):
        images.write_mosaic(os.path.join(folder, f"{k}.png"), window.raw)
        images.write_jpeg(os.path.join(folder, f"{k}.jpg"), window.target, jpeg_quality)
        window.raw = window.target = None


def place(work: str, staged, test_names) -> list:
    """Move the staged patches into train/ and test/ under running indices (scenes in name
    order); return the manifest's rows."""
    counters, rows = dict.fromkeys(SPLITS, 0), []
    for folder, cut in staged:
        split = "test" if cut.pair.name in test_names else "train"
        for k, window in enumerate(cut.result.kept):
            row = manifest_row(cut, window, split, counters[split])
            counters[split] += 1
            os.replace(os.path.join(folder, f"{k}.png"), os.path.join(work, row["raw"]))
            os.replace(os.path.join(folder, f"{k}.jpg"), os.path.join(work, row["target"]))
            rows.append(row)
    return rows


def write_csv(path: str, columns, rows) -> None:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    files.write_file(path, text.getvalue().encode())


def marker_text(pairs_dir, options, counts, test_names) -> str:
    return "\n".join([
        "YOUR CAMERA'S DATASET - made by make_dataset.py (PyNET TF2), NOT the Zurich RAW-to-RGB (ZRR) dataset.",
        "",
        f"Made from the scene pairs in {os.path.abspath(pairs_dir)}: each phone RAW aligned with its reference",
        "photo (align.py) and cut into patches in the ZRR layout. manifest.csv says where each patch comes",
        "from, report.csv how each scene aligned (docs/own-camera.md explains both).",
        "",
        f"made: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"scenes: {counts['pairs']} pairs, {counts['usable']} gave patches; test scenes: "
        f"{', '.join(sorted(test_names)) or 'none'}",
        f"patches: train {counts['train']}, test {counts['test']}",
        "options: " + ", ".join(f"{k}={v}" for k, v in options.items()),
        f"sensor (camera.py): {camera.NAME}, black level {camera.BLACK_LEVEL}, white level {camera.WHITE_LEVEL}",
    ]) + "\n"


# ---------------------------------------------------------------------------------------
# the build

def align_scenes(scene_pairs, work: str, job: tuple, jpeg_quality: int, progress: bool) -> list:
    """Align every pair in a helper process, one at a time, while the patches of the previous
    one are written here; return the (staging folder, Cut) of every scene, in name order.
    ``job``: the arguments of pairs.cut_scene after the pair.

    The helper (runtime.CleanProcess) is a fresh interpreter that never imports TensorFlow:
    align.py forks its workers there, never from this process, where images.write_png runs
    TensorFlow's PNG encoder, whose thread pools a fork could leave with a lock held forever.
    Starting the helper is paid once per run; the scenes' arrays never cross between the
    processes, only each scene's patches come back (benchmarks/README.md, "Own camera")."""
    staged = []
    with runtime.CleanProcess() as helper, tqdm(total=len(scene_pairs), unit="scene", file=sys.stderr, desc="scenes",
                                                disable=None if progress else True) as bar:
        helper.submit(pairs.cut_scene, scene_pairs[0], *job)
        runtime.start_tensorflow()  # the PNG encoder's, while the helper aligns the first scene
        for number, pair in enumerate(scene_pairs):
            try:
                cut = helper.result()
            except runtime.HelperDied as err:
                cut = pairs.Cut(pair, "failed", f"{pair.name}: {err}")
            if number + 1 < len(scene_pairs):
                helper.submit(pairs.cut_scene, scene_pairs[number + 1], *job)
            folder = os.path.join(work, "scenes", str(number))
            if cut.result is not None:
                tqdm.write(scene_line(cut))
                stage(folder, cut, jpeg_quality)
            else:
                warn(f"{cut.failure}: skipped")
            staged.append((folder, cut))
            bar.update()
    return staged


def build(pairs_dir, output, patch_size=load_dataset.MOSAIC, min_ncc=0.9, test_fraction=0.1, seed=0,
          jpeg_quality=95, workers=align.WORKERS, overwrite=False, progress=True) -> dict:
    """Make the dataset (see the module's docstring); return the counts of pairs, usable scenes
    and patches per split. Ctrl-C or SIGTERM: cli.Interrupted, ``output`` as it was."""
    check_output(output, pairs_dir, overwrite)
    found = pairs.find_pairs(pairs_dir)
    for _, message in found.skipped:
        warn(message)
    if not found.pairs:
        raise cli.UserError(f"{pairs_dir}: no scene pairs (NAME.dng or a single-channel NAME.png beside NAME.jpg, "
                            f".jpeg, .png, .tif or .tiff)")
    made_output = not os.path.isdir(output)
    os.makedirs(output, exist_ok=True)
    files.remove_stale_temps(output)
    work = os.path.join(output, f".building-{os.getpid()}")
    options = {"patch_size": patch_size, "min_ncc": min_ncc, "workers": workers, "seed": seed}
    try:
        try:
            counts = _build_aside(found, pairs_dir, work, options, test_fraction, jpeg_quality, progress)
        except KeyboardInterrupt as stop:
            raise cli.Interrupted(f"stopped by {_signal(stop)}: {output} left as it was, nothing written") from None
        try:
            files.swap_in(work, output, [n for n in OUTPUTS if os.path.exists(os.path.join(work, n))], REPLACED)
        except KeyboardInterrupt as stop:
            raise cli.Interrupted(f"stopped by {_signal(stop)} once the dataset was in {output}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if made_output and not os.listdir(output):  # a failed first run leaves no empty folder either
            os.rmdir(output)
    return counts


def _signal(stop: KeyboardInterrupt) -> str:
    return stop.args[0] if stop.args else "SIGINT"


def _build_aside(found, pairs_dir, work, options, test_fraction, jpeg_quality, progress) -> dict:
    """Everything of the dataset, in ``work``."""
    job = (options["patch_size"], options["min_ncc"], options["workers"], options["seed"])
    staged = align_scenes(found.pairs, work, job, jpeg_quality, progress)
    usable = [(folder, cut) for folder, cut in staged if cut.result is not None and cut.result.kept]
    if not usable:
        raise cli.UserError(f"{pairs_dir}: none of the {len(staged)} scenes gave a patch (see the warnings above); "
                            f"nothing written")
    test_names = split_scenes([cut.pair.name for _, cut in usable], test_fraction, options["seed"])
    for split in SPLITS if test_names else ("train",):
        for sub in (load_dataset.RAW_FOLDER, load_dataset.TARGET_FOLDER):
            os.makedirs(os.path.join(work, split, sub))
    rows = place(work, usable, test_names)
    for _, cut in usable:
        if cut.pair.name in test_names:  # read again: the helper keeps no mosaic between scenes
            images.write_mosaic(os.path.join(work, "test", load_dataset.FULL_RES_FOLDER, f"{cut.pair.name}.png"),
                                pairs.read_raw(cut.pair.raw)[0])
    split_of = {cut.pair.name: ("test" if cut.pair.name in test_names else "train") for _, cut in usable}
    report = [report_row(cut, split_of.get(cut.pair.name, "")) for _, cut in staged]
    report += [{"scene": name, "status": "skipped", "reason": reason} for name, reason in found.skipped if name]
    write_csv(os.path.join(work, MANIFEST), MANIFEST_COLUMNS, rows)
    write_csv(os.path.join(work, REPORT), REPORT_COLUMNS, report)
    counts = {"pairs": len(staged), "usable": len(usable), "test_scenes": sorted(test_names),
              **Counter(row["split"] for row in rows)}
    counts.setdefault("train", 0)
    counts.setdefault("test", 0)
    everything = {**options, "test_fraction": test_fraction, "jpeg_quality": jpeg_quality}
    files.write_file(os.path.join(work, MARKER), marker_text(pairs_dir, everything, counts, test_names).encode())
    if not test_names:
        warn("only one scene gave patches: all are in train/ and there is no test/, which train_model.py and "
             "evaluate_accuracy.py need: add scenes")
    return counts


def main(argv):
    args = cli.parse_args(argv, SPEC, "make_dataset.py", __doc__.strip().split("\n\n")[0].replace("\n", " "))
    if not args["pairs"]:
        raise cli.UsageError("pairs= is missing: the folder of scene pairs (python make_dataset.py pairs=DIR "
                             "output=raw_images/mine/)")
    if args["patch_size"] != load_dataset.MOSAIC:
        print(f"note: patch_size={args['patch_size']}: load_dataset.py and train_model.py read ZRR's "
              f"{load_dataset.MOSAIC}x{load_dataset.MOSAIC} patches")
    options = {k: args[k] for k in ("patch_size", "min_ncc", "test_fraction", "seed", "jpeg_quality", "workers",
                                    "overwrite", "progress")}
    with cli.signals_as_interrupts():
        counts = build(args["pairs"], args["output"], **options)
    print(f"wrote {load_dataset.KIND_OWN} to {args['output']}: {counts['train']} train patches, {counts['test']} "
          f"test patches, from {counts['usable']} of {counts['pairs']} scenes (test: "
          f"{', '.join(counts['test_scenes']) or 'none'}); see {os.path.join(args['output'], REPORT)}")


if __name__ == "__main__":
    sys.exit(cli.run(main))
