"""make_dataset.py (and pairs.py) on scenes whose truth is known (tests/scenes.py), written as
real DNGs with pidng beside the untouched photo as the reference JPEG. Every check compares
with an independent truth: the mosaic dng_to_png.py writes for the same DNG (read back with
pypng), the scene's true geometry and its truly warped photo (read back with Pillow).

The pairs folder (ZRR's 448-pixel patches, so that load_dataset.py and train_model.py read
the output):
* astro: 1024 x 1024 RGGB mosaic (a 2 x 2 grid of windows, centred), 10-bit DNG (black 64, white
  1023), 2 mosaic pixels per photo pixel;
* moto: 896 x 1344, written as a BGGR 12-bit DNG (black 256, white 4095) with one extra row and
  column on each side, so that rggb=true and normalize=true both matter; another photo pasted
  over one window (an occluder);
* stranger: a mosaic of the cat beside a photo of a coffee cup (no match);
* lonely.DNG and orphan.jpg, paired with nothing, and notes.txt.
"""

import contextlib
import csv
import io
import os
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import png  # pypng
import pytest
from PIL import Image

import cli
import dng_to_png
import images
import load_dataset
import make_dataset
import pairs
import scenes
from helpers import ROOT, write_dng

# one worker builds this module's shared fixtures (pytest-xdist --dist loadgroup)
pytestmark = pytest.mark.xdist_group("make_dataset")

P = 448
POSITION_TOLERANCE = 0.5  # mosaic pixels
MIN_PSNR = 30.0  # dB, each target JPEG against the truly warped photo (observed 33.5-38 here)
OCCLUDED = (448, 448)  # moto's window under the occluder
ENV = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "2"}


def read_png(path):
    """A single-channel PNG through pypng (an independent decoder)."""
    _, _, rows, info = png.Reader(filename=str(path)).read()
    assert info["greyscale"] and info["planes"] == 1
    return np.vstack([np.asarray(row, dtype=np.uint16) for row in rows])


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def to_12_bits(mosaic):
    """The 10-bit mosaic (black 64, white 1023) in the codes of a 12-bit sensor (black 256, white 4095)."""
    return np.clip(np.rint(256 + (mosaic.astype(np.float64) - 64) * 3839 / 959), 0, 4095).astype(np.uint16)


def write_jpeg(path, photo):
    Image.fromarray(photo).save(path, format="JPEG", quality=95)


def write_pairs(folder):
    """The scenes of the module's docstring; returns them by name."""
    folder.mkdir()
    astro = scenes.make_scene("astronaut", mosaic_shape=(1024, 1024), scale=2.0, angle=2.0)
    moto = scenes.make_scene("motorcycle", mosaic_shape=(896, 1344), scale=2.0, angle=-1.0,
                             occluder=(448, 448, 448, 448, "astronaut"), seed=1)
    stranger = scenes.make_scene("chelsea", mosaic_shape=(448, 448), scale=1.4, seed=2)
    write_dng(folder / "astro.dng", astro.mosaic, "RGGB", 10, 64, 1023)
    write_dng(folder / "moto.dng", np.pad(to_12_bits(moto.mosaic), 1, mode="edge"), "BGGR", 12, 256, 4095)
    write_dng(folder / "stranger.dng", stranger.mosaic, "RGGB", 10, 64, 1023)
    write_dng(folder / "lonely.DNG", stranger.mosaic, "RGGB", 10, 64, 1023)
    for name, photo in (("astro", astro.photo), ("moto", moto.photo), ("stranger", scenes.photo("coffee")),
                        ("orphan", stranger.photo)):
        write_jpeg(folder / f"{name}.jpg", photo)
    (folder / "notes.txt").write_text("shot on a tripod")
    return {"astro": astro, "moto": moto}


