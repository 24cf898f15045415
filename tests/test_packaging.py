"""`python -m build` makes an sdist and a wheel (built from that sdist) without warnings from our configuration, and
the wheel installs cleanly into a fresh venv with the browser page and the bundled sample in it.

Offline: the build runs without isolation (this environment's setuptools) and the install takes only the wheel
(--no-deps --no-index), so nothing is downloaded."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGE = ("index.html", "app.js", "worklet.js", "client.js", "protocol.js", "capture.js")

setuptools = pytest.importorskip("setuptools")
pytest.importorskip("build")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(int(setuptools.__version__.split(".")[0]) < 77, reason="needs setuptools >= 77 (pyproject)"),
]

# Lines that mention a warning but come from the environment, not from our configuration.
_NOT_OURS = ("byte-compiling is disabled",)


def _warnings(text: str) -> list[str]:
    return [line for line in text.splitlines() if "warning" in line.lower() and not any(n in line for n in _NOT_OURS)]


def _run(argv, **kw):
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, **kw)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """The sdist and wheel of a copy of this checkout (the build writes egg-info and build/ next to the sources)."""
    tmp = tmp_path_factory.mktemp("pkg")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "venv", "out", "build", "dist",
                                                             "*.egg-info", "__pycache__", ".pytest_cache", "node_modules",
                                                             ".hypothesis", ".whl"))  # fmt: skip
    log = _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp / "dist"), str(src)])
    return tmp / "dist", log


def test_build_has_no_warnings_from_our_configuration(dist):
    _, log = dist
    assert not _warnings(log), "\n".join(_warnings(log))


def test_sdist_and_wheel_carry_the_page_the_sample_and_the_kernel_source(dist):
    folder, _ = dist
    (sdist,) = folder.glob("*.tar.gz")
    (wheel,) = folder.glob("*.whl")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {f"client/web/{f}" for f in PAGE} | {"dpslm_stream/data/sample.wav", "hubconf.py", "README.md",
                                                "dpslm_stream/models/int8_gemv.cpp"} <= names
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
    assert {f"dpslm_stream/client/web/{f}" for f in PAGE} | {"dpslm_stream/data/sample.wav",
                                                             "dpslm_stream/models/int8_gemv.cpp"} <= names
    assert not any(n.startswith(("server/", "client/", "tests/")) for n in names)  # installed under dpslm_stream/


def test_wheel_installs_cleanly_in_a_fresh_venv(dist, tmp_path):
    folder, _ = dist
    (wheel,) = folder.glob("*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    log = _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)])
    assert not _warnings(log), log
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
    for f in PAGE:
        assert (purelib / "dpslm_stream" / "client" / "web" / f).is_file()
    assert (purelib / "dpslm_stream" / "data" / "sample.wav").is_file()
    assert (venv / "bin" / "dpslm-stream").is_file()
    version = _run([str(python), "-c", "import dpslm_stream; print(dpslm_stream.__version__)"]).strip()
    assert version == "0.1.0"
