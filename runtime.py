"""The process's runtime settings: CPU kernels, malloc's pages and thresholds, TensorFlow's log.

The rule, enforced here: these settings are read by TensorFlow and glibc when they start, so
they must be made before TensorFlow is imported (``select_cpu_kernels`` says nothing and
changes nothing once it is: a caller in the same process made the choice) and, for glibc's
tunables, before the process starts (``run_with_huge_pages`` starts the script again). Every
script therefore imports TensorFlow, and the modules that import it at their top (model,
render, ...), only inside the functions that run after these settings, never at its own top,
which also keeps ``python SCRIPT.py help`` instant.
"""

import contextlib
import ctypes
import multiprocessing
import os
import pickle
import platform
import re
import signal
import sys
import tempfile
import traceback

from cli import UsageError

# TensorFlow's C++ start-up notes (CPU features, absl) drown the scripts' own output; errors
# still show. Every script imports this module before TensorFlow; a user's value wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def tensorflow_started() -> bool:
    return "tensorflow" in sys.modules


def tensorflow_running() -> bool:
    """Whether TensorFlow's runtime, with its thread pools, started in this process: the first
    operation initializes its eager context; an import alone starts no pool. A layout of
    TensorFlow's internals this does not know counts as running."""
    context = sys.modules.get("tensorflow.python.eager.context")
    if context is None:
        return False
    current = getattr(context, "_context", "unknown")
    return current is not None and getattr(current, "_initialized", True) is not False


@contextlib.contextmanager
def c_stderr_captured():
    """Collect what C libraries print straight to file descriptor 2 in the block (LibRaw's
    errors, TensorFlow's start-up notices), in ``captured["text"]`` once the block ends."""
    captured = {"text": ""}
    try:
        saved = os.dup(2)
    except OSError:  # no usable fd 2: nothing to capture
        yield captured
        return
    with tempfile.TemporaryFile() as sink:
        sys.stderr.flush()
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured["text"] = sink.read().decode("utf-8", "replace").strip()


# What TensorFlow's C++ libraries print at import whatever TF_CPP_MIN_LOG_LEVEL says (absl logs
# before it is initialised): notices, not errors, and each twice. The scripts print their own
# "CPU kernels: ..." line instead.
_START_UP_NOTICES = ("All log messages before absl::InitializeLog() is called are written to STDERR",
                     "oneDNN custom operations are on")


def start_tensorflow():
    """Import TensorFlow after select_cpu_kernels, keeping its start-up notices out of the
    scripts' output (so that an error is one line); anything else it prints still shows."""
    if tensorflow_started():
        return sys.modules["tensorflow"]
    with c_stderr_captured() as captured:
        import tensorflow as tf
    kept = [line for line in captured["text"].splitlines() if not any(n in line for n in _START_UP_NOTICES)]
    if kept:
        print("\n".join(kept), file=sys.stderr)
    return tf


# ---------------------------------------------------------------------------------------
# CPU kernels: oneDNN or TensorFlow's own (Eigen), chosen before TensorFlow starts

ONEDNN_VARIABLE = "TF_ENABLE_ONEDNN_OPTS"
_AVX512_CORE = {"avx512f", "avx512bw", "avx512dq", "avx512vl"}