def build_quietly(*args, **kwargs):
    """make_dataset.build, its printed lines returned: (counts, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        counts = make_dataset.build(*args, progress=False, **kwargs)
    return counts, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def made(module_tmp):
    root = module_tmp("own")
    truth = write_pairs(root / "pairs")
    counts, out, err = build_quietly(str(root / "pairs"), str(root / "out"))
    converted = {name: read_png(dng_to_png.convert(str(root / "pairs" / f"{name}.dng"), str(root / "png"), rggb=True,
                                                   normalize=True, log=lambda line: None))
                 for name in truth}
    return SimpleNamespace(root=root, out=root / "out", truth=truth, converted=converted, counts=counts, stdout=out,
                           stderr=err, manifest=read_csv(root / "out" / "manifest.csv"),
                           report={row["scene"]: row for row in read_csv(root / "out" / "report.csv")})


# ---------------------------------------------------------------------------------------
# the patches against the truth

def test_raw_patches_are_what_dng_to_png_writes_bit_for_bit(made):
    assert {row["scene"] for row in made.manifest} == {"astro", "moto"}
    for row in made.manifest:
        patch = read_png(made.out / row["raw"])
        y, x = int(row["y"]), int(row["x"])
        assert patch.shape == (P, P) and y % 2 == 0 and x % 2 == 0
        np.testing.assert_array_equal(patch, made.converted[row["scene"]][y:y + P, x:x + P])


def test_bggr_12_bit_dng_comes_back_as_the_rggb_10_bit_mosaic(made):
    """The moto DNG starts with B and holds 12-bit codes: its patches are the scene's RGGB mosaic."""
    mosaic = made.truth["moto"].mosaic
    rows = [row for row in made.manifest if row["scene"] == "moto"]
    assert rows
    for row in rows:
        y, x = int(row["y"]), int(row["x"])
        patch = read_png(made.out / row["raw"]).astype(int)
        assert patch.max() <= 1023
        assert np.abs(patch - mosaic[y:y + P, x:x + P]).max() <= 1
    assert "pattern BGGR" in made.report["moto"]["notes"] and "4095 -> 1023" in made.report["moto"]["notes"]


def test_manifest_positions_within_half_a_pixel_of_the_truth(made):
    errors = []
    for row in made.manifest:
        scene = made.truth[row["scene"]]
        cx, cy = int(row["x"]) + (P - 1) / 2, int(row["y"]) + (P - 1) / 2
        back_x, back_y = scenes.apply(np.linalg.inv(scene.homography), float(row["reference_x"]),
                                      float(row["reference_y"]))
        dx, dy = scene.displacement(cx, cy)
        errors.append(np.hypot(back_x - (cx + dx), back_y - (cy + dy)))
    print(f"{len(errors)} patches: centre error max {max(errors):.3f} px, mean {np.mean(errors):.3f} px")
    assert max(errors) < POSITION_TOLERANCE


def test_targets_are_the_truly_warped_photo(made):
    psnr = []
    for row in made.manifest:
        with Image.open(made.out / row["target"]) as image:
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == (P, P)
            target = np.asarray(image).astype(np.float64)
        truth = made.truth[row["scene"]].true_target(int(row["y"]), int(row["x"]), P).astype(np.float64)
        psnr.append(10 * np.log10(255.0**2 / np.mean((target - truth) ** 2)))
    print(f"target PSNR: min {min(psnr):.1f} dB, median {np.median(psnr):.1f} dB")
    assert min(psnr) >= MIN_PSNR


# ---------------------------------------------------------------------------------------
# drops, failures and what is said of them

def test_occluded_windows_are_dropped_and_reported(made):
    kept = {(int(r["y"]), int(r["x"])) for r in made.manifest if r["scene"] == "moto"}
    assert OCCLUDED not in kept
    assert len(kept) >= 2  # its textured windows inside the reference are kept
    row = made.report["moto"]
    assert int(row["ncc"]) + int(row["parallax"]) >= 1 and int(row["kept"]) == int(row["patches"]) == len(kept)
    assert sum(int(row[s]) for s in ("kept", "outside", "black", "clipped", "flat", "ncc", "parallax")) == \
        int(row["windows"]) == 6
    line = next(line for line in made.stdout.splitlines() if line.startswith("moto: "))
    assert f"{row['matches']} keypoint matches, {row['inliers']} inliers" in line and "dropped: " in line


