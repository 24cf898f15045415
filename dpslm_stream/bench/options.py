"""Command-line option types the benchmarks share."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from dpslm_stream.models.precision import PRECISIONS


def precision_list(choices: tuple[str, ...] = PRECISIONS) -> Callable[[str], list[str]]:
    """An argparse type for --precision: a comma-separated list of `choices`, in order, each once."""

    def parse(text: str) -> list[str]:
        names = list(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
        if not names or any(p not in choices for p in names):
            raise argparse.ArgumentTypeError(f"--precision takes a comma-separated list of {', '.join(choices)}")
        return names

    return parse
