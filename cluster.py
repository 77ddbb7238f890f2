"""The tf.distribute strategy of a training run, and several workers (TF_CONFIG,
MultiWorkerMirroredStrategy): what train_model.py needs beyond TensorFlow's own strategies so
that a cluster's faults end in one line instead of a hang.

* ``make_strategy(name, devices, cluster_timeout)``: the tf.distribute strategy of train_model.py's
  ``strategy=`` (one device, mirrored, or multi-worker when TF_CONFIG names several tasks).
* ``read_tf_config()``: TF_CONFIG validated once (through TensorFlow's TFConfigClusterResolver),
  for every strategy; a bad one is a one-line UserError.
* ``wait_for_peers(cluster, timeout)``: every other task's port probed with plain sockets, in
  the main thread, before the strategy is created (whose own wait is silent, endless and deaf
  to SIGTERM), with a deadline.
* ``exchange(strategy, cluster, row)``: every task's row of numbers, gathered on every task
  by one all-reduce; the start-point agreement and the coordinated stop use it.
* ``start_row(args, start)`` / ``start_disagreement(rows, cluster, args)``: each task's start
  point (checkpoint files, settings) as numbers to exchange, and the one line saying how a
  task's start differs from the chief's.
* ``leave_together(strategy, cluster)``: the tasks' last meeting before they exit.
* ``lost_peer(exc, cluster, when)``: a collective that failed because a task went away, as one line.
* ``check_devices(devices)``: the ``devices=`` of a mirrored strategy, against the devices
  TensorFlow sees.
"""

import json
import os
import re
import signal
import socket
import sys
import time
import zlib

import numpy as np

import checkpoints
import files
from cli import UsageError, UserError

TASK_TYPES = ("chief", "worker")  # what MultiWorkerMirroredStrategy runs


class Task:
    def __init__(self, kind, index, address):
        self.kind, self.index, self.address = kind, index, address

    @property
    def name(self):
        return f"{self.kind} {self.index}" if self.kind == "worker" else self.kind

    def __repr__(self):
        return f"Task({self.kind!r}, {self.index}, {self.address!r})"


class Cluster:
    """The tasks of TF_CONFIG in a fixed order (the chief first, then the workers by index) and
    which one this process is."""

    def __init__(self, tasks, me):
        self.tasks, self.me = tasks, me

    @property
    def chief(self):
        return self.tasks[0]  # "chief" when there is one, else worker 0

    @property
    def is_chief(self):
        return self.me is self.chief

    def position(self, task=None):
        return self.tasks.index(task or self.me)

    def find(self, kind, index):
        for task in self.tasks:
            if task.kind == kind and task.index == index:
                return task
        return None

    def __len__(self):
        return len(self.tasks)


def _problem(text):
    return UserError(f"TF_CONFIG: {text}")


def task_count():
    """Number of tasks TF_CONFIG declares (0 when unset), without importing TensorFlow (the CPU
    kernels are chosen before it starts); a bad TF_CONFIG is the one-line UserError."""
    config = _checked_json()
    return 0 if config is None else sum(len(tasks) for tasks in config["cluster"].values())


def _checked_json():
    text = os.environ.get("TF_CONFIG")
    if not text or not text.strip():
        return None
    try:
        config = json.loads(text)
    except ValueError as err:
        raise _problem(f"not valid JSON ({err})") from None
    if not isinstance(config, dict) or not isinstance(config.get("cluster"), dict) or not config["cluster"]:
        raise _problem('expected a JSON object with "cluster" (e.g. {"worker": ["host1:port", "host2:port"]}) '
                       'and "task" ({"type": "worker", "index": 0})')
    for kind, addresses in config["cluster"].items():
        if kind not in TASK_TYPES:
            raise _problem(f"task type {kind!r} in the cluster: MultiWorkerMirroredStrategy takes "
                           f"{' and '.join(TASK_TYPES)} tasks only")
        if not isinstance(addresses, list) or not addresses:
            raise _problem(f"the cluster's {kind!r} entry must be a non-empty list of \"host:port\" addresses")
        for address in addresses:
            if not isinstance(address, str) or not re.fullmatch(r"\S+:\d{1,5}", address):
                raise _problem(f"{address!r} in the cluster's {kind!r} list is not a \"host:port\" address")
    if len(config["cluster"].get("chief", [])) > 1:
        raise _problem("the cluster has several chief tasks; one at most")
    return config