def cpu_model() -> str:
    """This CPU's model name (Linux), or the platform's processor name."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def onednn_cap() -> str:
    """The ISA cap a user set for oneDNN (ONEDNN_MAX_CPU_ISA), upper-cased; "" for none."""
    return os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).strip().upper()


def cpu_flags(cap=None) -> set:
    """The instruction-set flags of this CPU (Linux), limited by oneDNN's ISA cap when it caps
    oneDNN below AVX-512; an empty set where they cannot be read."""
    flags = set()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        return set()
    cap = onednn_cap() if cap is None else cap
    if cap and not cap.startswith(("AVX512", "AVX10", "AMX", "ALL", "DEFAULT")):
        flags = {f for f in flags if not f.startswith("avx512")}
    return flags


# bfloat16 units, as oneDNN uses them: AVX512_CORE_BF16 (AVX-512 with VNNI and AVX512-BF16: AMD
# Zen 4 and later, Intel Cooper Lake) and AVX512_CORE_AMX (AMX tiles: Intel Sapphire Rapids and
# later). AVX_NE_CONVERT converts but has no bfloat16 arithmetic, so it does not count. A cap
# (ONEDNN_MAX_CPU_ISA) below an ISA keeps oneDNN from using it.
_AVX512_BF16 = _AVX512_CORE | {"avx512_vnni", "avx512_bf16"}
_AMX = {"amx_tile", "amx_bf16", "amx_int8"}
_AMX_CAPS = {"", "ALL", "DEFAULT", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX",
             "AVX10_1_512_AMX_FP16"}
_AVX512_BF16_CAPS = _AMX_CAPS | {"AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512"}


def bf16_units(flags=None, cap=None) -> str:
    """"AMX" or "AVX512-BF16" where this CPU has bfloat16 units oneDNN may use; "" where not."""
    flags = cpu_flags(cap="") if flags is None else flags
    cap = onednn_cap() if cap is None else cap.strip().upper()
    if _AVX512_BF16 <= flags and _AMX <= flags and cap in _AMX_CAPS:
        return "AMX"
    if _AVX512_BF16 <= flags and cap in _AVX512_BF16_CAPS:
        return "AVX512-BF16"
    return ""


def precision_note(precision: str, force_bf16: bool = False, gpus: int = 0, units=None):
    """The line a script prints about its precision= on this machine, or None; a one-line
    UsageError for bf16 on a CPU without bfloat16 units (emulated there, it is slower than
    fp32) unless ``force_bf16``."""
    units = bf16_units() if units is None else units
    if gpus:
        return None
    if precision == "bf16" and not units:
        if not force_bf16:
            raise UsageError("precision=bf16: this CPU has no bfloat16 units (AMX or AVX512-BF16), where bfloat16 is "
                             "emulated and slower than fp32: use precision=fp32, or force_bf16=true to run it anyway")
        return "note: precision=bf16 on a CPU without bfloat16 units (force_bf16=true): emulated, slower than fp32"
    if precision == "fp32" and units:
        return f"note: this CPU has bfloat16 units ({units}): precision=bf16 would be faster (README, 'Speed')"
    if precision == "fp16":
        return "note: precision=fp16 is for GPUs: on a CPU float16 is emulated and slower than fp32"
    return None


def check_precision(precision: str, force_bf16: bool = False, out=print) -> None:
    """Say (or refuse, see precision_note) what ``precision`` means on this machine; after
    start_tensorflow, which tells the GPUs."""
    import tensorflow as tf  # here: started by start_tensorflow, after this module's settings

    note = precision_note(precision, force_bf16, len(tf.config.list_physical_devices("GPU")))
    if note:
        out(note)


def choose_onednn(training: bool, smallest_batch: int, flags=None):
    """(use oneDNN?, why) for this process, or (None, why) to keep TensorFlow's own default.

    With AVX-512, oneDNN is the faster backend for training and inference; with AVX2 only, it
    is faster for training, but for a batch of ONE image oneDNN finds no optimised convolution
    for the large kernels of levels 1 and 0 and falls back to its ``ref:any`` loops, many
    times slower, so a process that runs single images (rendering, evaluation or training
    with batches of one) keeps TensorFlow's own kernels there (benchmarks/README.md,
    "Kernels").
    """
    flags = cpu_flags() if flags is None else flags
    if not flags:
        return None, "TensorFlow's default (CPU features unknown)"
    if _AVX512_CORE <= flags:
        return True, "AVX-512 CPU"
    if {"avx2", "fma"} <= flags:
        if training and smallest_batch >= 2:
            return True, "AVX2 CPU, training with batches of 2 or more"
        return False, "AVX2 CPU without AVX-512: oneDNN has no fast convolution for single images there"
    return False, "CPU without AVX2"


def select_cpu_kernels(training: bool, smallest_batch: int = 1, out=print) -> None:
    """Set TF_ENABLE_ONEDNN_OPTS for this process (a user's value wins) and say which kernels
    run, once. Must run before TensorFlow is imported: afterwards it does nothing (a caller in
    the same process, such as quickstart.py, made the choice)."""
    user = os.environ.get(ONEDNN_VARIABLE)
    if user is not None:
        choice, why = user.strip().lower() in ("1", "true", "yes", "on"), f"{ONEDNN_VARIABLE}={user}"
    elif tensorflow_started():
        return
    else:
        choice, why = choose_onednn(training, smallest_batch)
        if choice is not None:
            os.environ[ONEDNN_VARIABLE] = "1" if choice else "0"
    what = "TensorFlow's default" if choice is None else ("oneDNN" if choice else "TensorFlow's own (Eigen)")
    out(f"CPU kernels: {what} ({why})")


# ---------------------------------------------------------------------------------------
# Memory pages: glibc's malloc on transparent huge pages, chosen before the process starts

HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb"
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path=_THP_SETTING) -> str:
    """The kernel's transparent huge page mode (always, madvise or never); "" where unknown."""
    try:
        with open(path) as handle:
            text = handle.read()
    except OSError:
        return ""
    match = re.search(r"\[(\w+)\]", text)
    return match.group(1) if match else ""


def huge_pages_environment(environ=None, libc=None, thp=None):
    """The environment under which glibc's malloc backs its large blocks with transparent huge
    pages (GLIBC_TUNABLES=glibc.malloc.hugetlb=1), or None to leave the process as it is: not
    Linux with glibc 2.35 or later (older ones ignore the tunable), huge pages turned off in
    the kernel, or GLIBC_TUNABLES already naming the tunable (a user's value wins).

    Why: rendering in strips frees and allocates tens of GB of feature-map blocks, each one
    mapped afresh, and faulting them in 4 KiB pages is what made a 12 MP frame in strips
    slower than the whole frame (benchmarks/README.md, "Inference")."""
    environ = os.environ if environ is None else environ
    if libc is None:
        libc = platform.libc_ver() if sys.platform.startswith("linux") else ("", "")
    name, version = libc
    numbers = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if name != "glibc" or numbers < (2, 35):
        return None
    if (thp if thp is not None else thp_mode()) not in ("always", "madvise"):
        return None
    if HUGE_PAGES_TUNABLE in environ.get("GLIBC_TUNABLES", ""):
        return None
    return {**environ, "GLIBC_TUNABLES": tunables_with_huge_pages(1, environ)}


def tunables_with_huge_pages(value: int, environ=None) -> str:
    """GLIBC_TUNABLES of ``environ`` with glibc.malloc.hugetlb=``value`` added (the last wins)."""
    tunables = (os.environ if environ is None else environ).get("GLIBC_TUNABLES", "")
    return ":".join(filter(None, [tunables, f"{HUGE_PAGES_TUNABLE}={value}"]))


def run_with_huge_pages() -> None:
    """Start this script again, same interpreter and arguments, with glibc's malloc on huge
    pages where huge_pages_environment says so (glibc reads its tunables only at start-up);
    otherwise return. Call first thing in ``__main__``, before anything is printed."""
    environment = huge_pages_environment()
    if environment is None:
        return
    try:
        sys.stdout.flush()
        os.execve(sys.executable, list(getattr(sys, "orig_argv", [sys.executable] + sys.argv)), environment)
    except OSError:
        return  # no re-exec: the run goes on with 4 KiB pages


def huge_pages_note(environ=None) -> str:
    """One line saying whether malloc runs on huge pages in this process, for the scripts' log."""
    environ = os.environ if environ is None else environ
    match = re.search(rf"{re.escape(HUGE_PAGES_TUNABLE)}=(\d+)", environ.get("GLIBC_TUNABLES", ""))
    if match and match.group(1) != "0":
        return (f"Memory: malloc on transparent huge pages (GLIBC_TUNABLES={HUGE_PAGES_TUNABLE}="
                f"{match.group(1)}; {HUGE_PAGES_TUNABLE}=0 turns it off)")
    return "Memory: malloc on 4 KiB pages"


def configure_devices(use_gpu: bool) -> None:
    """Hide the GPUs when asked; must run before TensorFlow touches a device."""
    import tensorflow as tf  # here: after select_cpu_kernels, by this module's rule

    if not use_gpu:
        tf.config.set_visible_devices([], "GPU")


# ---------------------------------------------------------------------------------------
# memory of a rendering process

def bound_memory():
    """Where TensorFlow runs oneDNN kernels (its default on CPUs with AVX-512 VNNI), have them
    allocate through malloc rather than their own pool: the pool keeps the whole-frame peak
    of levels 2 to 5 for the rest of the run and fragments, where malloc on huge pages
    (run_with_huge_pages) is about as fast (benchmarks/README.md, "Inference"). Takes effect
    only before TensorFlow starts; a user's TF_ONEDNN_USE_SYSTEM_ALLOCATOR=0 wins."""
    os.environ.setdefault("TF_ONEDNN_USE_SYSTEM_ALLOCATOR", "1")


_MALLOC_SET = []


def return_freed_memory(threshold=1 << 20):
    """Have glibc serve blocks of ``threshold`` bytes and more from mmap, so they go back to the
    system when freed. By default glibc raises that threshold (up to 32 MiB) as large blocks
    are freed, then keeps the strips of feature maps in its heaps, where fragmentation holds
    freed memory in the process. test_model.py sets it before the checkpoint is restored when
    a frame will go in strips: restoring frees many large blocks, which raises the threshold,
    and the weights' copies would then sit in the heaps among the freed blocks. Not for small
    frames rendered whole: mmapping each of their maps afresh makes each photo slower. The
    figures: benchmarks/README.md, "Inference". Once per process; nothing where there is no
    glibc."""
    if _MALLOC_SET:
        return
    _MALLOC_SET.append(threshold)
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, int(threshold))  # M_MMAP_THRESHOLD (also stops its adjustment)
    except (OSError, AttributeError):
        pass