def test_an_unrelated_photo_gives_no_patch_and_one_line(made):
    row = made.report["stranger"]
    assert row["status"] == "not aligned" and row["patches"] == "0"
    assert "do not show the same scene" in row["reason"] and "\n" not in row["reason"]
    lines = [line for line in made.stderr.splitlines() if "stranger" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: stranger: not aligned with ")
    assert made.report["astro"]["status"] == "aligned" and int(made.report["astro"]["patches"]) >= 2


def test_unpaired_files_are_warned_and_reported(made):
    err = made.stderr
    assert "lonely.DNG: no reference photo lonely.jpg" in err and "orphan.jpg: no RAW orphan.dng" in err
    assert "1 file(s) of other kinds left out (notes.txt)" in err
    assert made.report["lonely"]["status"] == made.report["orphan"]["status"] == "skipped"
    assert "Traceback" not in err


# ---------------------------------------------------------------------------------------
# the dataset as a whole

def test_split_is_by_scene_with_full_resolution_test_mosaics(made):
    split_of = {}
    for row in made.manifest:
        assert split_of.setdefault(row["scene"], row["split"]) == row["split"]
    assert sorted(split_of.values()) == ["test", "train"]  # two usable scenes: one of each
    for split in ("train", "test"):
        indices = [int(r["index"]) for r in made.manifest if r["split"] == split]
        assert sorted(indices) == list(range(len(indices))) == list(range(load_dataset.num_patches(made.out, split)))
    test_scene = next(name for name, split in split_of.items() if split == "test")
    assert os.listdir(made.out / "test" / "huawei_full_resolution") == [f"{test_scene}.png"]
    full = read_png(made.out / "test" / "huawei_full_resolution" / f"{test_scene}.png")
    converted = made.converted[test_scene]
    np.testing.assert_array_equal(full, converted[:converted.shape[0] // 2 * 2, :converted.shape[1] // 2 * 2])
    assert made.report[test_scene]["split"] == "test"


def test_split_scenes_is_deterministic_and_keeps_train_and_test():
    names = [f"s{i}" for i in range(20)]
    assert make_dataset.split_scenes(names, 0.1, 0) == make_dataset.split_scenes(names[::-1], 0.1, 0)
    assert len(make_dataset.split_scenes(names, 0.1, 0)) == 2 and len(make_dataset.split_scenes(names, 0.25, 0)) == 5
    assert make_dataset.split_scenes(names, 0.1, 0) != make_dataset.split_scenes(names, 0.1, 1)
    assert len(make_dataset.split_scenes(names[:2], 0.1, 0)) == 1 and make_dataset.split_scenes(["a"], 0.5, 0) == set()
    assert len(make_dataset.split_scenes(names[:3], 0.9, 0)) == 2  # never every scene


def test_load_dataset_checks_the_output(made):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "load_dataset.py"), f"dataset_dir={made.out}"],
                            capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"dataset: {made.out} is your camera's dataset (made by make_dataset.py)" in result.stdout
    for split in ("train", "test"):
        assert f"{split}: {made.counts[split]} usable patches ({made.counts[split]} mosaics found)" in result.stdout
    assert "test/huawei_full_resolution: 1 PNG files" in result.stdout
    assert load_dataset.dataset_kind(made.out) == load_dataset.KIND_OWN


@pytest.mark.slow
def test_train_model_trains_on_it(made, model, tmp_path):
    """20 steps at level 5 on crops of 64 packed pixels (4 x 4 targets: 2 x 2 ones are too noisy
    a measure) lower the loss of the whole training patches (by 37-41% here)."""
    import losses
    import train_model
    import trainer
    from model import level_model

    args = train_model.parse_arguments([f"dataset_dir={made.out}", "level=5", "patch_size=64", "batch_size=4",
                                        "num_train_iters=20", "eval_step=20", "learning_rate=1e-4",
                                        f"models_dir={tmp_path / 'models'}", f"results_dir={tmp_path / 'results'}",
                                        "progress=false", "tensorboard=false"])
    loaded = [load_dataset.load_pair(str(made.out), "train", i, 5) for i in range(made.counts["train"])]
    raw, target = np.stack([p[0] for p in loaded]), np.stack([p[1] for p in loaded])

    def loss():
        return float(losses.level_loss(5, level_model(model, 5)(raw), target)[0])

    before = loss()
    trainer.Trainer(args, model=model, out=lambda *a: None).run()
    after = loss()
    print(f"level-5 loss of the training patches: {before:.4f} -> {after:.4f}")
    assert after < 0.8 * before


# ---------------------------------------------------------------------------------------
# the output folder: refusals, replacement, interruption

def zrr_like(folder, marker=None):
    """A dataset folder as ZRR's (one pair per split), a user's file, ``marker`` at the root."""
    for split in ("train", "test"):
        (folder / split / "huawei_raw").mkdir(parents=True)
        (folder / split / "canon").mkdir()
        Image.fromarray(np.full((P, P), 300, np.uint16)).save(folder / split / "huawei_raw" / "0.png")
        Image.fromarray(np.zeros((P, P, 3), np.uint8)).save(folder / split / "canon" / "0.jpg")
    (folder / "mine.txt").write_text("keep me")
    if marker:
        (folder / marker).write_text("made earlier")
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_another_dataset_is_refused_in_one_line(tmp_path, made):
    zrr_like(tmp_path / "zrr")
    with pytest.raises(cli.UserError) as caught:
        make_dataset.check_output(str(tmp_path / "zrr"), str(made.root / "pairs"), overwrite=False)
    assert "already holds a dataset (train/, test/, ZRR)" in str(caught.value) and "overwrite=true" in str(caught.value)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "photo.jpg").write_bytes(b"x")
    with pytest.raises(cli.UserError, match="not empty .photo.jpg. and not made by make_dataset.py"):
        make_dataset.check_output(str(tmp_path / "other"), str(made.root / "pairs"), overwrite=False)
    zrr_like(tmp_path / "earlier", load_dataset.OWN_MARKER_FILE)  # an earlier output: replaced as it is
    make_dataset.check_output(str(tmp_path / "earlier"), str(made.root / "pairs"), overwrite=False)
    with pytest.raises(cli.UsageError, match="the folder of the pairs itself"):
        make_dataset.check_output(str(made.root / "pairs"), str(made.root / "pairs"), overwrite=True)


