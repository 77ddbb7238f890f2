"""Inference speed and memory of PyNET on this machine (benchmarks/README.md, "Inference").

    python benchmarks/bench_inference.py                             # peak, patches, frame: ~40 min on 2 cores
    python benchmarks/bench_inference.py parts=peak,patches settings=function,xla batch=2
    python benchmarks/bench_inference.py parts=frame frame_rows=16,24,48
    python benchmarks/bench_inference.py parts=deploy repeats=2       # exported models, ~25 min
    python benchmarks/bench_inference.py parts=patches,frame settings=function precision=fp32,bf16

Every measurement runs in a fresh Python process, so its peak RSS (getrusage ru_maxrss) is its
own, and prints one line. The parts:

* peak: the machine's convolution rate, from single large convolutions of PyNET's own shapes
  (9x9 128->32 on 224x224, level 1's dominant layer; 3x3 512->512 on 56x56), best of
  ``repeats``, plain and with XLA. Its best is "the peak" the network is compared with.
* patches: a batch of 224x224 packed patches (448x448 mosaics) through the whole network to the
  level-0 output, for each setting: seconds per batch (best and median of ``repeats`` after one
  warm-up run), output megapixels per second, achieved MAC/s (macs.conv_macs: 335.7 GMAC per
  patch) and its share of the peak, and peak RSS.
* frame: a 12 MP frame (2976x3968 mosaic, 1488x1984 packed; ``frame_packed=`` sets another
  size) rendered at level 0 as test_model.py does, in strips (automatic height, or each of
  ``frame_rows``; 0 is the whole frame), with each of oneDNN's allocators of
  ``frame_allocator`` (where oneDNN runs: see runtime.bound_memory) and malloc's pages of
  ``frame_pages`` (huge: as test_model.py starts itself, runtime.run_with_huge_pages); with
  ``frame_whole=true`` also the whole frame at once (tile_size=0, the reference's way: ~6 GiB).
  With ``frame_cli=true`` (the default) also ``test_model.py level=0`` itself on the frame
  written as a PNG, with a level-0 checkpoint of the same weights, as a user runs it: its
  wall time (start-up, reading and writing included) and the whole process's peak RSS.
* deploy: the exported models (export_model.py) against test_model.py's own path
  (render.render, level 0), on a 448x448 mosaic (one 224x224 packed patch) and a
  1024x1024 one (``deploy_sizes``): the SavedModel's serving signature, and the TFLite model
  in float32, fp16 weights and int8 weights (quantize=dynamic) in the LiteRT interpreter
  (XNNPACK, its default delegate, one thread per core). Per way and size: seconds per
  mosaic (best and median of ``repeats`` after a first run), load time, peak RSS, the
  largest difference from test_model.py's output (clipped, float) and the PSNR against it,
  and the artefact's size. The artefacts are exported first, in their own process.

The weights are random, scaled by fan-in (as the tests'), so activations keep realistic
magnitudes; the released weights are not needed. Results are also written as JSON with ``json=``.
"""

import functools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import checkpoints  # noqa: E402
import cli  # noqa: E402
import files  # noqa: E402
import images  # noqa: E402
import runtime  # noqa: E402

print = functools.partial(print, flush=True)  # noqa: A001 (long runs: show each line as it comes)

