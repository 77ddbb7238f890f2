"""Build a small SYNTHETIC dataset in the exact ZRR layout, for the quick start and the tests.

Each RAW mosaic is made from a real photograph by running a camera pipeline backwards, after
Brooks et al., "Unprocessing Images for Learned Raw Denoising" (CVPR 2019), with priors chosen
for a phone sensor: inverse smoothstep tone curve, inverse gamma 2.2, a random sRGB -> camera
colour matrix, inverse white balance and exposure (highlights protected), an RGGB mosaic,
optional shot/read noise, then 10-bit code values over a black level of 64 (white 1023; utils.BLACK_LEVEL).
The DSLR target ("canon") is the photograph's own 448x448 crop as a JPEG, so pairs are exactly
aligned. It is NOT the Zurich RAW-to-RGB dataset: a marker file (SYNTHETIC_SAMPLE.txt) at the
root says so, and every script prints which kind of dataset it reads.

By default the photographs are the four colour photos that scikit-image ships (public domain or
CC0, see PHOTO_CREDITS); ``photos_dir=`` takes a folder of your own JPEG/PNG photos instead.
"""

import datetime
import os
import shutil
import sys

import numpy as np

import load_dataset
import utils

BLACK_LEVEL = utils.BLACK_LEVEL
WHITE_LEVEL = load_dataset.MAX_RAW_VALUE  # 1023
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

# Camera -> linear sRGB colour matrices (rows sum to 1) with the strong off-diagonal terms typical
# of small phone sensors (diagonal 1.45-2.0). Plausible, not measured on a particular camera;
# a random convex combination of them is inverted to get the sRGB -> camera matrix.
CAM_TO_RGB = np.array([
    [[1.70, -0.55, -0.15], [-0.25, 1.55, -0.30], [0.00, -0.60, 1.60]],
    [[1.85, -0.70, -0.15], [-0.20, 1.45, -0.25], [0.05, -0.75, 1.70]],
    [[1.55, -0.45, -0.10], [-0.30, 1.70, -0.40], [-0.05, -0.45, 1.50]],
    [[2.00, -0.85, -0.15], [-0.30, 1.60, -0.30], [0.00, -0.55, 1.55]],
])


# ---------------------------------------------------------------------------------------
# the camera pipeline, backwards (each step is the inverse of a simple forward ISP step)

def inverse_smoothstep(image):
    """Inverse of the global tone curve y = 3x^2 - 2x^3 on [0, 1]."""
    image = np.clip(image, 0.0, 1.0)
    return 0.5 - np.sin(np.arcsin(1.0 - 2.0 * image) / 3.0)


def gamma_expand(image, gamma=2.2):
    """Inverse of the display gamma y = x^(1/gamma)."""
    return np.maximum(image, 1e-8) ** gamma


_LINEARIZE = gamma_expand(inverse_smoothstep(np.arange(256) / 255.0)).astype(np.float32)


def random_rgb_to_cam(rs):
    """A random sRGB -> camera matrix: inverse of a random convex mix of CAM_TO_RGB, rows summing to 1."""
    weights = rs.uniform(1e-8, 1.0, len(CAM_TO_RGB))
    cam_to_rgb = np.tensordot(weights / weights.sum(), CAM_TO_RGB, axes=1)
    rgb_to_cam = np.linalg.inv(cam_to_rgb)
    return rgb_to_cam / rgb_to_cam.sum(axis=1, keepdims=True)


def apply_matrix(image, matrix):
    return image @ np.asarray(matrix, dtype=image.dtype).T


def random_gains(rs):
    """White-balance gains of a phone sensor in daylight, and an exposure factor (Brooks et al.'s
    ranges, slightly widened): red 1.7-2.4, blue 1.4-2.0, exposure N(0.8, 0.1) in [0.5, 1]."""
    return rs.uniform(1.7, 2.4), rs.uniform(1.4, 2.0), float(np.clip(rs.normal(0.8, 0.1), 0.5, 1.0))


def invert_gains(image, red_gain, blue_gain, exposure):
    """Divide by the white-balance gains and scale by ``exposure``, blending the factor towards 1
    for the brightest pixels (grey level above 0.9) so that highlights are not pushed below the
    point where the forward gains would saturate them (Brooks et al.'s highlight protection)."""
    factors = (exposure * np.array([1.0 / red_gain, 1.0, 1.0 / blue_gain])).astype(image.dtype)
    grey = image.mean(axis=-1, keepdims=True)
    inflection = 0.9
    mask = np.square(np.maximum(grey - inflection, 0.0) / (1.0 - inflection))
    safe = np.maximum(mask + (1.0 - mask) * factors, factors)
    return image * safe


