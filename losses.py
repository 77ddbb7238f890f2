"""PyNET's losses and metrics (the reference's train_model.py, lines 60-92, and evaluate_accuracy.py).

All of them take NHWC tensors: ``enhanced`` is the network output of a level, in
[-0.08, 1.08] and *not* clipped (as in the reference), ``target`` the DSLR patch in [0, 1].
Everything is computed in float32, whatever the compute dtype of the model.

Batch values are what the reference computes and logs; the ``*_per_image`` variants give one
value per image: their mean over the batch equals the batch value (for the MSE, SSIM and
content terms every image has the same size), which is what a distributed or accumulated
training step needs (sum over the images of a replica divided by the global batch size).
"""

import tensorflow as tf

import utils

# (MSE weight, content weight, 1 - SSIM weight) per level (reference train_model.py, lines 85-92).
LEVEL_WEIGHTS = {
    5: (100.0, 0.0, 0.0),
    4: (100.0, 0.0, 0.0),
    3: (100.0, 1.0, 0.0),
    2: (100.0, 1.0, 0.0),
    1: (50.0, 1.0, 0.0),
    0: (20.0, 1.0, 20.0),
}

# loss="mse" (train_model.py), not the reference's: the level's MSE term alone, which the quick
# start trains level 0 with for minutes rather than days. The reference's level-0 loss is
# dominated by its 1 - SSIM term, which pays little for colour and brightness, and the PSNR
# the quick start is scored by is the MSE's (README, "Quick start").
LOSSES = utils.LOSSES

MS_SSIM_FILTER = 11  # tf.image.ssim_multiscale's default filter size
MS_SSIM_SCALES = 5


def uses_content(level: int) -> bool:
    """Whether the level's loss has the VGG content term (levels 3 to 0)."""
    return LEVEL_WEIGHTS[level][1] != 0.0


def _f32(*tensors):
    return [tf.cast(t, tf.float32) for t in tensors]


# ---------------------------------------------------------------------------------------
# MSE and PSNR

def mse_per_image(enhanced, target):
    """Mean of the squared difference over H, W and C of each image: shape [B]."""
    enhanced, target = _f32(enhanced, target)
    return tf.reduce_mean(tf.square(target - enhanced), axis=[1, 2, 3])


def mse(enhanced, target):
    """sum((target - enhanced)^2) / (H * W * 3 * batch), the reference's ``loss_mse``."""
    enhanced, target = _f32(enhanced, target)
    return tf.reduce_mean(tf.square(target - enhanced))


def psnr_from_mse(mse_value):
    """20 * log10(1 / sqrt(mse)), data range 1."""
    mse_value = tf.cast(mse_value, tf.float32)
    return 20.0 * tf.math.log(1.0 / tf.sqrt(mse_value)) / tf.math.log(10.0)


def psnr(enhanced, target):
    """The reference's batch-level PSNR: computed from the MSE of the whole batch."""
    return psnr_from_mse(mse(enhanced, target))


def psnr_per_image(enhanced, target):
    """PSNR of each image, shape [B] (evaluate_accuracy.py averages these over images)."""
    return psnr_from_mse(mse_per_image(enhanced, target))


# ---------------------------------------------------------------------------------------
# SSIM and MS-SSIM

def ssim_per_image(enhanced, target):
    """Single-scale SSIM of each image (tf.image.ssim: 11x11 Gaussian, sigma 1.5, k1 0.01,
    k2 0.03, max_val 1, averaged over the 'valid' region and the channels), shape [B]."""
    enhanced, target = _f32(enhanced, target)
    return tf.image.ssim(enhanced, target, max_val=1.0)


def ssim(enhanced, target):
    """Mean SSIM of the batch, the reference's ``loss_ssim``."""
    return tf.reduce_mean(ssim_per_image(enhanced, target))


