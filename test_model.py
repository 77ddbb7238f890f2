"""Render full-resolution RAW mosaics into RGB photos with a trained PyNET.

    python test_model.py level=0 orig=true       # the authors' released weights
    python test_model.py level=1 restore_iter=35000

Reads every PNG mosaic in {dataset_dir}/test/huawei_full_resolution/ and writes
results/full-resolution/{name}_level_{L}_iteration_{I}.png.
"""

import os
import sys

import numpy as np

import utils
from utils import Arg, UserError

ORIGINAL_CHECKPOINT = "models/original/pynet_level_0.ckpt"

ARGS = [
    utils.level_arg(),
    Arg("orig", utils.BOOL, False, "use the authors' released weights, " + ORIGINAL_CHECKPOINT),
    utils.restore_iter_arg(),
    utils.dataset_dir_arg(),
    Arg("use_gpu", utils.BOOL, True, "run on the GPU when there is one"),
    Arg("stretch", utils.BOOL, False,
        "min-max stretch each picture as the reference did, instead of clipping to [0, 1]"),
    Arg("bits", int, 8, "bits per channel of the output PNG", choices=(8, 16)),
    Arg("models_dir", str, "models/", "folder of the trained checkpoints"),
    Arg("results_dir", str, "results/full-resolution/", "where the pictures go"),
]


def configure_devices(use_gpu: bool) -> None:
    """Hide the GPUs when asked; must run before TensorFlow touches a device."""
    import tensorflow as tf

    if not use_gpu:
        tf.config.set_visible_devices([], "GPU")


def resolve_checkpoint(params) -> tuple:
    """(checkpoint prefix, iteration label for file names) for the chosen weights."""
    if params["orig"]:
        return ORIGINAL_CHECKPOINT, "None"
    level, iteration = params["level"], params["restore_iter"]
    if iteration is None:
        iteration = utils.get_last_iter(level, params["models_dir"])
        if iteration is None:
            raise UserError(f"no checkpoint pynet_level_{level}_iteration_*.ckpt in {params['models_dir']}: "
                            f"train level {level} first (python train_model.py level={level}) "
                            f"or use the released weights with orig=true")
    return utils.checkpoint_prefix(params["models_dir"], level, iteration), str(iteration)


def list_mosaics(folder: str) -> list:
    if not os.path.isdir(folder):
        raise UserError(f"{folder}: folder not found (expected the full-resolution PNG mosaics there)")
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(".png"))
    if not files:
        raise UserError(f"{folder}: no PNG mosaics found")
    return [os.path.join(folder, f) for f in files]


def load_model(level: int, prefix: str):
    from model import PyNET, load_checkpoint

    model = PyNET(level=level)
    load_checkpoint(model, prefix)
    return model


def render(model, mosaic, level: int):
    """Run ``model`` (built for ``level``) on a 2-D Bayer mosaic of any size: the packed input
    is padded to a multiple of 16 and the output cropped back. Returns float32 HxWx3, unclipped."""
    from load_dataset import extract_bayer_channels
    from model import as_list, pad_to_multiple

    packed, (height, width) = pad_to_multiple(extract_bayer_channels(mosaic))
    output = as_list(model.predict_on_batch(packed[None]))[0]
    scale = 2.0 / 2 ** level
    return np.asarray(output[0, : int(height * scale), : int(width * scale)], dtype=np.float32)


def output_path(results_dir: str, mosaic_path: str, level: int, iteration: str) -> str:
    name = os.path.splitext(os.path.basename(mosaic_path))[0]
    return os.path.join(results_dir, f"{name}_level_{level}_iteration_{iteration}.png")


def main(argv):
    params = utils.parse_args(argv, ARGS, "test_model.py", __doc__.strip().splitlines()[0])
    files = list_mosaics(os.path.join(params["dataset_dir"], "test", "huawei_full_resolution"))
    prefix, iteration = resolve_checkpoint(params)
    configure_devices(params["use_gpu"])
    model = load_model(params["level"], prefix)
    for path in files:
        image = render(model, utils.read_mosaic(path), params["level"])
        target = output_path(params["results_dir"], path, params["level"], iteration)
        utils.write_png(target, utils.to_uint(image, params["bits"], params["stretch"]))
        print(f"{path} -> {target}")


if __name__ == "__main__":
    sys.exit(utils.run(main))