def read_tf_config():
    """The Cluster that TF_CONFIG describes, None when it is unset; a one-line UserError for
    anything MultiWorkerMirroredStrategy would choke on later with a traceback."""
    if _checked_json() is None:
        return None
    import tensorflow as tf  # here: train_model.py imports this module before TensorFlow starts

    # TensorFlow's own reading, so that what is accepted here is what the strategy will see
    try:
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        spec = resolver.cluster_spec().as_dict()
        kind, index = resolver.task_type, resolver.task_id
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise _problem(f"TensorFlow cannot read it ({err})") from None
    if kind is None:
        raise _problem('no "task": give this process\'s {"type": "worker", "index": ...}')
    if kind not in spec:
        raise _problem(f"task type {kind!r} is not in the cluster (it has {', '.join(sorted(spec))})")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(spec[kind]):
        raise _problem(f"task index {index!r} is out of range: the cluster has {len(spec[kind])} {kind} task(s), "
                       f"indices 0 to {len(spec[kind]) - 1}")
    tasks = [Task("chief", 0, spec["chief"][0])] if "chief" in spec else []
    tasks += [Task("worker", i, address) for i, address in enumerate(spec.get("worker", []))]
    me = next(t for t in tasks if t.kind == kind and t.index == index)
    return Cluster(tasks, me)


def multi_worker_cluster(strategy):
    """The TF_CONFIG cluster when ``strategy`` runs over several tasks, else None."""
    import tensorflow as tf  # here: train_model.py imports this module before TensorFlow starts

    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return None
    found = read_tf_config()
    return found if found is not None and len(found) > 1 else None


# ---------------------------------------------------------------------------------------
# the strategy

def is_chief() -> bool:
    """Whether this process writes the logs, results and checkpoints (multi-worker: the chief or
    worker 0 when there is no chief)."""
    found = read_tf_config()
    return found is None or found.is_chief


def make_strategy(name: str = "auto", devices: str = "", cluster_timeout: float = 180.0, out=print):
    """The tf.distribute strategy for ``strategy=``; must run before anything else touches TF.
    TF_CONFIG is checked whatever the strategy (a bad one is a one-line error), ``devices=``
    against the devices TensorFlow sees, and with several tasks the others are awaited for
    at most ``cluster_timeout`` seconds before the strategy (whose own wait has no end) starts."""
    import tensorflow as tf  # here: train_model.py imports this module before TensorFlow starts

    found = read_tf_config()
    if name == "auto":
        if found is not None and len(found) > 1:
            name = "multi_worker"
        elif len(tf.config.list_physical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            name = "one"
    if name == "multi_worker":
        if found is not None and len(found) > 1:
            wait_for_peers(found, cluster_timeout, out=out)
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "mirrored":
        chosen = check_devices(devices) if devices else None
        return tf.distribute.MirroredStrategy(devices=chosen)
    return tf.distribute.get_strategy()  # the default strategy: one device, no distribution


# ---------------------------------------------------------------------------------------
# waiting for the other tasks

class StoppedWaiting(UserError):
    exit_code = 130


def _answers(address, timeout=1.0):
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def _listen(address):
    """A plain listener on this task's own port, so that peers probing it before TensorFlow's
    server starts find it; closed before the strategy binds the port. A port already taken is
    the one-line error here rather than the strategy's traceback."""
    port = int(address.rsplit(":", 1)[1])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("", port))
        sock.listen(16)
    except OSError as err:
        sock.close()
        raise UserError(f"TF_CONFIG: this task's address {address} cannot be used here ({err.strerror}): is another "
                        f"process holding port {port}?") from None
    return sock


def wait_for_peers(cluster, timeout, out=print, poll=0.5):
    """Return once every other task's port answers; a one-line UserError after ``timeout``
    seconds, and a clean stop (exit 130) on Ctrl-C or SIGTERM meanwhile."""
    def on_signal(signum, frame):
        raise StoppedWaiting(f"stopped by {signal.Signals(signum).name} while waiting for the other tasks; "
                             f"nothing was written")

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    listener = _listen(cluster.me.address)
    try:
        pending = [t for t in cluster.tasks if t is not cluster.me]
        announced = set()
        deadline = time.monotonic() + timeout
        while True:
            pending = [t for t in pending if not _answers(t.address)]
            if not pending:
                return
            for task in pending:
                if task.name not in announced:
                    announced.add(task.name)
                    out(f"waiting for {task.name} at {task.address} (up to cluster_timeout={timeout:g} s)", flush=True)
            if time.monotonic() > deadline:
                task = pending[0]
                raise UserError(f"{task.name} at {task.address} did not answer within cluster_timeout={timeout:g} s: "
                                f"start it with its own TF_CONFIG, or check that address (host, port, firewall); "
                                f"nothing was written")
            time.sleep(poll)
    finally:
        listener.close()
        for s, handler in previous.items():
            signal.signal(s, handler)


