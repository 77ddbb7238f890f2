"""Build a small SYNTHETIC dataset in the exact ZRR layout, for the quick start and the tests.

Each RAW mosaic is made from a real photograph by running a camera pipeline backwards
(unprocess.py: Brooks et al., CVPR 2019, with priors for a phone sensor), in the code values
of the sensor of camera.py. The DSLR target ("canon") is the photograph's own 448x448 crop as a
JPEG, so pairs are exactly aligned. It is NOT the Zurich RAW-to-RGB dataset: a marker file (SYNTHETIC_SAMPLE.txt) at the
root says so, and every script prints which kind of dataset it reads.

By default the photographs are the four colour photos that scikit-image ships (public domain or
CC0, see PHOTO_CREDITS); ``photos_dir=`` takes a folder of your own JPEG/PNG photos instead.
"""

import datetime
import io
import os
import shutil
import sys

import numpy as np
import skimage.data
from PIL import Image
from tqdm import tqdm

import camera
import cli
import files
import images
import load_dataset
from unprocess import unprocess

MOSAIC = load_dataset.MOSAIC              # 448
PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".png")
# The photo each full-resolution mosaic was made from, same name, as a PNG: the sample's only
# addition to the ZRR layout (ZRR has no aligned target for its full-resolution photos).
FULL_RES_TARGET_FOLDER = "full_resolution_target"

# Photographs shipped inside scikit-image (skimage/data), with the credits its docs give.
PHOTO_CREDITS = {
    "astronaut": "Eileen Collins, NASA Great Images database; public domain (scikit-image: skimage.data.astronaut)",
    "chelsea": "Chelsea the cat, photo by Stefan van der Walt; CC0 (scikit-image: skimage.data.chelsea)",
    "coffee": "coffee cup, photo by Rachel Michetti, courtesy of Pikolo Espresso Bar; CC0 "
              "(scikit-image: skimage.data.coffee)",
    "rocket": "DSCOVR launch on Falcon 9, SpaceX; released into the public domain (scikit-image: skimage.data.rocket)",
}

# ---------------------------------------------------------------------------------------
# photographs

def default_photos():
    """[(name, uint8 H x W x 3, credit)]: the colour photographs shipped with scikit-image."""
    return [(name, np.asarray(getattr(skimage.data, name)())[..., :3], credit)
            for name, credit in sorted(PHOTO_CREDITS.items())]


def load_photos(photos_dir):
    """[(name, uint8 H x W x 3, credit)] from every JPEG/PNG in ``photos_dir`` (sorted by name)."""
    if not os.path.isdir(photos_dir):
        raise cli.UserError(f"{photos_dir}: folder of photos not found")
    photos = []
    for name in sorted(os.listdir(photos_dir)):
        path = os.path.join(photos_dir, name)
        if os.path.splitext(name)[1].lower() not in PHOTO_EXTENSIONS or not os.path.isfile(path):
            continue
        data = files.read_bytes(path)
        try:
            with Image.open(io.BytesIO(data)) as image:
                photo = np.asarray(image.convert("RGB"))
        except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... for bad files
            raise cli.UserError(f"{path}: cannot read the photo ({images.pillow_reason(exc, data)})") from None
        if min(photo.shape[:2]) < 16:
            raise cli.UserError(f"{path}: photo too small ({photo.shape[1]}x{photo.shape[0]})")
        photos.append((os.path.splitext(name)[0], photo, f"user photo {path}"))
    if not photos:
        raise cli.UserError(f"{photos_dir}: no JPEG or PNG photos in this folder")
    return photos