# setting -> (description, extra environment)
SETTINGS = {
    "keras": ("model.predict_on_batch (Keras' own tf.function; test_model.py tile_size=0)", {}),
    "function": ("tf.function(model), TensorFlow's defaults", {}),
    "xla": ("tf.function(model, jit_compile=True): XLA", {}),
    "inter_op_1": ("tf.function, inter-op threads 1 (ops one at a time, 2 threads each)", {}),
    "intra_op_1": ("tf.function, intra-op threads 1: one core, for the scaling", {}),
    "onednn": ("tf.function with TF_ENABLE_ONEDNN_OPTS=1 (oneDNN kernels)", {"TF_ENABLE_ONEDNN_OPTS": "1"}),
    "no_onednn": ("tf.function with TF_ENABLE_ONEDNN_OPTS=0 (Eigen kernels)", {"TF_ENABLE_ONEDNN_OPTS": "0"}),
    "eager": ("model(x) run eagerly (every intermediate kept until the end)", {}),
    "bias_add": ("tf.function, convolutions written tf.nn.conv2d + tf.nn.bias_add + tf.nn.leaky_relu "
                 "(Grappler fuses them into one kernel) instead of Keras ops", {}),
    "in_fused_bn": ("tf.function, instance norm as FusedBatchNormV3 over (1, H, W, B*C)", {}),
    "in_affine": ("tf.function, instance norm as x * a + b with a, b from tf.nn.moments", {}),
}
ALLOCATORS = {"system": "1", "pool": "0"}   # TF_ONEDNN_USE_SYSTEM_ALLOCATOR (used where oneDNN is on)
PAGES = ("huge", "small")   # malloc on transparent huge pages (test_model.py's default where it can) or not
DEFAULT_SETTINGS = "keras,function,eager,xla,bias_add,in_fused_bn,in_affine,inter_op_1,intra_op_1,onednn,no_onednn"
PEAK_SHAPES = ((9, 128, 32, 224), (3, 512, 512, 56))
FRAME_PACKED = (1488, 1984)   # a 12 MP 4:3 frame of 2976 x 3968
# way -> (description, export_model.export's precision and quantize; None: not exported)
DEPLOY = {
    "render": ("render.render (tf.function of the Keras model)", None),
    "saved_model": ("SavedModel, serving_default signature", None),
    "tflite": ("TFLite float32, LiteRT + XNNPACK", ("fp32", "none")),
    "tflite_fp16": ("TFLite fp16 weights, LiteRT + XNNPACK", ("fp16", "none")),
    "tflite_dynamic": ("TFLite int8 weights (dynamic range), LiteRT + XNNPACK", ("fp32", "dynamic")),
}


def _names(text, known, what):
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise cli.UsageError(f"{what}={text}: expected a comma-separated list of {', '.join(known)}")
    return names


def _frame(text):
    size = cli.parse_size(text, multiple=16)
    if size is None:
        raise cli.UsageError(f"frame_packed={text}: expected HEIGHTxWIDTH in packed pixels, multiples of 16")
    return size


def _rows(text):
    rows = [t.strip() for t in text.split(",") if t.strip()]
    if not rows or not all(r == "auto" or r.isdigit() for r in rows):
        raise cli.UsageError(f"frame_rows={text}: expected auto or strip heights such as 32,64")
    return rows


SPEC = [
    cli.Arg("parts", str, "peak,patches,frame", "what to measure: peak, patches, frame, deploy"),
    cli.Arg("settings", str, DEFAULT_SETTINGS, f"settings for the patches ({', '.join(SETTINGS)})"),
    cli.Arg("batch", int, 2, "patches per batch", check=cli.positive),
    cli.Arg("repeats", int, 3, "timed runs per measurement (after one warm-up)", check=cli.positive),
    cli.Arg("frame_rows", str, "auto", "strip heights (packed rows) for the frame: auto, or a list such as 32,64"),
    cli.Arg("frame_allocator", str, "system,pool", "allocators of oneDNN for the frame: system "
              "(malloc, test_model.py's default) and/or pool (its own, TF_ONEDNN_USE_SYSTEM_ALLOCATOR=0)"),
    cli.Arg("frame_pages", str, "huge", "malloc's pages for the frame: huge (transparent huge pages, as "
              "test_model.py runs where glibc and the kernel allow: runtime.run_with_huge_pages) and/or small (4 KiB)"),
    cli.Arg("frame_packed", str, "x".join(map(str, FRAME_PACKED)), "the frame's size in packed pixels "
              "(HEIGHTxWIDTH, multiples of 16; the default is a 12 MP photo)"),
    cli.Arg("frame_whole", cli.BOOL, False, "also render the frame whole (tile_size=0; ~6 GiB, slow)"),
    cli.Arg("frame_cli", cli.BOOL, True, "also run test_model.py on the frame as a PNG with a checkpoint"),
    cli.Arg("deploy", str, ",".join(DEPLOY), f"ways to run for parts=deploy ({', '.join(DEPLOY)})"),
    cli.Arg("deploy_sizes", str, "448x448,1024x1024", "mosaic sizes for parts=deploy (HEIGHTxWIDTH, "
              "multiples of 2; 448x448 is one 224x224 packed patch)"),
    cli.Arg("timeout", int, 1800, "seconds before a measurement is abandoned (oneDNN can be very slow)",
              check=cli.positive),
    cli.Arg("precision", str, "fp32", "compute precisions of the patches and the frame (test_model.py precision=): "
            "fp32 and/or bf16, e.g. fp32,bf16 (bf16 is emulated, and slow, on a CPU without bfloat16 units)"),
    cli.Arg("json", str, "", "also write the results to this JSON file"),
]


