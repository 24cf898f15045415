"""The README's Python API example runs as written (hub loaders pointed at the tiny set's files with path=), and the
commands it names exist."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from dpslm_stream import hub
from dpslm_stream.tiny import speech_like

README = (Path(__file__).parents[1] / "README.md").read_text()


def test_python_api_example_runs_on_the_tiny_set(tiny_dir, monkeypatch):
    code = re.search(r"## Python API.*?```python\n(.*?)```", README, re.S).group(1)
    files = {
        "wavlm_large": "wavlm-large-tiny.pt",
        "codebook": "codebook-layer-11-k-500-tiny.pt",
        "ulm_wavlm_layer_11_dpdp_hours_1k_steps_10k": "mistral-ulm-k-500-lmbda-4500-hours-1k-steps-10k-tiny.pt",
        "ellav_units_to_wavtokenizer": "ella-v-wavlm-layer-11-k-500-lmbda-4500-clean-10k-40hz-tiny.pt",
        "small_600_24k_4096": "WavTokenizer_small_600_24k_4096-tiny.ckpt",
    }
    for name, file in files.items():
        original = getattr(hub, name)
        monkeypatch.setattr(hub, name, lambda *a, _f=original, _p=tiny_dir / file, **kw: _f(*a, path=_p, **kw))
    scope = {"wav": torch.from_numpy(speech_like(1.0, 22050, seed=2))[None], "sr": 22050}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["features"].shape[0] == int(22050 * 1.0 * 16000 / 22050) // 320
    units = scope["units"]
    assert units.ndim == 1 and bool((units[1:] != units[:-1]).all())
    assert np.isfinite(float(scope["loglik"]))
    assert scope["sr"] == 24000 and scope["audio"].shape[-1] == 600 * len(scope["codec_ids"][0])


def test_every_command_in_the_table_exists():
    from dpslm_stream.cli import build_parser

    names = set(re.findall(r"^\| `dpslm-stream (\w[\w-]*)", README, re.M))
    choices = build_parser()._subparsers._group_actions[0].choices
    assert names and names <= set(choices), names - set(choices)