def test_overwrite_replaces_a_dataset_from_a_png_raw_and_a_tiff(tmp_path, made):
    """One scene: the RAW as the PNG dng_to_png.py wrote, the reference as a TIFF."""
    folder = tmp_path / "pairs"
    folder.mkdir()
    png_raw = dng_to_png.convert(str(made.root / "pairs" / "astro.dng"), str(folder), rggb=True, normalize=True,
                                 log=lambda line: None)
    photo = made.truth["astro"].photo
    Image.fromarray(photo).save(folder / "astro.tif")  # 8-bit: Pillow cannot write 16-bit RGB
    out = tmp_path / "out"
    zrr_like(out, load_dataset.MARKER_FILE)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (out / f".building-{gone.pid}" / "train").mkdir(parents=True)  # what a killed run left
    counts, stdout, err = build_quietly(str(folder), str(out), overwrite=True)
    assert f"removed 1 temporary file(s) left in {out} by an interrupted run (.building-{gone.pid})" in err
    assert os.path.basename(png_raw) == "astro.png" and counts["train"] >= 2 and counts["test"] == 0
    assert (out / "mine.txt").read_text() == "keep me" and not (out / load_dataset.MARKER_FILE).exists()
    assert load_dataset.dataset_kind(out) == load_dataset.KIND_OWN and not (out / "test").exists()
    rows = read_csv(out / "manifest.csv")
    assert len(rows) == counts["train"] == load_dataset.num_patches(out, "train")
    earlier = {(r["y"], r["x"]): r for r in made.manifest if r["scene"] == "astro"}
    for row in rows:  # the same mosaic: the same windows and patches as from the DNG
        assert (row["y"], row["x"]) in earlier
        same = earlier[row["y"], row["x"]]
        np.testing.assert_array_equal(read_png(out / row["raw"]), read_png(made.out / same["raw"]))
    assert not [n for n in os.listdir(out) if n.startswith(".")]


def test_an_interrupted_build_leaves_the_old_output_and_no_temporaries(tmp_path, made, monkeypatch):
    import multiprocessing

    out = tmp_path / "out"
    old = zrr_like(out, load_dataset.OWN_MARKER_FILE)
    written = []

    def interrupted(path, image, quality=95):  # the first target, while the helper aligns the next scene
        written.append(path)
        raise KeyboardInterrupt("SIGTERM")

    monkeypatch.setattr(images, "write_jpeg", interrupted)
    with pytest.raises(cli.Interrupted, match=re.escape(f"stopped by SIGTERM: {out} left as it was, nothing written")):
        build_quietly(str(made.root / "pairs"), str(out))
    assert written and ".building-" in written[0]
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == old
    assert sorted(os.listdir(out)) == sorted(["train", "test", "mine.txt", load_dataset.OWN_MARKER_FILE])
    assert multiprocessing.active_children() == []