# ---------------------------------------------------------------------------------------
# the measurements, each run in its own process

def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(function, repeats):
    """(first call seconds, [timed seconds]) of ``function()``."""
    start = time.perf_counter()
    function()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return first, times


def sane_model(precision="fp32"):
    """The full PyNET with random weights scaled by fan-in (as tests/test_render.py's)."""
    import numpy as np

    from model import PyNET

    model = PyNET(precision=precision)
    rng = np.random.default_rng(0)
    for var in model.weights:
        shape = var.shape
        if len(shape) == 4:
            is_up = var.path.split("/")[0].startswith(("conv_t", "conv_l0")) and not var.path.startswith("conv_l0_out")
            fan_in = 9 * shape[3] / 4 if is_up else shape[0] * shape[1] * shape[2]
            var.assign(rng.normal(0, 1 / np.sqrt(fan_in), shape).astype(np.float32))
        else:
            var.assign(rng.normal(1.0 if var.path.endswith("scale") else 0.0, 0.2, shape).astype(np.float32))
    return model


def child_peak(args):
    import tensorflow as tf

    results = []
    for size, cin, cout, side in PEAK_SHAPES:
        x = tf.random.normal((1, side, side, cin))
        w = tf.random.normal((size, size, cin, cout)) * 0.05
        macs = size * size * cin * cout * side * side
        for jit in (False, True):
            conv = tf.function(lambda x, w: tf.nn.conv2d(x, w, 1, "SAME"), jit_compile=jit)
            _, times = timed(lambda conv=conv, x=x, w=w: conv(x, w).numpy(), args["repeats"])
            results.append({"shape": f"{size}x{size} {cin}->{cout} on {side}x{side}", "xla": jit,
                            "gmac": macs / 1e9, "best_s": min(times), "median_s": sorted(times)[len(times) // 2],
                            "gmac_per_s": macs / min(times) / 1e9})
    return results


def use_variant(setting):
    """Swap model.py's primitives for an alternative formulation (the patches' settings)."""
    import tensorflow as tf

    import model as pynet

    if setting == "bias_add":
        def call(self, x):
            x = tf.nn.bias_add(tf.nn.conv2d(x, self.kernel, 1, "SAME"), self.bias)
            if self.instance_norm:
                x = pynet.instance_norm(x, self.shift, self.scale)
            return tf.nn.leaky_relu(x, pynet.LEAKY_SLOPE) if self.relu else x

        pynet.ConvLayer.call = call
    elif setting == "in_fused_bn":
        def instance_norm(x, shift, scale):
            shape = tf.shape(x)
            batch, height, width, channels = shape[0], shape[1], shape[2], shape[3]
            y = tf.reshape(tf.transpose(x, [1, 2, 0, 3]), [1, height, width, batch * channels])
            y, _, _ = tf.compat.v1.nn.fused_batch_norm(y, tf.tile(scale, [batch]), tf.tile(shift, [batch]),
                                                       epsilon=pynet.IN_EPSILON, is_training=True)
            return tf.transpose(tf.reshape(y, [height, width, batch, channels]), [2, 0, 1, 3])

        pynet.instance_norm = instance_norm
    elif setting == "in_affine":
        def instance_norm(x, shift, scale):
            mean, variance = tf.nn.moments(x, axes=[1, 2], keepdims=True)
            multiplier = scale * tf.math.rsqrt(variance + pynet.IN_EPSILON)
            return x * multiplier + (shift - mean * multiplier)

        pynet.instance_norm = instance_norm


def child_patches(args):
    import numpy as np
    import tensorflow as tf

    from macs import conv_macs
    from model import level_model

    setting = args["setting"]
    use_variant(setting)
    if setting == "inter_op_1":
        tf.config.threading.set_inter_op_parallelism_threads(1)
    if setting == "intra_op_1":
        tf.config.threading.set_intra_op_parallelism_threads(1)
    model = sane_model(args["precision"])
    view = level_model(model, 0)
    batch = args["batch"]
    x = tf.constant(np.random.default_rng(1).uniform(0, 1, (batch, 224, 224, 4)).astype(np.float32))
    if setting == "keras":
        run = lambda: np.asarray(view.predict_on_batch(x))  # noqa: E731
    elif setting == "eager":
        run = lambda: view(x).numpy()  # noqa: E731
    else:
        function = tf.function(lambda x: view(x), jit_compile=setting == "xla")
        run = lambda: function(x).numpy()  # noqa: E731
    first, times = timed(run, args["repeats"])
    macs = conv_macs(model, 224, 224, level=0, batch=batch)
    best = min(times)
    return {"setting": setting, "precision": args["precision"], "batch": batch, "first_s": first, "best_s": best,
            "median_s": sorted(times)[len(times) // 2], "mp_per_s": batch * 448 * 448 / best / 1e6,
            "gmac_per_s": macs / best / 1e9, "peak_rss_mib": peak_rss_mib()}


def frame_mosaic(height, width):
    """The benchmark's mosaic for a frame of ``height`` x ``width`` packed pixels."""
    import numpy as np

    return np.random.default_rng(2).integers(0, 1024, (2 * height, 2 * width)).astype(np.uint16)


def child_frame(args):
    import render
    from macs import conv_macs

    height, width = args["packed"]
    mosaic = frame_mosaic(height, width)
    rows = str(args["rows"])
    tile_size = None if rows == "auto" else int(rows)
    render.return_freed_memory_for([mosaic.shape], tile_size)   # as test_model.py, before the weights
    model = sane_model(args["precision"])
    start = time.perf_counter()
    image = render.render(model, mosaic, 0, tile_size)
    seconds = time.perf_counter() - start
    macs = conv_macs(model, height, width, level=0)
    return {"rows": render.auto_tile_size(height, width) if tile_size is None else tile_size, "seconds": seconds,
            "mp_per_s": image.shape[0] * image.shape[1] / seconds / 1e6, "gmac_per_s": macs / seconds / 1e9,
            "tmac": macs / 1e12, "peak_rss_mib": peak_rss_mib()}


def child_cli_files(args):
    """The frame as a PNG mosaic and a level-0 checkpoint of sane_model's weights, in args["folder"]."""
    from checkpoints import save_checkpoint

    folder = args["folder"]
    save_checkpoint(sane_model(), checkpoints.checkpoint_prefix(os.path.join(folder, "models"), 0, 1000))
    images.write_png(os.path.join(folder, "frame.png"), frame_mosaic(*args["packed"]))
    return {"folder": folder}


def measure_cli(folder, env, timeout, precision="fp32"):
    """test_model.py level=0 on the files of child_cli_files, as a user runs it: wall seconds and
    the peak RSS of that process alone (os.wait4, not the children's maximum so far)."""
    command = [sys.executable, os.path.join(ROOT, "test_model.py"), "level=0", f"input={folder}/frame.png",
               f"models_dir={folder}/models", f"output_dir={folder}/out", f"precision={precision}"]
    if precision == "bf16" and not runtime.bf16_units():
        command.append("force_bf16=true")  # measured anyway: the line says the CPU has no bfloat16 units
    os.makedirs(os.path.join(folder, "out"), exist_ok=True)
    with open(os.path.join(folder, "stderr.txt"), "w+") as errors:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors, env={**os.environ, **env})
        watchdog = threading.Timer(timeout, process.kill)
        watchdog.start()
        _, status, usage = os.wait4(process.pid, 0)
        watchdog.cancel()
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            errors.seek(0)
            lines = errors.read().strip().splitlines() or [f"exit {process.returncode}"]
            return {"error": f"abandoned after {timeout} s" if seconds >= timeout else lines[-1]}
    return {"seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024}


def deploy_mosaic(height, width):
    import numpy as np

    return np.random.default_rng(3).integers(0, 1024, (height, width)).astype(np.uint16)


def deploy_artefact(folder, way, size):
    if way == "saved_model":
        return os.path.join(folder, "saved_model")
    return os.path.join(folder, f"{way}_{size[0]}x{size[1]}.tflite")


def child_deploy_export(args):
    """Every artefact the deploy runs need, from sane_model()'s weights, float32 output."""
    import export_model

    model = sane_model()
    sizes = [tuple(size) for size in args["sizes"]]
    jobs = [("saved_model", None)] if "saved_model" in args["ways"] else []
    jobs += [(way, size) for way in args["ways"] if DEPLOY[way][1] for size in sizes]
    results = []
    for way, size in jobs:
        path = deploy_artefact(args["folder"], way, size)
        precision, quantize = DEPLOY[way][1] or ("fp32", "none")
        start = time.perf_counter()
        nbytes = export_model.export(model, 0, 0, "tflite" if size else "saved_model", path, "float", size,
                                     precision, quantize)
        results.append({"way": way, "size": size, "bytes": nbytes, "export_s": time.perf_counter() - start})
    return results


def child_deploy_run(args):
    """One way on one mosaic size: timings, and the output kept for the comparisons."""
    import numpy as np

    size, way = tuple(args["size"]), args["way"]
    mosaic = deploy_mosaic(*size)
    start = time.perf_counter()
    if way == "render":
        import render

        model = sane_model()
        run = lambda: render.render(model, mosaic, 0)  # noqa: E731
    else:
        import deployed

        exported = deployed.load(deploy_artefact(args["folder"], way, size), threads=os.cpu_count())
        run = lambda: exported(mosaic)  # noqa: E731
    load_s = time.perf_counter() - start
    output = []
    first, times = timed(lambda: output.append(run()), args["repeats"])
    np.save(os.path.join(args["folder"], f"out_{way}_{size[0]}x{size[1]}.npy"), np.clip(output[-1], 0, 1))
    return {"way": way, "size": size, "load_s": load_s, "first_s": first, "best_s": min(times),
            "median_s": sorted(times)[len(times) // 2], "peak_rss_mib": peak_rss_mib()}


def _sizes(text):
    sizes = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        size = cli.parse_size(item, multiple=2)
        if size is None:
            raise cli.UsageError(f"deploy_sizes={text}: expected sizes such as 448x448,1024x1024 (multiples of 2)")
        sizes.append(size)
    if not sizes:
        raise cli.UsageError(f"deploy_sizes={text}: expected sizes such as 448x448,1024x1024")
    return sizes


def measure_deploy(args, timeout):
    """The deploy part: export, run each way in its own process, compare the outputs."""
    import shutil
    import tempfile

    import numpy as np

    ways, sizes = args["ways"], args["sizes"]
    folder = tempfile.mkdtemp(prefix="pynet_deploy_")
    try:
        exported = spawn("deploy_export", timeout, folder=folder, ways=ways, sizes=sizes)
        if isinstance(exported, dict):
            print(f"  export: {exported['error']}")
            return {"export": exported}
        for e in exported:
            where = "any size" if e["size"] is None else f"{e['size'][0]}x{e['size'][1]}"
            print(f"  exported {e['way']:<15} {where:<10} {e['bytes'] / 2 ** 20:7.1f} MiB  in {e['export_s']:5.1f} s")
        runs = []
        for size in sizes:
            print(f"  mosaic {size[0]}x{size[1]} -> RGB {size[0]}x{size[1]}, level 0:")
            outputs = {}
            for way in ways:
                r = spawn("deploy_run", timeout, folder=folder, way=way, size=size, repeats=args["repeats"])
                r.setdefault("way", way)
                r["size"] = size
                runs.append(r)
                if "error" in r:
                    print(f"    {way:<15} {r['error']}")
                    continue
                outputs[way] = np.load(os.path.join(folder, f"out_{way}_{size[0]}x{size[1]}.npy"))
                reference = outputs.get("render")
                if reference is not None and way != "render":
                    error = outputs[way].astype(np.float64) - reference
                    r["max_abs_diff"] = float(np.abs(error).max())
                    # None: identical
                    r["psnr_db"] = float(10 * np.log10(1 / np.mean(error ** 2))) if r["max_abs_diff"] else None
                vs = ""
                if "max_abs_diff" in r:
                    vs = "  identical" if r["psnr_db"] is None else \
                        f"  max |diff| {r['max_abs_diff']:.1e}  PSNR {r['psnr_db']:6.1f} dB"
                print(f"    {way:<15} {r['best_s']:7.2f} s (median {r['median_s']:.2f}, first {r['first_s']:.2f}, "
                      f"load {r['load_s']:.1f})  peak RSS {r['peak_rss_mib'] / 1024:.2f} GiB{vs}   "
                      f"({DEPLOY[way][0]})")
        return {"export": exported, "runs": runs}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


CHILDREN = {"peak": child_peak, "patches": child_patches, "frame": child_frame, "cli_files": child_cli_files,
            "deploy_export": child_deploy_export, "deploy_run": child_deploy_run}


def pages_environment(page):
    """Environment variables for a frame child on ``page`` pages: huge ones as test_model.py
    sets them (nothing where this machine cannot), 4 KiB ones by turning the tunable off."""
    if page == "small":
        return {"GLIBC_TUNABLES": runtime.tunables_with_huge_pages(0)}
    environment = runtime.huge_pages_environment()
    return {} if environment is None else {"GLIBC_TUNABLES": environment["GLIBC_TUNABLES"]}


def spawn(part, timeout, env=None, **args):
    """Run one measurement in a fresh process; its result, or {"error": ...}."""
    command = [sys.executable, os.path.abspath(__file__), "--child", json.dumps({"part": part, **args})]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return {"error": f"abandoned after {timeout} s"}
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------
# the report

def machine():
    import tensorflow as tf

    cpu, flags = runtime.cpu_model(), runtime.cpu_flags(cap="")
    # TensorFlow's x86 Linux build turns oneDNN on by itself only on CPUs with these
    # instructions; the rates of every setting depend on which kernels run.
    vnni = sorted(flags & {"avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16"})
    setting = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
    if setting in ("0", "1"):
        onednn = f"{'on' if setting == '1' else 'off'} (TF_ENABLE_ONEDNN_OPTS)"
    else:
        onednn = f"{'on' if vnni else 'off'} (TensorFlow's default for this CPU)"
    try:
        from importlib.metadata import version

        litert = version("ai-edge-litert")
    except Exception:  # not installed: the deploy part says so when it runs
        litert = "not installed"
    return {"cpu": cpu, "cores": os.cpu_count(), "tensorflow": tf.__version__, "python": platform.python_version(),
            "keras": __import__("keras").__version__, "ai_edge_litert": litert,
            "glibc": " ".join(platform.libc_ver()), "transparent_huge_pages": runtime.thp_mode() or "unknown",
            "avx512f": "avx512f" in flags, "vnni_flags": vnni, "bf16_units": runtime.bf16_units() or "none",
            "onednn": onednn, "load_average": os.getloadavg()}


def failed(label, width, r, note=""):
    """Print a measurement's error on its line; whether there was one."""
    if "error" in r:
        print(f"  {label:<{width}} {r['error']}{note}")
    return "error" in r


def rate(r, peak):
    """A measurement's convolution rate, and its share of the peak when measured."""
    share = f" = {100 * r['gmac_per_s'] / peak:3.0f}% of peak" if peak else ""
    return f"{r['gmac_per_s']:6.1f} GMAC/s{share}"


def measure_frame_cli(frame, allocators, pages, timeout, precisions=("fp32",)):
    print("  test_model.py level=0 on the frame as a PNG, with a level-0 checkpoint (wall time of the process):")
    with tempfile.TemporaryDirectory(prefix="bench_cli_") as folder:
        made = spawn("cli_files", timeout, folder=folder, packed=frame)
        if "error" in made:
            print(f"    cannot write the files: {made['error']}")
            return [made]
        results = []
        for precision, allocator, page in [(q, a, p) for q in precisions for a in allocators for p in pages]:
            # huge pages: nothing to set, test_model.py starts itself again with them
            env = {"TF_ONEDNN_USE_SYSTEM_ALLOCATOR": ALLOCATORS[allocator],
                   **(pages_environment(page) if page == "small" else {})}
            r = {"precision": precision, "allocator": allocator, "pages": page,
                 **measure_cli(folder, env, timeout, precision)}
            results.append(r)
            label = f"test_model.py, {precision}, {allocator}, {page}"
            if "error" in r:
                print(f"  {label:<36} {r['error']}")
            else:
                print(f"  {label:<36} {r['seconds']:7.1f} s  peak RSS {r['peak_rss_mib'] / 1024:.2f} GiB")
        return results


def main(argv):
    args = cli.parse_args(argv, SPEC, "benchmarks/bench_inference.py", __doc__.strip().splitlines()[0])
    parts = _names(args["parts"], ("peak", "patches", "frame", "deploy"), "parts")
    deploy = {"ways": _names(args["deploy"], DEPLOY, "deploy"), "sizes": _sizes(args["deploy_sizes"]),
              "repeats": args["repeats"]}
    settings = _names(args["settings"], SETTINGS, "settings")
    allocators = _names(args["frame_allocator"], ALLOCATORS, "frame_allocator")
    pages = _names(args["frame_pages"], PAGES, "frame_pages")
    rows = _rows(args["frame_rows"])
    frame = _frame(args["frame_packed"])
    precisions = _names(args["precision"], ("fp32", "bf16"), "precision")
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, AVX-512 {'yes' if info['avx512f'] else 'no'}, "
          f"bfloat16 units {info['bf16_units']}, "
          f"oneDNN {info['onednn']}, TensorFlow {info['tensorflow']}, Keras {info['keras']}, "
          f"ai-edge-litert {info['ai_edge_litert']}, Python {info['python']}, "
          f"{info['glibc']}, transparent huge pages {info['transparent_huge_pages']}, "
          f"load average {info['load_average'][0]:.2f} at the start (other jobs make rates lower)")
    results = {"machine": info}
    peak = None
    if "peak" in parts:
        print("\nconvolution peak (one convolution, best of the runs):")
        results["peak"] = spawn("peak", args["timeout"], repeats=args["repeats"])
        for r in results["peak"] if isinstance(results["peak"], list) else []:
            print(f"  {r['shape']:<26} {'XLA' if r['xla'] else 'plain':<5} {r['gmac']:6.2f} GMAC  "
                  f"{r['best_s'] * 1e3:7.1f} ms  {r['gmac_per_s']:6.1f} GMAC/s ({2 * r['gmac_per_s']:.0f} GFLOP/s)")
            peak = max(peak or 0.0, r["gmac_per_s"])
        if isinstance(results["peak"], dict):
            print(f"  error: {results['peak']['error']}")
    if "patches" in parts:
        print(f"\nwhole network, batch of {args['batch']} 224x224 packed patches -> 448x448 RGB (level 0):")
        results["patches"] = []
        for precision, setting in [(q, s) for q in precisions for s in settings]:
            description, env = SETTINGS[setting]
            r = spawn("patches", args["timeout"], env, setting=setting, batch=args["batch"], repeats=args["repeats"],
                      precision=precision)
            r.setdefault("setting", setting)
            results["patches"].append(r)
            label = f"{setting} {precision}"
            if not failed(label, 16, r, f"   ({description})"):
                print(f"  {label:<16} {r['best_s']:7.2f} s/batch (median {r['median_s']:.2f}, first "
                      f"{r['first_s']:.1f})  {r['mp_per_s']:5.3f} MP/s  {rate(r, peak)}  peak RSS "
                      f"{r['peak_rss_mib'] / 1024:.2f} GiB   ({description})")
    if "frame" in parts:
        megapixels = 4 * frame[0] * frame[1] / 1e6
        print(f"\nframe of {2 * frame[0]}x{2 * frame[1]} mosaic pixels ({megapixels:.1f} MP) -> RGB, "
              f"level 0, render.render:")
        results["frame"] = []
        runs = [(q, r, a, p) for q in precisions for r in rows + ([0] if args["frame_whole"] else [])
                for a in allocators for p in pages]
        for precision, r_rows, allocator, page in runs:
            env = {"TF_ONEDNN_USE_SYSTEM_ALLOCATOR": ALLOCATORS[allocator], **pages_environment(page)}
            r = spawn("frame", args["timeout"], env, rows=r_rows, packed=frame, precision=precision)
            r.setdefault("rows", r_rows)
            r["allocator"], r["pages"], r["precision"] = allocator, page, precision
            results["frame"].append(r)
            shape = "whole frame" if str(r["rows"]) == "0" else f"strips of {r['rows']} rows"
            label = f"{shape}, {precision}, {allocator}, {page}"
            if not failed(label, 36, r):
                print(f"  {label:<36} {r['seconds']:7.1f} s  {r['mp_per_s']:5.3f} MP/s  {rate(r, peak)}  peak RSS "
                      f"{r['peak_rss_mib'] / 1024:.2f} GiB  ({r['tmac']:.2f} TMAC)")
        if args["frame_cli"]:
            results["frame_cli"] = measure_frame_cli(frame, allocators, pages, args["timeout"], precisions)
    if "deploy" in parts:
        print("\nexported models (export_model.py) against test_model.py's own path, one mosaic at a time:")
        results["deploy"] = measure_deploy(deploy, args["timeout"])
    results["machine"]["load_average_end"] = os.getloadavg()
    print(f"\nload average at the end: {results['machine']['load_average_end'][0]:.2f}")
    if args["json"]:
        with files.atomic_path(args["json"]) as tmp:
            with open(tmp, "w") as handle:
                json.dump(results, handle, indent=1)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        request = json.loads(sys.argv[2])
        print(json.dumps(CHILDREN[request.pop("part")](request)))
    else:
        sys.exit(cli.run(main))
