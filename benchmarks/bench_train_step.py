"""Benchmark of the training step (train_model.py) per level.

For each level: the full PyNET, Adam, the level's loss (with a VGG-19 of random weights and
the real layer shapes standing in for imagenet-vgg-verydeep-19.mat at levels 3..0: same
cost) and the real input pipeline (load_dataset.train_dataset on a generated sample dataset,
2 batches prefetched), run through train_model.Trainer's own step. After ``warmup`` steps
(tracing, first-call allocations) it times ``steps`` steps and reports the time per step,
samples per second and the share of the step spent blocked waiting for the next batch.

    python benchmarks/bench_train_step.py                         # reference batch sizes, 224 patches
    python benchmarks/bench_train_step.py levels=5,4,3 batch_size=2 patch_size=64 steps=5

``batch_size=0`` means the reference's batch of each level (50, 50, 48, 18, 12, 10 for 5..0).
Results are printed as a table and, with ``json=PATH``, written as JSON.
"""

import json
import os
import platform
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import utils  # noqa: E402

REFERENCE_BATCH = {5: 50, 4: 50, 3: 48, 2: 18, 1: 12, 0: 10}


def _levels(text):
    try:
        levels = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise utils.UsageError(f"levels={text}: expected a comma-separated list of levels") from None
    if not levels or any(level not in utils.LEVELS for level in levels):
        raise utils.UsageError(f"levels={text}: expected levels among 0..5")
    return sorted(set(levels), reverse=True)


SPEC = [
    utils.Arg("levels", str, "5,4,3,2,1,0", "comma-separated levels to time"),
    utils.Arg("batch_size", int, 0, "batch size of every level; 0 = the reference's batch of each level",
              check=utils.non_negative),
    utils.Arg("patch_size", int, 224, "packed crop side (multiple of 16, at most 224)"),
    utils.Arg("steps", int, 5, "timed steps per level", check=utils.positive),
    utils.Arg("warmup", int, 2, "untimed steps first (tracing)", check=utils.positive),
    utils.Arg("accum_steps", int, 1, "gradient accumulation steps", check=utils.positive),
    utils.Arg("mixed_precision", utils.BOOL, False, "mixed_float16"),
    utils.Arg("train_patches", int, 16, "generated training patches", check=utils.positive),
    utils.Arg("json", str, "", "also write the results to this JSON file"),
]


def write_fake_vgg(path):
    from test_vgg import random_vgg_weights, write_matconvnet_vgg

    write_matconvnet_vgg(path, random_vgg_weights(seed=0))


def bench_level(level, model, work, dataset, vgg_path, opts):
    import model as pynet
    import train_model

    batch = opts["batch_size"] or REFERENCE_BATCH[level]
    models_dir = os.path.join(work, "models")
    if level < 5:  # the hand-over needs a level+1 checkpoint; its values do not matter here
        pynet.save_checkpoint(model, utils.checkpoint_prefix(models_dir, level + 1, 0))
    argv = [f"level={level}", f"dataset_dir={dataset}", f"batch_size={batch}", f"patch_size={opts['patch_size']}",
            f"accum_steps={opts['accum_steps']}", f"mixed_precision={str(opts['mixed_precision']).lower()}",
            f"vgg_dir={vgg_path}", f"models_dir={models_dir}", f"results_dir={os.path.join(work, 'results')}",
            "eval_batch_size=1", "progress=false", "tensorboard=false"]
    args = train_model.parse_arguments(argv)
    trainer = train_model.Trainer(args, model=model, out=lambda *a: None)
    iterator = iter(trainer.train_ds)

    def feed():
        return train_model.next_batch(iterator, trainer.train_log)

    t0 = time.perf_counter()
    for _ in range(opts["warmup"]):
        trainer.steps.train_step(feed)
    warmup_s = time.perf_counter() - t0
    waited, start = 0.0, time.perf_counter()
    for _ in range(opts["steps"]):
        _, wait = trainer.steps.train_step(feed)
        waited += wait
    elapsed = time.perf_counter() - start
    step = elapsed / opts["steps"]
    return {"level": level, "batch_size": batch, "patch_size": opts["patch_size"],
            "target_size": int(opts["patch_size"] * 2 / 2 ** level), "step_s": step, "samples_per_s": batch / step,
            "input_wait_share": waited / elapsed, "warmup_s": warmup_s,
            "trainable_params": int(sum(v.numpy().size for v in trainer.view.trainable_variables))}


def main(argv):
    opts = utils.parse_args(argv, SPEC, "benchmarks/bench_train_step.py", "Time the training step of each level.")
    levels = _levels(opts["levels"])
    if opts["patch_size"] % 16 or not 16 <= opts["patch_size"] <= 224:
        raise utils.UsageError(f"patch_size={opts['patch_size']}: expected a multiple of 16 from 16 to 224")
    import tensorflow as tf

    import make_sample_dataset
    import model as pynet
    import train_model

    train_model.configure({"seed": 0, "deterministic": False, "mixed_precision": opts["mixed_precision"]})
    work = tempfile.mkdtemp(prefix="pynet_bench_train_")
    dataset = os.path.join(work, "data")
    make_sample_dataset.build(dataset, train=opts["train_patches"], test=2, full=0, seed=0, progress=False)
    vgg_path = os.path.join(work, "vgg.mat")
    if min(levels) <= 3:
        write_fake_vgg(vgg_path)
    model = pynet.PyNET()
    devices = [d.device_type for d in tf.config.list_physical_devices()]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"devices: {', '.join(devices)}; TensorFlow {tf.__version__}")
    print(f"patch {opts['patch_size']} (packed), accum_steps {opts['accum_steps']}, "
          f"mixed_precision {opts['mixed_precision']}, {opts['warmup']} warm-up + {opts['steps']} timed steps")
    print("level  batch  target  step (s)  samples/s  input wait  warm-up (s)")
    results = []
    for level in levels:
        r = bench_level(level, model, work, dataset, vgg_path, opts)
        results.append(r)
        print(f"{level:>5}  {r['batch_size']:>5}  {r['target_size']:>6}  {r['step_s']:>8.3f}  {r['samples_per_s']:>9.2f}"
              f"  {100 * r['input_wait_share']:>9.1f}%  {r['warmup_s']:>11.1f}", flush=True)
    if opts["json"]:
        with open(opts["json"], "w") as handle:
            json.dump({"options": opts, "results": results}, handle, indent=1)
    import shutil

    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(utils.run(main))