def children(pid):
    with contextlib.suppress(OSError):
        return [int(c) for c in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    return []


def test_sigterm_stops_the_script_in_one_line(tmp_path, made):
    """SIGTERM while the helper's workers align the first scene."""
    out = tmp_path / "out"
    old = zrr_like(out, load_dataset.OWN_MARKER_FILE)
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "make_dataset.py"), f"pairs={made.root / 'pairs'}",
                                f"output={out}", "progress=false"], env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    helper, workers, deadline = None, [], time.monotonic() + 120
    while not workers and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)
        for pid in children(process.pid):
            with contextlib.suppress(OSError):
                if "spawn_main" in open(f"/proc/{pid}/cmdline").read():
                    helper, workers = pid, children(pid)
    assert workers, "the helper never started its workers"
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert err.strip().splitlines()[-1] == f"error: stopped by SIGTERM: {out} left as it was, nothing written"
    assert "Traceback" not in err
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == old
    assert not [n for n in os.listdir(out) if n.startswith(".")]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{pid}") for pid in [helper, *workers]):
        time.sleep(0.1)
    assert not [pid for pid in [helper, *workers] if os.path.exists(f"/proc/{pid}")], "processes outlived the script"


# ---------------------------------------------------------------------------------------
# the helper process

def tensorflow_loaded():
    return "tensorflow" in sys.modules


def test_the_helper_answers_raises_and_survives_its_death():
    import runtime

    with runtime.CleanProcess() as helper:
        pid = helper.call(os.getpid)
        assert pid != os.getpid() and helper.call(divmod, 7, 2) == (3, 1)
        assert helper.call(tensorflow_loaded) is False
        with pytest.raises(ValueError, match="invalid literal") as caught:
            helper.call(int, "x")
        assert "in the helper process" in caught.value.__notes__[0]
        helper.submit(time.sleep, 30)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(runtime.HelperDied, match="killed by signal 9"):
            helper.result()
        assert helper.call(os.getpid) not in (pid, os.getpid())  # a new helper
    assert not os.path.exists(f"/proc/{pid}")


# ---------------------------------------------------------------------------------------
# pairs.py: finding and reading the files

def test_find_pairs_tells_raws_from_photos(tmp_path):
    grey = np.full((64, 64), 500, np.uint16)
    Image.fromarray(grey).save(tmp_path / "a.png")  # single-channel PNG: a RAW
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.JPG")
    (tmp_path / "b.DNG").write_bytes(b"II*\x00")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "b.png")  # an RGB PNG: a photo
    (tmp_path / "c.dng").write_bytes(b"II*\x00")
    (tmp_path / "c.png").write_bytes(b"not a png at all")
    (tmp_path / "d.jpg").write_bytes(b"\xff\xd8\xff")
    (tmp_path / "d.tiff").write_bytes(b"II*\x00")
    (tmp_path / "d.dng").write_bytes(b"II*\x00")
    (tmp_path / ".e.tmp123.png").write_bytes(b"")
    found = pairs.find_pairs(str(tmp_path))
    assert [(p.name, os.path.basename(p.raw), os.path.basename(p.reference)) for p in found.pairs] == \
        [("a", "a.png", "a.JPG"), ("b", "b.DNG", "b.png")]
    reasons = [reason for _, reason in found.skipped]
    assert len(reasons) == 3 and all("\n" not in r for r in reasons)
    assert f"{tmp_path / 'c.png'}: not a PNG file" in reasons[0]
    assert reasons[1] == f"{tmp_path / 'c.dng'}: no reference photo c.jpg, .jpeg, .png, .tif or .tiff beside it: " \
                         "skipped"
    assert "scene d has several reference photos (d.jpg, d.tiff): keep one" in reasons[2]


def test_a_png_raw_out_of_range_or_blank_is_refused(tmp_path):
    Image.fromarray(np.full((64, 64), 4000, np.uint16)).save(tmp_path / "high.png")
    with pytest.raises(cli.UserError, match="values up to 4000, above the 10-bit white level 1023: convert the DNG"):
        pairs.read_raw(str(tmp_path / "high.png"))
    Image.fromarray(np.full((64, 64), 64, np.uint16)).save(tmp_path / "blank.png")
    with pytest.raises(cli.UserError, match="blank.png: the mosaic is constant"):
        pairs.read_raw(str(tmp_path / "blank.png"))
    mosaic = np.random.default_rng(0).integers(0, 1024, (65, 67)).astype(np.uint16)
    Image.fromarray(mosaic).save(tmp_path / "odd.png")
    read, notes = pairs.read_raw(str(tmp_path / "odd.png"))
    np.testing.assert_array_equal(read, mosaic[:64, :66])
    assert "odd last row or column dropped" in notes


