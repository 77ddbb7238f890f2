"""Shared fixtures. Building the full 47.5M-parameter PyNET takes ~10 s here, so one
instance serves every test of a session; tests that change its weights restore them."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TSV_PATH = os.path.join(ROOT, "tests", "data", "pynet_tf1_variables.tsv")


def pytest_collection_modifyitems(config, items):
    """Long tests run only when asked for (python -m pytest -m long tests), so that the default
    suite, which CI runs, stays within its time."""
    if "long" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="long: run with python -m pytest -m long tests")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def full_model():
    """The full PyNET (all levels), as every script builds it. Do not leave its weights changed."""
    from model import PyNET

    return PyNET()


@pytest.fixture(scope="session")
def reference_variables():
    """The reference's 437 checkpoint variables: [(key, shape list, layer, role)] in creation order."""
    rows = []
    with open(TSV_PATH) as handle:
        next(handle)
        for line in handle:
            key, shape, layer, role, _ = line.rstrip("\n").split("\t")
            rows.append((key, [int(d) for d in shape.strip("[]").split(",")], layer, role))
    return rows


def write_tf1_checkpoint(prefix, arrays):
    """Write ``{key: ndarray}`` with TF1's own Saver in a TF1 graph, as the reference did."""
    import tensorflow as tf

    graph = tf.Graph()
    with graph.as_default():
        variables = {key: tf.compat.v1.Variable(value, name=key.replace("/", "_")) for key, value in arrays.items()}
        saver = tf.compat.v1.train.Saver(var_list=variables)
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            saver.save(session, prefix, write_meta_graph=False, write_state=False)
    return prefix


# ---------------------------------------------------------------------------------------
# data fixtures: small datasets in the ZRR layout, written to tmp dirs

@pytest.fixture(scope="session")
def sample_dataset(tmp_path_factory):
    """A tiny synthetic dataset made by make_sample_dataset.py (8 train, 3 test, 1 full-res 64x96).
    Read-only: tests that change files must make their own."""
    import make_sample_dataset

    root = str(tmp_path_factory.mktemp("sample") / "raw_images")
    make_sample_dataset.build(root, train=8, test=3, full=1, full_height=64, full_width=96, seed=1,
                              progress=False)
    return root
