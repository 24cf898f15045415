"""`make gpu-check` on a machine without a GPU: a dry run that exits 0, names every step, and checks that every
benchmark it would run accepts the flags it would pass (so a benchmark's flags cannot drift from the script)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_gpu_check_dry_run_checks_every_benchmark_flag(tmp_path):
    env = {**os.environ, "GPU_CHECK_DRY": "1", "PYTHON": sys.executable, "GPU_CHECK_OUT": str(tmp_path / "gpu")}
    run = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "dry run done (every benchmark accepted its flags)" in run.stdout
    for name in ("wavlm", "encoder", "ulm", "ellav", "wavtokenizer", "resynth", "server"):
        assert f"bench {name} --device cuda" in run.stdout, name
    assert "bfloat16" in run.stdout and "tests/test_cuda.py" in run.stdout
    assert not (tmp_path / "gpu").exists()  # a dry run writes nothing
