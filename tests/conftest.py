"""Shared fixtures. Building the full 47.5M-parameter PyNET takes ~10 s here, so one
instance serves every test of a session; a test that changes its weights takes it as
``model``, which puts them back."""

import os
import shutil
import sys

import pytest

from helpers import ROOT

# the one place the repository's modules are put on the path (a subprocess gets PYTHONPATH)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TSV_PATH = os.path.join(ROOT, "tests", "data", "pynet_tf1_variables.tsv")


# The suite's longest tests, started first so that the other worker runs the rest beside them.
FIRST = ("test_quickstart.py", "test_export.py")


def pytest_collection_modifyitems(config, items):
    """Long tests run only when asked for (python -m pytest -m long tests), so that the default
    suite, which CI runs, stays within its time."""
    items.sort(key=lambda item: item.path.name not in FIRST)   # stable: the order within each part stays
    if "long" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="long: run with python -m pytest -m long tests")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def pynet_as_built():
    """The session's full PyNET and a copy of its weights as built."""
    from model import PyNET

    model = PyNET()
    return model, [v.numpy() for v in model.weights]


@pytest.fixture(scope="session")
def full_model(pynet_as_built):
    """The full PyNET (all levels), as every script builds it. Do not leave its weights changed."""
    return pynet_as_built[0]


@pytest.fixture(scope="session")
def built_weights(pynet_as_built):
    """The full PyNET's weights as built (model.set_weights takes them)."""
    return pynet_as_built[1]


@pytest.fixture
def model(pynet_as_built):
    """The shared full PyNET at its weights as built, for a test that trains it or changes
    them: they are put back afterwards."""
    model, built = pynet_as_built
    model.set_weights(built)
    yield model
    model.set_weights(built)


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


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory):
    """``module_tmp(name)``: a new folder for a module's fixtures, removed once the module's
    tests are done. Module fixtures hold full-model checkpoints (190 MB of weights, 570 MB with
    a training state); kept to the end of the session, as tmp_path_factory keeps them, a run
    held 24 GB of them and filled CI's disk."""
    made = []

    def make(name):
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


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
