"""Test setup: 4 fake CPU devices (set before JAX starts) and shared helpers."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from official_weights import synthetic_state_dict  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def load_official_fixture(name):
    """(fixture arrays, synthetic official state_dict) for 'resnet18' or 'wrn16_2'."""
    arrays = dict(np.load(os.path.join(FIXTURES, f"official_{name}_fpcm.npz")))
    shapes = {key: tuple(shape) for key, shape in json.loads(str(arrays["keys_json"])).items()}
    return arrays, synthetic_state_dict(shapes)


@pytest.fixture(scope="session")
def official_resnet18():
    return load_official_fixture("resnet18")


@pytest.fixture(scope="session")
def official_wrn16_2():
    return load_official_fixture("wrn16_2")
