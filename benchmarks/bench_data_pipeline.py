"""Benchmark of the training data pipeline (data_pipeline.train_dataset).

1. Throughput: patches per second delivered at each level, with the reference's batch sizes
   (README commands: 50, 50, 48, 18, 12, 10 for levels 5..0), on a generated sample dataset.
2. Memory: peak RSS of a process that streams level-0 batches (batch 10) with train_size=30000.
   ZRR has 46,839 training patches; here the 30,000+ patches are symbolic links to the few
   generated files (pair i -> real pair i mod n), so the OS page cache holds them: the figure
   is the pipeline's own memory, not disk speed. check_dataset's header scan of the 30,000
   pairs is timed too.

    python benchmarks/bench_data_pipeline.py [patches=64] [seconds=4] [rss_batches=300]
"""

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cli  # noqa: E402
import data_pipeline  # noqa: E402
import utils  # noqa: E402

REFERENCE_BATCH = utils.REFERENCE_BATCH_SIZES  # by level


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def make_dataset(folder, patches):
    import make_sample_dataset

    make_sample_dataset.build(folder, train=patches, test=4, full=0, seed=0, progress=False)
    return folder


def link_dataset(source, folder, count):
    """A 'train' split of ``count`` pairs, pair i linking to real pair i mod n of ``source``."""
    real = len(os.listdir(os.path.join(source, "train", "huawei_raw")))
    for sub, ext in (("huawei_raw", "png"), ("canon", "jpg")):
        os.makedirs(os.path.join(folder, "train", sub))
        for i in range(count):
            os.symlink(os.path.abspath(os.path.join(source, "train", sub, f"{i % real}.{ext}")),
                       os.path.join(folder, "train", sub, f"{i}.{ext}"))
    return folder


def throughput(dataset_dir, level, seconds):
    import data_pipeline

    batch = REFERENCE_BATCH[level]
    iterator = iter(data_pipeline.batches(*data_pipeline.train_dataset(dataset_dir, level, batch, train_size=5000,
                                                                     verbose=False)))
    for _ in range(2):  # warm-up: threads started, files in the page cache
        next(iterator)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or count < 3:
        next(iterator)
        count += 1
    elapsed = time.perf_counter() - start
    return batch, count * batch / elapsed, elapsed / count


def rss_child(dataset_dir, batches, train_size):
    """Runs in a fresh process: import, build the level-0 pipeline, stream ``batches`` batches."""
    import tensorflow as tf  # noqa: F401  (counted in the baseline)


    after_import = peak_rss_mib()
    start = time.perf_counter()
    ds, log = data_pipeline.train_dataset(dataset_dir, 0, 10, train_size=train_size, verbose=False)
    check_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in data_pipeline.batches(ds.take(batches), log):
        pass
    stream_s = time.perf_counter() - start
    with open("/proc/self/status") as handle:
        current = next((int(line.split()[1]) / 1024.0 for line in handle if line.startswith("VmRSS:")), 0.0)
    print(json.dumps({"after_import_mib": after_import, "peak_mib": peak_rss_mib(), "end_mib": current,
                      "check_s": check_s,
                      "stream_s": stream_s, "batches": batches, "train_size": train_size}))


SPEC = [
    cli.Arg("patches", int, 64, "generated training patches (real files)", check=cli.positive),
    cli.Arg("seconds", float, 4.0, "timing window per level", check=cli.positive),
    cli.Arg("rss_batches", int, 300, "level-0 batches (of 10) streamed for the memory figure", check=cli.positive),
    cli.Arg("train_size", int, 30000, "train_size (and number of linked patches) of the memory run",
              check=cli.positive),
    cli.Arg("child", str, "", "internal: run the memory measurement in this process"),
]


def main(argv):
    args = cli.parse_args(argv, SPEC, "benchmarks/bench_data_pipeline.py", "Data pipeline throughput and memory.")
    if args["child"]:
        rss_child(args["child"], args["rss_batches"], args["train_size"])
        return
    import platform

    work = tempfile.mkdtemp(prefix="pynet_bench_data_")
    try:
        start = time.perf_counter()
        real = make_dataset(os.path.join(work, "real"), args["patches"])
        print(f"generated {args['patches']} training patches in {time.perf_counter() - start:.1f} s "
              f"(make_sample_dataset.py, {work})")
        cpu = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as handle:
                cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        print(f"machine: {cpu}, {os.cpu_count()} cores visible")
        print("\nthroughput (train_dataset, train_size=5000 -> all patches, reference batch sizes):")
        print("  level  batch  patches/s  ms/batch")
        for level in (5, 4, 3, 2, 1, 0):
            batch, rate, per_batch = throughput(real, level, args["seconds"])
            print(f"  {level:>5}  {batch:>5}  {rate:>9.1f}  {per_batch * 1000:>8.1f}", flush=True)

        linked = link_dataset(real, os.path.join(work, "linked"), args["train_size"])
        child = subprocess.run([sys.executable, os.path.abspath(__file__), f"child={linked}",
                                f"rss_batches={args['rss_batches']}", f"train_size={args['train_size']}"],
                               capture_output=True, text=True, timeout=3600)
        if child.returncode != 0:
            raise cli.UserError(f"memory run failed: {child.stderr.strip().splitlines()[-1:]}")
        figures = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"\nmemory, level 0, batch 10, train_size={figures['train_size']} "
              f"({args['train_size']} linked pairs -> {args['patches']} real files):")
        print(f"  check_dataset of {args['train_size']} pairs (headers): {figures['check_s']:.1f} s")
        print(f"  streamed {figures['batches']} batches ({figures['batches'] * 10} patches) in "
              f"{figures['stream_s']:.1f} s = {figures['batches'] * 10 / figures['stream_s']:.1f} patches/s")
        print(f"  peak RSS after importing TensorFlow: {figures['after_import_mib']:.0f} MiB")
        print(f"  peak RSS of the whole run:           {figures['peak_mib']:.0f} MiB "
              f"(target: < 2048 MiB); RSS at the end: {figures['end_mib']:.0f} MiB")
        reference_gib = figures["train_size"] * (224 * 224 * 4 + 448 * 448 * 3) * 8 / 2 ** 30
        print(f"  the reference would hold {reference_gib:.0f} GiB of float64 arrays for this train_size")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(cli.run(main))