def test_mosaics_are_written_in_8_bits_when_they_fit_as_zrr_stores_them(tmp_path):
    for top, depth in ((255, 8), (256, 16)):
        mosaic = np.random.default_rng(top).integers(0, top + 1, (6, 8)).astype(np.uint16)
        mosaic[0, 0] = top
        images.write_mosaic(str(tmp_path / f"{top}.png"), mosaic)
        _, _, rows, info = png.Reader(filename=str(tmp_path / f"{top}.png")).read()
        assert info["bitdepth"] == depth and info["greyscale"]
        np.testing.assert_array_equal(np.vstack([np.asarray(r) for r in rows]), mosaic)


def test_read_photo_formats(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (24, 32, 3)).astype(np.uint8)
    wide = rng.integers(0, 65536, (24, 32, 3)).astype(np.uint16)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    np.testing.assert_array_equal(images.read_photo(str(tmp_path / "a.png")), rgb)
    Image.fromarray(np.dstack([rgb, np.zeros((24, 32), np.uint8)])).save(tmp_path / "alpha.png")
    np.testing.assert_array_equal(images.read_photo(str(tmp_path / "alpha.png")), rgb)
    writer = png.Writer(32, 24, greyscale=False, bitdepth=16)
    with open(tmp_path / "wide.png", "wb") as handle:
        writer.write(handle, wide.reshape(24, -1))
    np.testing.assert_array_equal(images.read_photo(str(tmp_path / "wide.png")), (wide >> 8).astype(np.uint8))
    import tifffile

    tifffile.imwrite(tmp_path / "wide.tif", wide, photometric="rgb")
    np.testing.assert_array_equal(images.read_photo(str(tmp_path / "wide.tif")), (wide >> 8).astype(np.uint8))
    Image.fromarray(rgb).save(tmp_path / "b.jpg", quality=90)
    with Image.open(tmp_path / "b.jpg") as image:
        np.testing.assert_array_equal(images.read_photo(str(tmp_path / "b.jpg")), np.asarray(image))
    data = (tmp_path / "b.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[:len(data) // 2])
    with pytest.raises(cli.UserError, match="cut.jpg: cannot decode the JPEG"):
        images.read_photo(str(tmp_path / "cut.jpg"))
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.tif")
    with pytest.raises(cli.UserError, match="grey.tif: a greyscale image"):
        images.read_photo(str(tmp_path / "grey.tif"))
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "print.tif")
    with pytest.raises(cli.UserError, match="print.tif: a CMYK image: expected an RGB photo"):
        images.read_photo(str(tmp_path / "print.tif"))
    (tmp_path / "x.tif").write_bytes(b"GIF89a" + bytes(20))
    with pytest.raises(cli.UserError, match="x.tif: not a JPEG, PNG or TIFF photo"):
        images.read_photo(str(tmp_path / "x.tif"))


# ---------------------------------------------------------------------------------------
# the command line

def test_command_line_errors_are_one_line(tmp_path, capsys):
    assert cli.run(make_dataset.main, []) == 2
    assert capsys.readouterr().err.strip() == ("error: pairs= is missing: the folder of scene pairs (python "
                                               "make_dataset.py pairs=DIR output=raw_images/mine/)")
    assert cli.run(make_dataset.main, [f"pairs={tmp_path}", "patch_size=100"]) == 2
    assert "patch_size=100: expected a multiple of 32" in capsys.readouterr().err
    assert cli.run(make_dataset.main, [f"pairs={tmp_path / 'none'}"]) == 1
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'none'}: folder of scene pairs not found"
    (tmp_path / "a.dng").write_bytes(b"II*\x00")
    assert cli.run(make_dataset.main, [f"pairs={tmp_path}", f"output={tmp_path / 'out'}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {tmp_path}: no scene pairs") and err[0].startswith("warning: ")
    assert not (tmp_path / "out").exists()


def test_signals_deferred_wait_for_the_block():
    done = []
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"), cli.signals_as_interrupts():
        with cli.signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            done.append("after the signal")
    assert done == ["after the signal"]
