import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/oracle.py

import weightablate  # noqa: E402

CPU_BUILT = "cpu" in weightablate.ops.compiled_backends()
# Every closed-form backend this build can run here; the CPU kernel must be built for the suite.
BACKENDS = ["cpu", "torch"]


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="no CUDA device")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _require_kernel():
    # A missing build must fail the suite, not silently test the reference twice.
    assert CPU_BUILT, "weightablate._C is not built: pip install --no-build-isolation -e ."
