"""The README's Python API example runs as written (offline: on the tiny set, which its first line switches to), and
the commands it names exist."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import torch


README = (Path(__file__).parents[1] / "README.md").read_text()


def test_python_api_example_runs_as_written(tmp_path, capsys):
    """The block exactly as printed, on a machine without the release files: its first line switches to the tiny set
    and says so; everything after it is upstream's calls."""
    code = re.search(r"## Python API.*?```python\n(.*?)```", README, re.S).group(1)
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "empty-hub"))  # nothing cached
    try:
        scope: dict = {}
        exec(compile(code, "README.md", "exec"), scope)
    finally:
        torch.hub.set_dir(old)
    out = capsys.readouterr().out
    assert "using the tiny RANDOM-weight set" in out and "500:4500" in out
    assert "Loaded WavLM with" in out and "Loaded WavTokenizer small_600_24k_4096" in out
    assert scope["features"].shape[0] == scope["wav"].shape[1] // 320  # the sample is 16 kHz
    units = scope["units"]
    assert units.ndim == 1 and len(units) > 1 and bool((units[1:] != units[:-1]).all())
    assert np.isfinite(float(scope["loglik"]))
    assert scope["sr"] == 24000 and scope["audio"].shape[-1] == 600 * len(scope["codec_ids"][0])


def test_the_tiny_set_pairs_named_in_the_readme_are_the_tiny_sets():
    from dpslm_stream.tiny import TINY_PAIRS

    assert ", ".join(f"{k}:{lm}" for k, lm in TINY_PAIRS[:-1]) + f" and {TINY_PAIRS[-1][0]}:{TINY_PAIRS[-1][1]}" in README


def test_every_command_in_the_table_exists():
    from dpslm_stream.cli import build_parser

    names = set(re.findall(r"^\| `dpslm-stream (\w[\w-]*)", README, re.M))
    choices = build_parser()._subparsers._group_actions[0].choices
    assert names and names <= set(choices), names - set(choices)
    assert set(choices) <= names, set(choices) - names  # and every command is in the table


def test_the_table_says_truly_which_commands_take_models_and_device():
    from dpslm_stream.cli import build_parser

    choices = build_parser()._subparsers._group_actions[0].choices
    rows = [re.split(r"(?<!\\)\|", line)[1:-1] for line in README.splitlines() if line.startswith("| `dpslm-stream ")]
    assert len(rows) == len(choices) + 1  # encode has two rows
    for cells in rows:
        name, claim = re.match(r" `dpslm-stream ([\w-]+)", cells[0]).group(1), cells[-1].strip()
        if name == "bench" or choices[name]._subparsers is not None:  # per benchmark / per subcommand: in the text
            continue
        parsers = [choices[name]]  # a command with subcommands (codec) takes what its subcommands take
        for a in choices[name]._actions:
            if isinstance(a, argparse._SubParsersAction):
                parsers += list(a.choices.values())
        opts = {o for p in parsers for a in p._actions for o in a.option_strings}
        takes_models, takes_device = "--models" in opts, "--device" in opts
        if claim.startswith("both"):
            assert takes_models and takes_device, name
        elif claim.startswith("neither"):
            assert not takes_models and (not takes_device or "audio input" in claim), name
        else:
            assert claim.startswith("`--models`") and takes_models and not takes_device, name