def split_photos(photos):
    """(train parts, test parts): every photo cut in two halves across its longer side, the first
    half for training and the second for the test split and the full-resolution mosaics. Every
    photo then shows up in the test split, which a held-out whole photo (one of four) could not
    give, and no test pixel is ever seen in training."""
    train, test = [], []
    for name, photo, credit in photos:
        height, width = photo.shape[:2]
        if width >= height:
            first, second = photo[:, : width // 2], photo[:, width // 2:]
        else:
            first, second = photo[: height // 2], photo[height // 2:]
        train.append((name, np.ascontiguousarray(first), credit))
        test.append((name, np.ascontiguousarray(second), credit))
    return train, test


def random_crop(photo, height, width, rs, max_zoom=1.5):
    """A height x width crop of the photo, upscaled (Pillow bicubic) by a random zoom in
    [1, max_zoom] above the smallest scale that covers the crop; flipped left-right at random."""
    h, w = photo.shape[:2]
    scale = max(height / h, width / w) * rs.uniform(1.0, max_zoom)
    size = (max(width, int(round(w * scale))), max(height, int(round(h * scale))))
    image = np.asarray(Image.fromarray(photo).resize(size, Image.BICUBIC)) if size != (w, h) else photo
    y = rs.randint(0, image.shape[0] - height + 1)
    x = rs.randint(0, image.shape[1] - width + 1)
    crop = image[y: y + height, x: x + width]
    return np.ascontiguousarray(crop[:, ::-1] if rs.randint(2) else crop)


# ---------------------------------------------------------------------------------------
# writing

def marker_text(sources, args, counts) -> str:
    lines = [
        "SYNTHETIC SAMPLE DATASET - NOT the Zurich RAW-to-RGB (ZRR) dataset.",
        "",
        "Made by make_sample_dataset.py (PyNET TF2). RAW mosaics are photographs run backwards through a",
        "camera pipeline (Brooks et al., CVPR 2019: inverse tone curve, inverse gamma 2.2, random",
        "sRGB->camera matrix, inverse white balance, RGGB mosaic, noise, 10-bit codes); the 'canon'",
        "targets are the photographs' own crops. Use it to try the code, not to judge image quality.",
        "",
        f"made: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"patches: train {counts['train']}, test {counts['test']}, full resolution {counts['full']} "
        f"({args['full_height']}x{args['full_width']} mosaics)",
        f"seed: {args['seed']}, noise: {str(args['noise']).lower()}, black level: {args['black_level']}, "
        f"white level: {camera.WHITE_LEVEL}, JPEG quality: {args['jpeg_quality']}",
        "",
        "source photographs (each cut in two across its longer side: the first half for train/,",
        f"the second for test/, including the full-resolution mosaics and their photos in "
        f"test/{FULL_RES_TARGET_FOLDER}/):",
    ]
    lines += [f"  {name}: {credit}" for name, credit in sources]
    return "\n".join(lines) + "\n"


def _check_output_dir(output_dir):
    """Refuse to write over a dataset that make_sample_dataset.py did not make."""
    marker = os.path.join(output_dir, load_dataset.MARKER_FILE)
    if os.path.isfile(marker):
        return True
    present = [n for n in ("train", "test") if os.path.exists(os.path.join(output_dir, n))]
    if present:
        raise cli.UserError(f"{output_dir}: already holds a dataset ({', '.join(present)}/) without "
                              f"{load_dataset.MARKER_FILE}, perhaps the real ZRR: choose another output_dir=")
    return False


def build(output_dir, photos=None, train=300, test=60, full=2, full_height=768, full_width=512, seed=0,
          noise=True, black_level=camera.BLACK_LEVEL, jpeg_quality=95, progress=True) -> str:
    """Write the sample dataset to ``output_dir`` (built aside, then moved in). Returns the marker path."""
    if full_height % 32 or full_width % 32 or full_height < 32 or full_width < 32:
        raise cli.UsageError(f"full_height={full_height}, full_width={full_width}: expected multiples of 32")
    files.check_output_dir(output_dir, "output_dir")
    replacing = _check_output_dir(output_dir) if os.path.isdir(output_dir) else False
    files.remove_stale_temps(output_dir)
    photos = default_photos() if photos is None else photos
    train_photos, test_photos = split_photos(photos)
    rs = np.random.RandomState(seed)
    os.makedirs(output_dir, exist_ok=True)
    work = os.path.join(output_dir, f".building-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    jobs = ([("train", i, train_photos) for i in range(train)] + [("test", i, test_photos) for i in range(test)]
            + [("full", i, test_photos) for i in range(full)])
    try:
        for split in ("train", "test"):
            for sub in (load_dataset.RAW_FOLDER, load_dataset.TARGET_FOLDER):
                os.makedirs(os.path.join(work, split, sub))
        os.makedirs(os.path.join(work, "test", load_dataset.FULL_RES_FOLDER))
        os.makedirs(os.path.join(work, "test", FULL_RES_TARGET_FOLDER))
        iterator = jobs
        if progress:
            iterator = tqdm(jobs, unit="image", file=sys.stderr, desc="sample dataset", disable=None)
        for split, i, pool in iterator:
            # Each split goes through the photos in turn: every photo has its share of the patches, so
            # that the test PSNR does not swing with how many patches a random draw gave each scene.
            name, photo, _ = pool[i % len(pool)]
            if split == "full":
                crop = random_crop(photo, full_height, full_width, rs, max_zoom=1.0)
                mosaic, _ = unprocess(crop, rs, noise, black_level)
                images.write_mosaic(os.path.join(work, "test", load_dataset.FULL_RES_FOLDER, f"{name}_{i}.png"), mosaic)
                images.write_png(os.path.join(work, "test", FULL_RES_TARGET_FOLDER, f"{name}_{i}.png"), crop)
                continue
            crop = random_crop(photo, MOSAIC, MOSAIC, rs)
            mosaic, _ = unprocess(crop, rs, noise, black_level)
            images.write_mosaic(os.path.join(work, split, load_dataset.RAW_FOLDER, f"{i}.png"), mosaic)
            images.write_jpeg(os.path.join(work, split, load_dataset.TARGET_FOLDER, f"{i}.jpg"), crop, jpeg_quality)
        sources = [(name, credit) for name, _, credit in photos]
        args = dict(seed=seed, noise=noise, black_level=black_level, jpeg_quality=jpeg_quality,
                    full_height=full_height, full_width=full_width)
        marker = os.path.join(output_dir, load_dataset.MARKER_FILE)
        # The marker goes in first: a partly replaced dataset is still marked synthetic.
        with files.atomic_path(marker) as tmp:
            with open(tmp, "w") as handle:
                handle.write(marker_text(sources, args, {"train": train, "test": test, "full": full}))
        for split in ("train", "test"):
            if replacing:
                shutil.rmtree(os.path.join(output_dir, split), ignore_errors=True)
            os.replace(os.path.join(work, split), os.path.join(output_dir, split))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return marker


def _count_check(minimum):
    return lambda value: None if value >= minimum else f"a value of {minimum} or more"


def _multiple_of_32(value):
    return None if value >= 32 and value % 32 == 0 else "a multiple of 32 (32 or more)"


SPEC = [
    cli.Arg("output_dir", str, "raw_images/", "where to write the dataset (refused if it holds a real one)"),
    cli.Arg("photos_dir", str, None, "folder of your own JPEG/PNG photos; none = scikit-image's sample photos"),
    cli.Arg("train", int, 300, "number of training patches", check=_count_check(1)),
    cli.Arg("test", int, 60, "number of test patches", check=_count_check(1)),
    cli.Arg("full", int, 2, "number of full-resolution test mosaics", check=_count_check(0)),
    cli.Arg("full_height", int, 768, "height of the full-resolution mosaics (multiple of 32)", check=_multiple_of_32),
    cli.Arg("full_width", int, 512, "width of the full-resolution mosaics (multiple of 32)", check=_multiple_of_32),
    cli.Arg("seed", int, 0, "random seed"),
    cli.Arg("noise", cli.BOOL, True, "add shot and read noise to the mosaics"),
    cli.Arg("black_level", int, camera.BLACK_LEVEL, "black level of the 10-bit code values",
              check=lambda v: None if 0 <= v < 512 else "a value from 0 to 511"),
    cli.Arg("jpeg_quality", int, 95, "JPEG quality of the targets",
              check=lambda v: None if 1 <= v <= 100 else "a value from 1 to 100"),
]


def main(argv):
    args = cli.parse_args(argv, SPEC, "make_sample_dataset.py",
                            "Build a small synthetic dataset in the ZRR layout from photographs (not the ZRR dataset).")
    photos = load_photos(args["photos_dir"]) if args["photos_dir"] else default_photos()
    marker = build(args["output_dir"], photos, args["train"], args["test"], args["full"], args["full_height"],
                   args["full_width"], args["seed"], args["noise"], args["black_level"], args["jpeg_quality"])
    print(f"wrote a {load_dataset.KIND_SYNTHETIC} to {args['output_dir']}: {args['train']} train, "
          f"{args['test']} test patches, {args['full']} full-resolution mosaics ({marker})")


if __name__ == "__main__":
    sys.exit(cli.run(main))
