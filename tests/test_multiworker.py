"""Several tasks (TF_CONFIG): worker processes on 127.0.0.1 with separate folders, a missing
peer, a stop on one worker; devices= and TF_CONFIG checks; each worker decoding only its share
of the data; the train -> render -> evaluate path on TensorFlow's in-memory filesystem (ram://),
the stand-in for gs:// and other shared stores.

What runs in processes uses the full PyNET at level 5 on 32x32 packed crops of the session's
sample dataset; the processes of a test run side by side.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import checkpoints
import cli
import cluster as cluster_module
import resume
import train_model
import trainer
from helpers import ROOT

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
ENV.pop("TF_CONFIG", None)


def free_ports(count):
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def tf_config(ports, index):
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                       "task": {"type": "worker", "index": index}})


def start_worker(ports, index, argv, tmp, models=None):
    """A train_model.py process as worker ``index``, with folders of its own (tmp/w{i}, tmp/r{i})
    unless ``models`` names a shared models_dir."""
    env = {**ENV, "TF_CONFIG": tf_config(ports, index)}
    folders = [f"models_dir={models or tmp / f'w{index}'}", f"results_dir={tmp / f'r{index}'}"]
    return subprocess.Popen([sys.executable, "train_model.py", "strategy=multi_worker", "progress=false",
                             "tensorboard=false"] + folders + argv,
                            env=env, cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(procs, timeout=400):
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return outputs


def last_line(err):
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err[-3000:]
    return lines[-1] if lines else ""


def common(data):
    return [f"dataset_dir={data}", "level=5", "patch_size=32", "batch_size=2"]


def fake_checkpoint(models, level, iteration, content=b"index"):
    """Files named as a checkpoint with its training state (never read: the start is compared first)."""
    models.mkdir(parents=True, exist_ok=True)
    for suffix in ("", ".train_state"):
        for ext in (".index", ".data-00000-of-00001"):
            (models / f"pynet_level_{level}_iteration_{iteration}.ckpt{suffix}{ext}").write_bytes(content)


# ---------------------------------------------------------------------------------------
# (1) every task starts where the chief starts

@pytest.mark.slow
def test_separate_folders_that_disagree_are_refused_by_every_worker(sample_dataset, tmp_path):
    """resume=true with a models_dir per machine: worker 0's folder holds a checkpoint to resume,
    worker 1's none (it would start from scratch); then both hold iteration 3 but different
    files. Every worker stops with one line before anything is written."""
    fake_checkpoint(tmp_path / "w0", 5, 3)
    argv = common(sample_dataset) + ["resume=true", "num_train_iters=5"]
    ports = free_ports(2)
    outputs = finish([start_worker(ports, i, argv, tmp_path) for i in range(2)])
    (out0, err0), (out1, err1) = outputs
    chief, other = last_line(err0), last_line(err1)
    assert other.startswith("error: worker 1: ") and f"models_dir={tmp_path / 'w1'}" in other, err1[-2000:]
    assert "level 5 from scratch" in other and "resuming level 5 after iteration 3" in other
    assert chief.startswith(f"error: worker 1 (127.0.0.1:{ports[1]}) would start level 5 from scratch"), err0[-2000:]
    assert "every task must see the chief's checkpoints" in chief
    assert sorted(os.listdir(tmp_path / "w0")) == sorted(  # nothing written: no logs.txt, no results
        f"pynet_level_5_iteration_3.ckpt{s}{e}" for s in ("", ".train_state")
        for e in (".index", ".data-00000-of-00001"))
    assert not (tmp_path / "w1").exists() and not (tmp_path / "r0").exists() and not (tmp_path / "r1").exists()

    # the same iteration, other files: still refused
    fake_checkpoint(tmp_path / "w1", 5, 3, content=b"another run's index")
    ports = free_ports(2)
    procs = [start_worker(ports, i, argv, tmp_path) for i in range(2)]
    codes = [p.wait(timeout=400) for p in procs]
    (_, err0), (_, err1) = [(p.stdout.read(), p.stderr.read()) for p in procs]
    assert codes == [1, 1]
    assert "checkpoint files differ from the chief's" in last_line(err1)
    assert "holds other checkpoint files" in last_line(err0)
    assert [p.returncode for p in procs] == [1, 1]


# ---------------------------------------------------------------------------------------
# (2) a missing peer

@pytest.mark.slow
def test_missing_peer_is_announced_and_ends_in_one_line(sample_dataset, tmp_path):
    """Worker 0 alone in a two-worker cluster: it says whom it waits for, gives up after
    cluster_timeout with one line, and a SIGTERM meanwhile stops it at once."""
    ports = free_ports(2)
    argv = common(sample_dataset) + ["num_train_iters=1"]
    started = time.monotonic()
    timed = start_worker(ports, 0, argv + ["cluster_timeout=4"], tmp_path)
    ports2 = free_ports(2)
    signalled = start_worker(ports2, 0, argv + ["cluster_timeout=600"], tmp_path / "b")
    for line in signalled.stdout:
        if line.startswith("waiting for worker 1"):
            break
    signalled.send_signal(signal.SIGTERM)
    (out, err), (out2, err2) = finish([timed, signalled], timeout=120)
    assert timed.returncode == 1 and time.monotonic() - started < 120
    assert f"waiting for worker 1 at 127.0.0.1:{ports[1]}" in out
    assert last_line(err) == (f"error: worker 1 at 127.0.0.1:{ports[1]} did not answer within cluster_timeout=4 s: "
                              f"start it with its own TF_CONFIG, or check that address (host, port, firewall); "
                              f"nothing was written")
    assert signalled.returncode == 130
    assert last_line(err2).startswith("error: stopped by SIGTERM while waiting for the other tasks")
    assert not (tmp_path / "w0").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_a_peer_that_goes_away_ends_the_other_in_one_line(sample_dataset, tmp_path):
    """Worker 1 killed once the cluster has formed: worker 0, waiting in a collective, stops
    with one line naming it (TensorFlow's heartbeats find it gone) and writes nothing."""
    ports = free_ports(2)
    argv = common(sample_dataset) + ["num_train_iters=1"]
    procs = [start_worker(ports, i, argv, tmp_path) for i in range(2)]
    for line in procs[1].stdout:
        if line.startswith("strategy: "):
            break
    procs[1].kill()
    (out0, err0), _ = finish(procs, timeout=120)
    assert procs[0].returncode == 1, err0[-3000:]
    assert last_line(err0) == (f"error: worker 1 (127.0.0.1:{ports[1]}) went away before training (it stopped "
                               f"sending heartbeats): stopping this task too; once every task runs again, continue "
                               f"with resume=true")
    assert not (tmp_path / "w0").exists() and not (tmp_path / "r0").exists()


# ---------------------------------------------------------------------------------------
# (5) stopping one worker

@pytest.mark.slow
def test_sigterm_to_one_worker_stops_both_and_the_chief_saves(sample_dataset, tmp_path):
    """SIGTERM to worker 1 once training runs: both stop after the same iteration, the chief
    saves it, worker 1 writes nothing and names no file it did not write."""
    argv = common(sample_dataset) + ["num_train_iters=100000", "eval_step=100000"]
    ports = free_ports(2)
    procs = [start_worker(ports, i, argv, tmp_path) for i in range(2)]
    index0 = checkpoints.checkpoint_prefix(str(tmp_path / "w0"), 5, 0) + ".index"
    deadline = time.monotonic() + 400
    while not os.path.exists(index0) and time.monotonic() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.2)
    time.sleep(1)
    procs[1].send_signal(signal.SIGTERM)
    (out0, err0), (out1, err1) = finish(procs)
    assert [p.returncode for p in procs] == [130, 130], (err0[-2000:], err1[-2000:])
    last = checkpoints.get_last_iter(5, str(tmp_path / "w0"))
    assert last is not None and last >= 1
    assert last in resume.resumable_iterations(str(tmp_path / "w0"), 5)
    saved = checkpoints.checkpoint_prefix(str(tmp_path / "w0"), 5, last)
    assert last_line(err0) == (f"error: stopped by SIGTERM on worker 1 after iteration {last} of level 5; saved "
                               f"{saved}: continue with resume=true")
    assert last_line(err1) == (f"error: stopped by SIGTERM on worker 1 after iteration {last} of level 5; the chief "
                               f"(worker 0) saved iteration {last} in its models_dir: continue with resume=true")
    assert not (tmp_path / "w1").exists() and not (tmp_path / "r1").exists()