# ---------------------------------------------------------------------------------------
# collectives

def exchange(strategy, cluster, row):
    """Every task's ``row`` (numbers), as a (tasks x len(row)) float64 array on every task.

    One all-reduce (sum) of a matrix in which each task fills its own row from its first
    local replica and zeros elsewhere: the rows arrive exactly (float64 holds the 32-bit
    checksums and iteration counts put into them)."""
    import tensorflow as tf  # here: train_model.py imports this module before TensorFlow starts

    matrix = np.zeros((len(cluster), len(row)), np.float64)
    matrix[cluster.position()] = row
    calls = []

    def per_replica(context):
        calls.append(context)
        return tf.constant(matrix if len(calls) == 1 else np.zeros_like(matrix))

    values = strategy.experimental_distribute_values_from_function(per_replica)
    total = getattr(strategy, "_pynet_exchange", None)
    if total is None:  # one function per strategy: called at every step, it must not be traced again
        @tf.function
        def total(values):
            return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(tf.identity, args=(values,)), axis=None)

        strategy._pynet_exchange = total
    return total(values).numpy()


def leave_together(strategy, cluster):
    """Meet every task, then silence TensorFlow's native logs (sys.stderr keeps the terminal)
    and meet again. The task that exits last finds the other's end of the coordination
    service gone and TensorFlow logs connection errors at its exit, after the run's last
    line, which they would bury; past the second meeting every task is silenced."""
    exchange(strategy, cluster, [0])
    sys.stderr.flush()
    original = os.dup(sys.stderr.fileno())
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())
    sys.stderr = os.fdopen(original, "w", buffering=1)
    exchange(strategy, cluster, [0])


_TASK_IN_MESSAGE = re.compile(r"/job:(\w+)/replica:\d+/task:(\d+)")
LOST_PEER_ERRORS = ("UnavailableError", "AbortedError", "CancelledError", "DeadlineExceededError", "InternalError")


def lost_peer(exc, cluster, when):
    """The one line for a collective that failed because another task went away (it was
    stopped, crashed or lost the network), or None when ``exc`` is something else."""
    if cluster is None or len(cluster) < 2 or type(exc).__name__ not in LOST_PEER_ERRORS:
        return None
    text = getattr(exc, "message", None) or str(exc)
    others = [cluster.find(k, int(i)) for k, i in _TASK_IN_MESSAGE.findall(text)]
    others = [t for t in others if t is not None and t is not cluster.me]
    who = f"{others[0].name} ({others[0].address})" if others else "another task"
    reason = "it stopped sending heartbeats" if "heartbeat" in text else type(exc).__name__
    return (f"{who} went away {when} ({reason}): stopping this task too; once every task runs again, "
            f"continue with resume=true")


# ---------------------------------------------------------------------------------------
# one start point for every task

START_KINDS = {"scratch": 0, "handover": 1, "resume": 2, "init_from": 3}
# arguments that may differ between tasks (paths on each machine, display); all others must agree.
# init_from's checkpoint is compared by its checksum in the start row, wherever each task has it.
LOCAL_ARGUMENTS = {"models_dir", "results_dir", "dataset_dir", "vgg_dir", "init_from", "progress", "tensorboard",
                   "cluster_timeout", "force_bf16"}


def _crc_of_file(path):
    return zlib.crc32(files.read_bytes(path)) if files.exists(path) else 0