def mosaic_rggb(image):
    """H x W x 3 -> H x W Bayer mosaic with R at (0,0), G at (0,1) and (1,0), B at (1,1)."""
    out = np.empty(image.shape[:2], dtype=image.dtype)
    out[0::2, 0::2] = image[0::2, 0::2, 0]
    out[0::2, 1::2] = image[0::2, 1::2, 1]
    out[1::2, 0::2] = image[1::2, 0::2, 1]
    out[1::2, 1::2] = image[1::2, 1::2, 2]
    return out


def random_noise_levels(rs):
    """Shot and read noise variances (Brooks et al.'s log-linear relation), daylight phone range."""
    log_shot = rs.uniform(np.log(1e-4), np.log(4e-3))
    log_read = 2.18 * log_shot + 1.20 + rs.normal(0.0, 0.26)
    return float(np.exp(log_shot)), float(np.exp(log_read))


def add_noise(mosaic, rs, shot, read):
    variance = np.maximum(mosaic, 0.0) * np.float32(shot) + np.float32(read)
    return mosaic + rs.standard_normal(mosaic.shape).astype(np.float32) * np.sqrt(variance)


def to_code_values(mosaic, black_level=BLACK_LEVEL, white_level=WHITE_LEVEL):
    """Linear [0, 1] -> integer code values black..white (noise may fall below black), uint16."""
    codes = np.floor(black_level + mosaic * (white_level - black_level) + 0.5)
    return np.clip(codes, 0, white_level).astype(np.uint16)


def unprocess(photo, rs, noise=True, black_level=BLACK_LEVEL):
    """An sRGB uint8 photo (H x W x 3, H and W even) -> (10-bit RGGB mosaic uint16, parameters)."""
    image = _LINEARIZE[photo]  # inverse tone curve and inverse gamma, tabulated for the 256 uint8 values
    rgb_to_cam = random_rgb_to_cam(rs)
    image = np.clip(apply_matrix(image, rgb_to_cam), 0.0, 1.0)
    red_gain, blue_gain, exposure = random_gains(rs)
    image = np.clip(invert_gains(image, red_gain, blue_gain, exposure), 0.0, 1.0)
    mosaic = mosaic_rggb(image)
    params = {"red_gain": red_gain, "blue_gain": blue_gain, "exposure": exposure, "rgb_to_cam": rgb_to_cam}
    if noise:
        shot, read = random_noise_levels(rs)
        mosaic = add_noise(mosaic, rs, shot, read)
        params.update(shot_noise=shot, read_noise=read)
    return to_code_values(mosaic, black_level), params


# ---------------------------------------------------------------------------------------
# photographs

def default_photos():
    """[(name, uint8 H x W x 3, credit)]: the colour photographs shipped with scikit-image."""
    import skimage.data

    return [(name, np.asarray(getattr(skimage.data, name)())[..., :3], credit)
            for name, credit in sorted(PHOTO_CREDITS.items())]


def load_photos(photos_dir):
    """[(name, uint8 H x W x 3, credit)] from every JPEG/PNG in ``photos_dir`` (sorted by name)."""
    from PIL import Image

    if not os.path.isdir(photos_dir):
        raise utils.UserError(f"{photos_dir}: folder of photos not found")
    photos = []
    for name in sorted(os.listdir(photos_dir)):
        path = os.path.join(photos_dir, name)
        if os.path.splitext(name)[1].lower() not in PHOTO_EXTENSIONS or not os.path.isfile(path):
            continue
        try:
            with Image.open(path) as image:
                photo = np.asarray(image.convert("RGB"))
        except Exception as exc:
            raise utils.UserError(f"{path}: cannot read the photo ({str(exc) or exc.__class__.__name__})") from None
        if min(photo.shape[:2]) < 16:
            raise utils.UserError(f"{path}: photo too small ({photo.shape[1]}x{photo.shape[0]})")
        photos.append((os.path.splitext(name)[0], photo, f"user photo {path}"))
    if not photos:
        raise utils.UserError(f"{photos_dir}: no JPEG or PNG photos in this folder")
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
    from PIL import Image

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

def write_mosaic_png(path, mosaic):
    """As ZRR: an 8-bit PNG when every value fits in 8 bits, else a 16-bit PNG."""
    from PIL import Image

    data = mosaic.astype(np.uint8) if int(mosaic.max()) <= 255 else mosaic.astype(np.uint16)
    Image.fromarray(data).save(path, format="PNG", compress_level=1)


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
        f"white level: {WHITE_LEVEL}, JPEG quality: {args['jpeg_quality']}",
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
        raise utils.UserError(f"{output_dir}: already holds a dataset ({', '.join(present)}/) without "
                              f"{load_dataset.MARKER_FILE}, perhaps the real ZRR: choose another output_dir=")
    return False