def test_one_process_coordinates_with_itself(monkeypatch):
    """The trainer's coordinator outside a multi-worker strategy: each agreement is a no-op."""
    import tensorflow as tf

    import coordination

    monkeypatch.delenv("TF_CONFIG", raising=False)
    solo = coordination.coordinator(tf.distribute.get_strategy())
    assert isinstance(solo, coordination.Solo) and solo.chief and solo.tasks == 1
    prepared = []
    solo.agree_on_start(lambda: prepared.append("checked"), {})
    assert prepared == ["checked"]
    assert solo.agreed_stop(None) is None and solo.agreed_stop("SIGTERM") == "SIGTERM"
    solo.barrier("after iteration 3")
    with pytest.raises(RuntimeError, match="^as raised$"), solo.lost_peer("during iteration 3"):
        raise RuntimeError("as raised")
    # a task of a TF_CONFIG cluster outside the multi-worker strategy writes nothing
    monkeypatch.setenv("TF_CONFIG", tf_config([1, 2], 1))
    solo = coordination.coordinator(tf.distribute.get_strategy())
    assert isinstance(solo, coordination.Solo) and not solo.chief and solo.chief_name == "worker 0"


# ---------------------------------------------------------------------------------------
# (3), (4) devices= and TF_CONFIG, checked before anything starts