# ---------------------------------------------------------------------------------------
# work kept out of a process where TensorFlow runs

class HelperDied(Exception):
    """The helper process ended without answering (killed, out of memory...)."""


class CleanProcess:
    """Runs calls one at a time in a helper process started from a fresh interpreter
    (multiprocessing's spawn), where TensorFlow is never imported unless a call imports it.

    Why: work that forks (align.py's pool of workers) must not fork a process whose
    TensorFlow thread pools are running: a lock one of their threads holds at the fork stays
    locked forever in the child. The caller may then start TensorFlow whenever it likes
    (images.write_png does). The helper ignores Ctrl-C, which reaches the whole process group:
    the caller decides, and close(stop=True) ends the helper and its own children.

        with runtime.CleanProcess() as helper:
            value = helper.call(function, *args)  # a module-level function and picklable arguments
            helper.submit(function, *args)        # or: the call runs while this process works on,
            value = helper.result()               # and its value is collected later
    """

    def __init__(self):
        self._process = self._conn = None

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        self.close(stop=kind is not None)

    def call(self, function, *args):
        """Return ``function(*args)`` run in the helper (see result)."""
        self.submit(function, *args)
        return self.result()

    def submit(self, function, *args):
        """Start ``function(*args)`` in the helper; result() returns its value. One at a time."""
        if self._process is None:
            self._start()
        self._conn.send((function, args))

    def result(self):
        """The value of the call submitted; its exception is raised here, with the helper's
        traceback as a note; HelperDied if the helper ends without answering."""
        try:
            ok, value = self._conn.recv()
        except (EOFError, ConnectionResetError):
            self._process.join(5)
            code = self._process.exitcode
            self.close(stop=True)
            killed = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            raise HelperDied(f"the helper process ended without an answer ({killed}; out of memory?)") from None
        if ok:
            return value
        raise value

    def close(self, stop=False):
        """End the helper: let it finish (it waits for no more calls) or, with ``stop``, stop it now."""
        if self._process is None:
            return
        if not stop:
            try:
                self._conn.send(None)
            except OSError:
                stop = True
        if stop and self._process.is_alive():
            self._process.terminate()
        self._process.join(30)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._conn.close()
        self._process = self._conn = None

    def _start(self):
        context = multiprocessing.get_context("spawn")
        self._conn, theirs = context.Pipe()
        self._process = context.Process(target=_serve, args=(theirs,), name="clean helper")
        self._process.start()
        theirs.close()


def _serve(conn):
    """The helper's loop: run each call received and send back (ok, value or exception)."""
    def stop(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, stop)  # unwinds the call, so that a pool of workers it started is ended
    try:
        while True:
            task = conn.recv()
            if task is None:
                return
            function, args = task
            try:
                answer = (True, function(*args))
            except Exception as exc:
                exc.add_note(f"in the helper process:\n{traceback.format_exc().rstrip()}")
                try:
                    pickle.dumps(exc)
                except Exception:
                    exc = RuntimeError(f"{type(exc).__name__}: {exc}\n{traceback.format_exc().rstrip()}")
                answer = (False, exc)
            conn.send(answer)
    except (KeyboardInterrupt, EOFError, BrokenPipeError):
        return