def build(output_dir, photos=None, train=300, test=60, full=2, full_height=768, full_width=512, seed=0,
          noise=True, black_level=BLACK_LEVEL, jpeg_quality=95, progress=True) -> str:
    """Write the sample dataset to ``output_dir`` (built aside, then moved in). Returns the marker path."""
    if full_height % 32 or full_width % 32 or full_height < 32 or full_width < 32:
        raise utils.UsageError(f"full_height={full_height}, full_width={full_width}: expected multiples of 32")
    utils.check_output_dir(output_dir, "output_dir")
    replacing = _check_output_dir(output_dir) if os.path.isdir(output_dir) else False
    utils.remove_stale_temps(output_dir)
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
            from tqdm import tqdm
            iterator = tqdm(jobs, unit="image", file=sys.stderr, desc="sample dataset", disable=None)
        for split, i, pool in iterator:
            # Each split goes through the photos in turn: every photo has its share of the patches, so
            # that the test PSNR does not swing with how many patches a random draw gave each scene.
            name, photo, _ = pool[i % len(pool)]
            if split == "full":
                crop = random_crop(photo, full_height, full_width, rs, max_zoom=1.0)
                mosaic, _ = unprocess(crop, rs, noise, black_level)
                write_mosaic_png(os.path.join(work, "test", load_dataset.FULL_RES_FOLDER, f"{name}_{i}.png"), mosaic)
                utils.write_png(os.path.join(work, "test", FULL_RES_TARGET_FOLDER, f"{name}_{i}.png"), crop)
                continue
            crop = random_crop(photo, MOSAIC, MOSAIC, rs)
            mosaic, _ = unprocess(crop, rs, noise, black_level)
            write_mosaic_png(os.path.join(work, split, load_dataset.RAW_FOLDER, f"{i}.png"), mosaic)
            utils.write_jpeg(os.path.join(work, split, load_dataset.TARGET_FOLDER, f"{i}.jpg"), crop, jpeg_quality)
        sources = [(name, credit) for name, _, credit in photos]
        args = dict(seed=seed, noise=noise, black_level=black_level, jpeg_quality=jpeg_quality,
                    full_height=full_height, full_width=full_width)
        marker = os.path.join(output_dir, load_dataset.MARKER_FILE)
        # The marker goes in first: a partly replaced dataset is still marked synthetic.
        with utils.atomic_path(marker) as tmp:
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
    utils.Arg("output_dir", str, "raw_images/", "where to write the dataset (refused if it holds a real one)"),
    utils.Arg("photos_dir", str, None, "folder of your own JPEG/PNG photos; none = scikit-image's sample photos"),
    utils.Arg("train", int, 300, "number of training patches", check=_count_check(1)),
    utils.Arg("test", int, 60, "number of test patches", check=_count_check(1)),
    utils.Arg("full", int, 2, "number of full-resolution test mosaics", check=_count_check(0)),
    utils.Arg("full_height", int, 768, "height of the full-resolution mosaics (multiple of 32)", check=_multiple_of_32),
    utils.Arg("full_width", int, 512, "width of the full-resolution mosaics (multiple of 32)", check=_multiple_of_32),
    utils.Arg("seed", int, 0, "random seed"),
    utils.Arg("noise", utils.BOOL, True, "add shot and read noise to the mosaics"),
    utils.Arg("black_level", int, BLACK_LEVEL, "black level of the 10-bit code values",
              check=lambda v: None if 0 <= v < 512 else "a value from 0 to 511"),
    utils.Arg("jpeg_quality", int, 95, "JPEG quality of the targets",
              check=lambda v: None if 1 <= v <= 100 else "a value from 1 to 100"),
]


def main(argv):
    args = utils.parse_args(argv, SPEC, "make_sample_dataset.py",
                            "Build a small synthetic dataset in the ZRR layout from photographs (not the ZRR dataset).")
    photos = load_photos(args["photos_dir"]) if args["photos_dir"] else default_photos()
    marker = build(args["output_dir"], photos, args["train"], args["test"], args["full"], args["full_height"],
                   args["full_width"], args["seed"], args["noise"], args["black_level"], args["jpeg_quality"])
    print(f"wrote a {load_dataset.KIND_SYNTHETIC} to {args['output_dir']}: {args['train']} train, "
          f"{args['test']} test patches, {args['full']} full-resolution mosaics ({marker})")


if __name__ == "__main__":
    sys.exit(utils.run(main))
