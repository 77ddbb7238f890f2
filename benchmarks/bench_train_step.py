"""Benchmark of the training step per level, and where its time goes.

For each level, in one process, on the full PyNET with the level's loss (a VGG-19 of random
weights with the real layer shapes stands in for imagenet-vgg-verydeep-19.mat: same cost):

* ``plain``: the model's forward + backward + Adam as one tf.function on constant inputs (no
  tf.data, no strategy, no loop): what the network itself costs;
* ``cli``: train_model.py's own loop (``Trainer.run``: the real input pipeline on a generated
  sample dataset, progress bar, TensorBoard summaries, NaN check), timed between its steps,
  without the evaluations at the first and last iteration;

and prints seconds per step (wall and CPU), the share of the CLI step that is the plain step,
GFLOP/s and the percentage of this CPU's fp32 peak (one large matmul, measured at start),
and which kernels ran (oneDNN or TensorFlow's own, XLA or not). The variants alternate step
by step so that a busy machine slows them alike; compare ratios, not absolute times.

    python benchmarks/bench_train_step.py levels=5 batch_size=4 patch_size=224
    python benchmarks/bench_train_step.py levels=0 batch_size=2 patch_size=64
    python benchmarks/bench_train_step.py                        # every level, reference batches, 224

Kernels are chosen as train_model.py chooses them (TF_ENABLE_ONEDNN_OPTS set in the
environment wins). ``batch_size=0`` means the reference's batch of each level.
"""

import json
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import checkpoints  # noqa: E402
import cli  # noqa: E402
import runtime  # noqa: E402
import utils  # noqa: E402

REFERENCE_BATCH = utils.REFERENCE_BATCH_SIZES  # by level
# VGG-19 up to relu5_4: (input channels, output channels, resolution divisor) of its 16 convolutions
VGG_CONVS = ([(3, 64, 1), (64, 64, 1), (64, 128, 2), (128, 128, 2), (128, 256, 4)] + [(256, 256, 4)] * 3
             + [(256, 512, 8)] + [(512, 512, 8)] * 3 + [(512, 512, 16)] * 4)


def _levels(text):
    try:
        levels = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise cli.UsageError(f"levels={text}: expected a comma-separated list of levels") from None
    if not levels or any(level not in utils.LEVELS for level in levels):
        raise cli.UsageError(f"levels={text}: expected levels among 0..5")
    return sorted(set(levels), reverse=True)


def _patch(value):
    return None if 16 <= value <= 224 and value % 16 == 0 else "a multiple of 16 from 16 to 224"


SPEC = [
    cli.Arg("levels", str, "5,4,3,2,1,0", "comma-separated levels to time"),
    cli.Arg("batch_size", int, 0, "batch size of every level; 0 = the reference's batch of each level",
              check=cli.non_negative),
    cli.Arg("patch_size", int, 224, "packed crop side", check=_patch),
    cli.Arg("steps", int, 4, "timed steps per variant and level", check=cli.positive),
    cli.Arg("warmup", int, 2, "untimed steps first (tracing, first allocations)", check=cli.positive),
    cli.Arg("variants", str, "plain,cli", "what to time: plain, cli (comma-separated)"),
    cli.Arg("xla", cli.BOOL, False, "compile the steps with XLA (train_model.py xla=true)"),
    cli.Arg("train_patches", int, 16, "generated training patches", check=cli.positive),
    cli.Arg("precision", str, "fp32", "compute precisions to time, fp32 and/or bf16 (train_model.py precision=; "
            "bf16 is emulated, and slow, on a CPU without bfloat16 units)"),
    cli.Arg("json", str, "", "also write the results to this JSON file"),
]


# ---------------------------------------------------------------------------------------
# work counts