def ms_ssim_applicable(height: int, width: int) -> bool:
    """Whether tf.image.ssim_multiscale accepts this size: after four halvings (rounded up,
    as TF pads odd sizes) both sides must still be at least 11 pixels, i.e. sides >= 161.
    With the reference's 224-pixel patches that holds at levels 1 and 0 only, which are the
    levels where the reference logs MS-SSIM."""
    for _ in range(MS_SSIM_SCALES - 1):
        height, width = -(-height // 2), -(-width // 2)
    return min(height, width) >= MS_SSIM_FILTER


def _static_hw(images):
    shape = images.shape
    if shape.rank != 4 or shape[1] is None or shape[2] is None:
        raise ValueError("MS-SSIM needs NHWC images of known height and width")
    return int(shape[1]), int(shape[2])


def ms_ssim_per_image(enhanced, target):
    """MS-SSIM of each image (tf.image.ssim_multiscale, default 5-scale weights, max_val 1),
    shape [B]; None when the images are too small for 5 scales (see ms_ssim_applicable)."""
    enhanced, target = _f32(enhanced, target)
    if not ms_ssim_applicable(*_static_hw(enhanced)):
        return None
    return tf.image.ssim_multiscale(enhanced, target, max_val=1.0)


def ms_ssim(enhanced, target):
    """Mean MS-SSIM of the batch, or None when the images are too small."""
    values = ms_ssim_per_image(enhanced, target)
    return None if values is None else tf.reduce_mean(values)


# ---------------------------------------------------------------------------------------
# content loss

def content_per_image(vgg, enhanced, target):
    """Mean squared difference of the VGG-19 relu5_4 features of each image, shape [B].
    ``vgg`` maps NHWC RGB images in [0, 1] to features (vgg.VGG19 does)."""
    enhanced, target = _f32(enhanced, target)
    diff = tf.cast(vgg(enhanced), tf.float32) - tf.cast(vgg(target), tf.float32)
    return tf.reduce_mean(tf.square(diff), axis=[1, 2, 3])


def content_loss(vgg, enhanced, target):
    """2 * l2_loss(relu5_4(enhanced) - relu5_4(target)) / (H5 * W5 * 512 * batch), i.e. the
    mean squared feature difference, the reference's ``loss_content``."""
    enhanced, target = _f32(enhanced, target)
    diff = tf.cast(vgg(enhanced), tf.float32) - tf.cast(vgg(target), tf.float32)
    return tf.reduce_mean(tf.square(diff))


# ---------------------------------------------------------------------------------------
# the loss of each level

def level_loss_per_image(level: int, enhanced, target, vgg=None, use_content=True, loss="reference"):
    """Loss of each image and its parts, all of shape [B]:

    levels 5, 4: 100 * MSE; levels 3, 2: 100 * MSE + content; level 1: 50 * MSE + content;
    level 0: 20 * MSE + content + 20 * (1 - SSIM).

    Returns ``(total, parts)``; ``parts`` has "mse", and "content" / "ssim" where the level's
    loss uses them.  ``vgg`` is needed for levels 3 to 0, unless ``use_content=False`` drops the
    content term (train_model.py vgg_dir=none, when the VGG-19 file is not available);
    ``loss="mse"`` keeps the MSE term alone (see LOSSES).
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    w_mse, w_content, w_ssim = LEVEL_WEIGHTS[level]
    if loss == "mse":
        w_content = w_ssim = 0.0
    if not use_content:
        w_content = 0.0
    parts = {"mse": mse_per_image(enhanced, target)}
    total = w_mse * parts["mse"]
    if w_content:
        if vgg is None:
            raise ValueError(f"level {level} needs the VGG-19 network for its content loss")
        parts["content"] = content_per_image(vgg, enhanced, target)
        total = total + w_content * parts["content"]
    if w_ssim:
        parts["ssim"] = ssim_per_image(enhanced, target)
        total = total + w_ssim * (1.0 - parts["ssim"])
    return total, parts


def level_loss(level: int, enhanced, target, vgg=None, use_content=True, loss="reference"):
    """The reference's ``loss_generator`` of the level (a batch mean) and its parts
    (batch means: "mse", "content", "ssim" as the level uses them)."""
    total, parts = level_loss_per_image(level, enhanced, target, vgg, use_content, loss)
    return tf.reduce_mean(total), {name: tf.reduce_mean(value) for name, value in parts.items()}