def start_row(args, start):
    """A task's start point as numbers: [ready, kind, source level, source iteration, checksum of the
    checkpoint's index (which holds every tensor's checksum: the level above's, init_from's or
    the resumed one), of its training state's index, of the settings]. ``start`` None: this
    task failed before it could decide."""
    settings = json.dumps({k: v for k, v in args.items() if k not in LOCAL_ARGUMENTS}, sort_keys=True, default=str)
    if start is None:
        return [0, -1, -1, -1, 0, 0, zlib.crc32(settings.encode())]
    named = checkpoints.parse_checkpoint_prefix(start.prefix) if start.prefix else None
    level, iteration = named or (args["level"], -1)  # init_from's may be named otherwise
    state = _crc_of_file(checkpoints.state_prefix(start.prefix) + ".index") if start.kind == "resume" else 0
    model = _crc_of_file(start.prefix + ".index") if start.prefix else 0
    return [1, START_KINDS[start.kind], level, iteration, model, state, zlib.crc32(settings.encode())]


def describe_start(row, level):
    kind = {v: k for k, v in START_KINDS.items()}.get(int(row[1]))
    if kind == "scratch":
        return f"level {level} from scratch"
    if kind == "handover":
        return f"level {level} from level {int(row[2])}'s iteration {int(row[3])}"
    if kind == "init_from":
        return f"level {level} from the checkpoint of init_from"
    return f"resuming level {level} after iteration {int(row[3])}"


def start_disagreement(rows, cluster, args):
    """The one line saying how this task's start differs from the chief's, or None."""
    mine, chief = rows[cluster.position()], rows[cluster.position(cluster.chief)]
    others = [t for t in cluster.tasks if t is not cluster.me]
    failed = [t for t in others if rows[cluster.position(t)][0] == 0]
    if failed:
        return f"{failed[0].name} ({failed[0].address}) stopped with an error before training (see its output): " \
               f"no task trains"
    level, contract = args["level"], ("every task must see the chief's checkpoints: one shared models_dir, or the "
                                      "chief's checkpoint files copied into each task's models_dir (README, "
                                      "'Several machines')")
    if cluster.is_chief:
        differing = [t for t in others if list(rows[cluster.position(t)]) != list(chief)]
        if not differing:
            return None
        task = differing[0]
        theirs = rows[cluster.position(task)]
        if theirs[6] != chief[6]:
            return f"{task.name} ({task.address}) was started with other arguments than the chief: give every " \
                   f"task the same ones (only paths, progress and tensorboard may differ)"
        what = "holds other checkpoint files for it" if theirs[1:4].tolist() == chief[1:4].tolist() \
            else f"would start {describe_start(theirs, level)}"
        return f"{task.name} ({task.address}) {what}, while the chief starts {describe_start(chief, level)} " \
               f"from models_dir={args['models_dir']}: {contract}"
    if list(mine) == list(chief):
        return None
    if mine[6] != chief[6]:
        return f"this task ({cluster.me.name}) was started with other arguments than the chief " \
               f"({cluster.chief.name}): give every task the same ones (only paths, progress and tensorboard " \
               f"may differ)"
    found = describe_start(mine, level)
    if mine[1:4].tolist() == chief[1:4].tolist():
        found += ", but its checkpoint files differ from the chief's"
    return f"{cluster.me.name}: models_dir={args['models_dir']} gives {found}, the chief ({cluster.chief.name}) " \
           f"starts {describe_start(chief, level)}: {contract}"


# ---------------------------------------------------------------------------------------
# devices of a mirrored strategy

def check_devices(devices: str):
    """The device names of ``devices=``, each one TensorFlow sees here, none twice; a one-line
    UsageError otherwise (an unknown device makes MirroredStrategy count a replica it then
    waits for forever)."""
    import tensorflow as tf  # here: train_model.py imports this module before TensorFlow starts

    names = [d.strip() for d in devices.split(",") if d.strip()]
    seen = {}
    for device in tf.config.list_logical_devices():
        spec = tf.DeviceSpec.from_string(device.name)
        seen[(spec.device_type.upper(), spec.device_index)] = device.name
    visible = ", ".join(f"/{kind.lower()}:{index}" for kind, index in sorted(seen))
    keys = []
    for name in names:
        try:
            spec = tf.DeviceSpec.from_string(name)
        except ValueError:
            spec = None
        key = (spec.device_type.upper(), spec.device_index if spec.device_index is not None else 0) \
            if spec is not None and spec.device_type else None
        if key not in seen:
            raise UsageError(f"devices={devices}: {name} is not a device TensorFlow sees here (it sees {visible})")
        if key in keys:
            raise UsageError(f"devices={devices}: {name} is given twice")
        keys.append(key)
    return names