def vgg_macs(size: int, batch: int) -> int:
    return batch * sum(size // d * (size // d) * 9 * cin * cout for cin, cout, d in VGG_CONVS)


def training_flops(model, level: int, patch: int, batch: int, content: bool) -> float:
    """FLOPs of one training step, counted from the convolutions: the network's forward,
    and twice that for its backward (input and weight gradients); VGG-19 forward on the
    prediction and the target, and backward to the prediction (input gradients only).
    Element-wise work (instance norm, Adam, activations) is not counted."""
    from macs import conv_macs

    network = conv_macs(model, patch, patch, level=level, batch=batch)
    vgg = vgg_macs(int(patch * 2 / 2 ** level), batch) if content else 0
    return 2.0 * (3 * network + 3 * vgg)


def peak_gflops(size=2048, repeats=6) -> float:
    """fp32 GFLOP/s of one large matmul: this CPU's practical peak."""
    import tensorflow as tf

    a = tf.random.normal((size, size))
    matmul = tf.function(lambda x: tf.linalg.matmul(x, x))
    matmul(a).numpy()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        matmul(a).numpy()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size ** 3 / best / 1e9


def kernels_in_use() -> str:
    import tensorflow as tf

    try:
        from tensorflow.python.util import _pywrap_util_port

        onednn = "oneDNN" if _pywrap_util_port.IsMklEnabled() else "TensorFlow's own (Eigen)"
    except (ImportError, AttributeError):
        onednn = f"{runtime.ONEDNN_VARIABLE}={os.environ.get(runtime.ONEDNN_VARIABLE, 'default')}"
    return f"{onednn}, TensorFlow {tf.__version__}"


# ---------------------------------------------------------------------------------------
# the variants

def plain_step(job):
    """The network, the level's loss and Adam as one tf.function, nothing around it."""
    import tensorflow as tf

    import losses

    view, optimizer, level, vgg = job.view, job.optimizer, job.level, job.vgg
    variables = view.trainable_variables
    raw, target = next(iter(job.train_ds))

    @tf.function(jit_compile=job.args["xla"])
    def step(raw, target):
        with tf.GradientTape() as tape:
            per_image, _ = losses.level_loss_per_image(level, view(raw, training=True), target, vgg, vgg is not None)
            loss = tf.reduce_mean(per_image)
        grads = tape.gradient(loss, variables)  # None for the biases a bf16 build leaves out (model.ConvLayer)
        optimizer.apply_gradients([(tf.zeros_like(v) if g is None else g, v) for g, v in zip(grads, variables)])
        return loss

    return lambda: float(step(raw, target))


class LoopClock:
    """Runs train_model.py's loop one step at a time (its on_step hook): ``advance()`` lets it
    run exactly one more step, so the caller times each step beside the plain one."""

    def __init__(self, job):
        import threading

        self.job, self.go, self.done = job, threading.Semaphore(0), threading.Semaphore(0)
        self.error = None
        job.on_step = self._on_step
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            self.go.acquire()
            self.job.run()
        except BaseException as exc:  # noqa: BLE001 - reported by advance()
            self.error = exc
        finally:
            self.done.release()

    def _on_step(self, i, loss):
        self.done.release()
        self.go.acquire()

    def start(self):
        self.thread.start()

    def advance(self):
        self.go.release()
        self.done.acquire()
        if self.error is not None:
            raise self.error


def bench_level(level, model, work, dataset, vgg_path, opts, precision="fp32"):
    import train_model
    import trainer

    batch = opts["batch_size"] or REFERENCE_BATCH[level]
    models_dir = os.path.join(work, f"models_{precision}_{level}")
    if level < 5:  # the hand-over needs a level+1 checkpoint; its values do not matter here

        checkpoints.save_checkpoint(model, checkpoints.checkpoint_prefix(models_dir, level + 1, 0))
    iters = opts["warmup"] + opts["steps"] + 1
    argv = [f"level={level}", f"dataset_dir={dataset}", f"batch_size={batch}", f"patch_size={opts['patch_size']}",
            f"vgg_dir={vgg_path}", f"models_dir={models_dir}", f"results_dir={os.path.join(work, 'results')}",
            f"num_train_iters={iters}", f"eval_step={10 * iters}", f"eval_batch_size={min(batch, 2)}",
            f"xla={str(opts['xla']).lower()}", "progress=false", f"precision={precision}", "force_bf16=true"]
    args = train_model.parse_arguments(argv)
    job = trainer.Trainer(args, model=model, out=lambda *a: None)
    variants = [v.strip() for v in opts["variants"].split(",") if v.strip()]
    runners = {}
    if "plain" in variants:
        runners["plain"] = plain_step(job)
    if "cli" in variants:
        clock = LoopClock(job)
        clock.start()
        clock.advance()  # iteration 0, then its evaluation runs inside the next advance
        runners["cli"] = clock.advance
    for _ in range(opts["warmup"]):
        for run in runners.values():
            run()
    wall = {name: 0.0 for name in runners}
    cpu = {name: 0.0 for name in runners}
    for _ in range(opts["steps"]):
        for name, run in runners.items():
            w0, c0 = time.perf_counter(), time.process_time()
            run()
            wall[name] += time.perf_counter() - w0
            cpu[name] += time.process_time() - c0
    if "cli" in runners:
        while clock.thread.is_alive():  # let the loop finish (last evaluation and checkpoint)
            clock.go.release()
            clock.thread.join(timeout=1)
    flops = training_flops(model, level, opts["patch_size"], batch, job.vgg is not None)
    return {name: {"level": level, "precision": precision, "batch_size": batch, "patch_size": opts["patch_size"],
                   "step_s": wall[name] / opts["steps"], "cpu_s": cpu[name] / opts["steps"],
                   "gflops": flops / (wall[name] / opts["steps"]) / 1e9} for name in runners}


def main(argv):
    opts = cli.parse_args(argv, SPEC, "benchmarks/bench_train_step.py", "Time the training step of each level.")
    levels = _levels(opts["levels"])
    smallest = min(opts["batch_size"] or REFERENCE_BATCH[level] for level in levels)
    runtime.select_cpu_kernels(training=True, smallest_batch=smallest)
    import tensorflow as tf

    import make_sample_dataset
    import model as pynet
    import train_model
    from helpers import random_vgg_weights, write_matconvnet_vgg

    train_model.configure({"seed": 0, "deterministic": False})
    precisions = [p.strip() for p in opts["precision"].split(",") if p.strip()]
    if not precisions or set(precisions) - {"fp32", "bf16"}:
        raise cli.UsageError(f"precision={opts['precision']}: expected fp32 and/or bf16")
    tf.get_logger().setLevel("ERROR")  # one trace per level and variant, by design
    work = tempfile.mkdtemp(prefix="pynet_bench_train_")
    try:
        dataset = os.path.join(work, "data")
        make_sample_dataset.build(dataset, train=opts["train_patches"], test=2, full=0, seed=0, progress=False)
        vgg_path = os.path.join(work, "vgg.mat")
        write_matconvnet_vgg(vgg_path, random_vgg_weights(seed=0))
        peak = peak_gflops()
        print(f"machine: {runtime.cpu_model()}, {os.cpu_count()} CPU cores, bfloat16 units "
              f"{runtime.bf16_units() or 'none'}; kernels: {kernels_in_use()}; XLA {'on' if opts['xla'] else 'off'}")
        print(f"fp32 peak (2048^3 matmul): {peak:.0f} GFLOP/s; patch {opts['patch_size']} (packed); "
              f"{opts['warmup']} warm-up + {opts['steps']} timed steps per variant, alternating")
        print("level  precision  batch  variant  step (s)  CPU (s)  plain/step  GFLOP/s  % peak")
        results = []
        for precision in precisions:
            model = pynet.PyNET(precision=precision)
            for level in levels:
                measured = bench_level(level, model, work, dataset, vgg_path, opts, precision)
                plain = measured.get("plain", {}).get("step_s")
                for name, r in measured.items():
                    share = f"{100 * plain / r['step_s']:9.0f}%" if plain else f"{'':>10}"
                    print(f"{level:>5}  {precision:>9}  {r['batch_size']:>5}  {name:>7}  {r['step_s']:>8.3f}  "
                          f"{r['cpu_s']:>7.3f}  {share}  {r['gflops']:>7.1f}  {100 * r['gflops'] / peak:>5.0f}%",
                          flush=True)
                    results.append({"variant": name, **r, "peak_gflops": peak})
        if opts["json"]:
            with open(opts["json"], "w") as handle:
                json.dump({"options": opts, "kernels": kernels_in_use(), "results": results}, handle, indent=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(cli.run(main))
