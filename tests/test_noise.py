"""tasks/noise.py drops exactly the known third-party messages and nothing else."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests._repo import REPO

SCRIPT = """
import sys
if sys.argv[1] == "silenced":
    from tasks.noise import silence_known_noise
    silence_known_noise()
import logging
import coremltools  # noqa: F401  (prints the proxy and version lines on import)
from monai import transforms as mt
mt.LoadImaged(keys="image", reader="NumpyReader", image_only=True)  # probes nvImageCodec
logging.getLogger("coremltools").warning("a coremltools warning medpipe has not seen before")
import warnings
warnings.warn("a user warning medpipe has not seen before", UserWarning)
"""

NOISE = ("Failed to load _MLModelProxy", "has not been tested with coremltools", "Disabling scikit-learn conversion",
         "nvImageCodec is not available", "nvImageCodec decoder plugin did not register")  # fmt: skip
REAL = ("a coremltools warning medpipe has not seen before", "a user warning medpipe has not seen before")


@pytest.fixture(scope="module")
def outputs() -> dict[str, str]:
    out = {}
    for mode in ("plain", "silenced"):
        res = subprocess.run([sys.executable, "-c", SCRIPT, mode], cwd=REPO, capture_output=True, text=True,
                             timeout=300)  # fmt: skip
        assert res.returncode == 0, res.stderr
        out[mode] = res.stdout + res.stderr
    return out


@pytest.mark.parametrize("message", NOISE)
def test_known_noise_is_dropped(outputs: dict[str, str], message: str) -> None:
    # the library still prints it (else the filter is stale and should go), and the filter drops it
    assert message in outputs["plain"]
    assert message not in outputs["silenced"]


@pytest.mark.parametrize("message", REAL)
def test_other_warnings_still_show(outputs: dict[str, str], message: str) -> None:
    assert message in outputs["silenced"]