def cli_error(argv, capsys):
    code = cli.run(train_model.main, [str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def test_devices_must_be_ones_tensorflow_sees(capsys, sample_dataset, tmp_path):
    import tensorflow as tf

    # a run whose files pass the checks made before TensorFlow starts
    run = [f"dataset_dir={sample_dataset}", "level=5", "patch_size=32", "batch_size=2", f"models_dir={tmp_path}",
           f"results_dir={tmp_path / 'results'}"]
    count = len(tf.config.list_logical_devices("CPU"))
    code, err = cli_error(["strategy=mirrored", f"devices=/cpu:0,/cpu:{count}"] + run, capsys)
    assert code == 2 and err == [f"error: devices=/cpu:0,/cpu:{count}: /cpu:{count} is not a device TensorFlow "
                                 f"sees here (it sees /cpu:0)"]
    code, err = cli_error(["strategy=mirrored", "devices=/cpu:0,/device:CPU:0"] + run, capsys)
    assert code == 2 and err == ["error: devices=/cpu:0,/device:CPU:0: /device:CPU:0 is given twice"]
    assert cluster_module.make_strategy("mirrored", "/cpu:0").num_replicas_in_sync == 1


@pytest.mark.parametrize("strategy", ["multi_worker", "one", "auto"])
@pytest.mark.parametrize("config, text", [
    ("{bad json", "TF_CONFIG: not valid JSON (Expecting property name enclosed in double quotes"),
    ('{"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": "worker", "index": 2}}',
     "TF_CONFIG: task index 2 is out of range: the cluster has 2 worker task(s), indices 0 to 1"),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "chief", "index": 0}}',
     "TF_CONFIG: task type 'chief' is not in the cluster (it has worker)"),
    ('{"cluster": {"worker": "127.0.0.1:1"}, "task": {"type": "worker", "index": 0}}',
     "TF_CONFIG: the cluster's 'worker' entry must be a non-empty list"),
    ('{"cluster": {"ps": ["127.0.0.1:1"]}, "task": {"type": "ps", "index": 0}}', "TF_CONFIG: task type 'ps'"),
    ('{"cluster": {"worker": ["nohost"]}, "task": {"type": "worker", "index": 0}}',
     "TF_CONFIG: 'nohost' in the cluster's 'worker' list is not a \"host:port\" address"),
    ('[1, 2]', 'TF_CONFIG: expected a JSON object with "cluster"'),
])
def test_tf_config_is_checked_for_every_strategy(config, text, strategy, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("TF_CONFIG", config)
    code, err = cli_error([f"strategy={strategy}", f"models_dir={tmp_path}"], capsys)
    assert code == 1 and len(err) == 1 and err[0].startswith("error: " + text), err


# ---------------------------------------------------------------------------------------
# (6) each worker decodes its own share

def test_each_input_pipeline_decodes_only_its_share(sample_dataset, monkeypatch):
    """Two input pipelines (two workers) with accumulation: each reads only its half of every
    micro-batch; side by side they give the samples of the one-device stream, in its order."""
    import data_pipeline
    import load_dataset

    decoded = {}
    real = data_pipeline.load_pair
    # each pipeline reads the dataset under its own spelling of the folder, so that a decode
    # is counted for the pipeline that asked for it, whichever thread runs it
    spelling = {"one": sample_dataset, 0: sample_dataset + "/", 1: sample_dataset + "//"}
    owner = {text: key for key, text in spelling.items()}

    def counting(dataset_dir, split, index, level, patch, k, flip, offset):
        decoded.setdefault(owner[dataset_dir], []).append((int(index), int(k), int(flip), *map(int, offset)))
        return real(dataset_dir, split, index, level, patch, k, flip, offset)

    monkeypatch.setattr(data_pipeline, "load_pair", counting)
    steps, streams = 3, {}
    for key, shard in (("one", (0, 1)), (0, (0, 2)), (1, (1, 2))):
        args = train_model.parse_arguments([f"dataset_dir={spelling[key]}", "level=5", "patch_size=32",
                                            "batch_size=8", "accum_steps=2", "train_size=6", "refresh_every=2"])
        ds, _ = trainer.train_data(args, start_step=2, shard=shard)
        streams[key] = [(raw.numpy(), target.numpy()) for raw, target in ds.take(steps * 2)]
    for m in range(steps * 2):  # micro-batch m of one device = worker 0's part, then worker 1's
        one_raw, one_target = streams["one"][m]
        assert one_raw.shape[0] == 4 and streams[0][m][0].shape[0] == 2
        np.testing.assert_array_equal(np.concatenate([streams[0][m][0], streams[1][m][0]]), one_raw)
        np.testing.assert_array_equal(np.concatenate([streams[0][m][1], streams[1][m][1]]), one_target)
    # the plan, computed independently: steps 2.. of 8 samples, micro-batches of 4, halves of 2
    plan = data_pipeline.train_plan(load_dataset.check_dataset(sample_dataset, "train", verbose=False), 8, 6,
                                   False, 32, 5, 0, 2)
    samples = [tuple(int(v) for v in next(plan)) for _ in range(8 * (2 + steps + 4))][16:]
    micro = [samples[i: i + 4] for i in range(0, len(samples), 4)]
    for worker in (0, 1):
        mine = [s for m in micro for s in m[worker * 2: worker * 2 + 2]]
        theirs = [s for m in micro for s in m[(1 - worker) * 2: (1 - worker) * 2 + 2]]
        got = decoded[worker]
        assert sorted(got[: steps * 4]) == sorted(mine[: steps * 4])  # its share of the steps taken
        assert got == mine[: len(got)] or sorted(got) == sorted(mine[: len(got)])  # read-ahead: still its own
        assert len(got) < len(decoded["one"]) and not set(got) & (set(theirs) - set(mine))


# ---------------------------------------------------------------------------------------
# (7) shared storage: train -> render -> evaluate on ram://

def copy_tree(source, target):
    import tensorflow as tf

    for folder, _, files in os.walk(source):
        dest = target + folder[len(source):].replace(os.sep, "/")
        tf.io.gfile.makedirs(dest)
        for name in files:
            tf.io.gfile.copy(os.path.join(folder, name), f"{dest}/{name}", overwrite=True)


@pytest.mark.slow
def test_train_render_evaluate_on_an_in_memory_filesystem(sample_dataset, model, capsys):
    import tensorflow as tf

    import evaluate_accuracy
    import test_model

    root = f"ram://pynet-{os.getpid()}"
    copy_tree(sample_dataset, f"{root}/data")
    args = train_model.parse_arguments([f"dataset_dir={root}/data", "level=5", "patch_size=32", "batch_size=2",
                                        "num_train_iters=2", "eval_step=2", f"models_dir={root}/models",
                                        f"results_dir={root}/results", "progress=false"])
    last = trainer.Trainer(args, model=model, out=lambda *a: None).run()
    trained = [np.array(w) for w in model.get_weights()]
    assert last == f"{root}/models/pynet_level_5_iteration_2.ckpt"
    models = sorted(tf.io.gfile.listdir(f"{root}/models"))
    assert {"logs.txt", "pynet_level_5_iteration_2.ckpt.index", "pynet_level_5_iteration_0.ckpt.index",
            "pynet_level_5_iteration_2.ckpt.train_state.index", "tensorboard"} <= {m.rstrip("/") for m in models}
    assert not [m for m in models if ".tmp" in m]  # written under temporary names, then renamed
    assert len(tf.io.gfile.GFile(f"{root}/models/logs.txt").read().splitlines()) == 2
    assert len(tf.io.gfile.listdir(f"{root}/results")) == 8  # 4 visual results x 2 evaluations
    # what was written is what was trained: read back from ram://
    reader = tf.compat.v1.train.NewCheckpointReader(last)
    from checkpoints import tf1_variables

    key, variable, _ = next(e for e in tf1_variables(model) if e[1].trainable and "conv_l5" in e[1].path)
    index = [v.path for v in model.weights].index(variable.path)
    np.testing.assert_array_equal(reader.get_tensor(key), trained[index])

    capsys.readouterr()
    code = cli.run(test_model.main, ["level=5", f"models_dir={root}/models", f"dataset_dir={root}/data",
                                       f"output_dir={root}/out"])
    assert code == 0, capsys.readouterr().err
    rendered = tf.io.gfile.listdir(f"{root}/out")
    assert [n for n in rendered if n.endswith("_level_5_iteration_2.png")] and not [n for n in rendered if ".tmp" in n]
    image = tf.io.decode_png(tf.io.gfile.GFile(f"{root}/out/{rendered[0]}", "rb").read())
    assert image.shape == (2, 3, 3)  # a 64x96 mosaic at level 5: 1/32 of its side

    code = cli.run(evaluate_accuracy.main, ["level=5", "restore_iter=2", f"models_dir={root}/models",
                                              f"dataset_dir={root}/data", f"csv={root}/scores.csv"])
    out = capsys.readouterr().out
    assert code == 0 and "3 test patches" in out and "PSNR" in out
    assert len(tf.io.gfile.GFile(f"{root}/scores.csv").read().splitlines()) == 4
    tf.io.gfile.rmtree(root)
