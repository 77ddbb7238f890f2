"""What every PyNET script shares: the pyramid's levels, the reference's per-level defaults,
and the arguments several scripts take alike.

The rest lives by concern: ``cli`` (arguments and errors), ``files`` (paths and atomic
writes), ``images`` (image files), ``camera`` (the sensor and the Bayer packing),
``runtime`` (process settings made before TensorFlow starts), ``checkpoints``.
"""

from cli import BOOL, OPTIONAL_INT, Arg, non_negative

LEVELS = (0, 1, 2, 3, 4, 5)

# Reference defaults, indexed by level (the reference's utils.py, process_command_args), and the
# batch sizes its README's training commands pass.
NUM_DEFAULT_TRAIN_ITERS = (100000, 35000, 20000, 20000, 5000, 5000)
REFERENCE_BATCH_SIZES = (10, 12, 18, 48, 50, 50)
NUM_VISUAL = 4  # visual results saved per evaluation of the training, as the reference

# The reference's fixed test input: the top-left 1472 x 1984 packed pixels (2944 x 3968 mosaic).
REFERENCE_CROP = (1472, 1984)
# The smallest mosaic rendered or exported: one 16x16 packed block, the network's smallest input
# (one output pixel at level 5).
MIN_MOSAIC = 32

# Choices of train_model.py's init= and loss= (model.PyNET(init=), losses.level_loss(loss=)),
# here so that the scripts' argument specs need no TensorFlow.
INITS = ("reference", "he")
LOSSES = ("reference", "mse")
# Compute precisions (model.PyNET(precision=)): float32 as the reference, bfloat16 for CPUs with
# bfloat16 units and recent GPUs, float16 for GPUs.
PRECISIONS = ("fp32", "bf16", "fp16")


def level_arg(default=0, help="pyramid level: 5, 4, 3, 2, 1 or 0 (full resolution)") -> Arg:
    return Arg("level", int, default, help, choices=LEVELS)


def dataset_dir_arg() -> Arg:
    return Arg("dataset_dir", str, "raw_images/", "folder of the ZRR dataset (train/, test/)")


def precision_arg() -> Arg:
    return Arg("precision", str, "fp32", "compute precision: fp32 (the reference's; the released weights give its "
               "pictures), bf16 (bfloat16 compute with float32 weights: for CPUs with bfloat16 units and recent "
               "GPUs), fp16 (float16, for GPUs)", choices=PRECISIONS)


def force_bf16_arg() -> Arg:
    return Arg("force_bf16", BOOL, False, "run precision=bf16 on a CPU without bfloat16 units, where it is "
               "emulated and slower than fp32 (to check results, not for speed)")


def restore_iter_arg() -> Arg:
    return Arg("restore_iter", OPTIONAL_INT, None,
               "iteration of the checkpoint to load; none = the latest one", check=non_negative)
