"""Every streaming stage of both halves against the one interface they declare (dpslm_stream/stream/stage.py).

One set of checks over all of them (tiny random-weight models): each implements StreamingStage (or StreamState);
`reset()` gives back a stage that behaves bit for bit as a freshly built one (the oracle: a fresh stage fed the same
input) and measures the same `state_nbytes`; `state_nbytes` stops growing on a long stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest
import torch

from dpslm_stream.audio import StreamingResampler
from dpslm_stream.dpdp import StreamingDPDP
from dpslm_stream.models import wavtokenizer as W
from dpslm_stream.models.ulm import IncrementalScorer
from dpslm_stream.stream.ellav_stage import IncrementalELLAV
from dpslm_stream.stream.encoder import WindowedEncoder, WindowRunner, window_config
from dpslm_stream.stream.frontend import StreamingFrontend
from dpslm_stream.stream.stage import StreamingStage, StreamState
from dpslm_stream.stream.vocoder import IncrementalVocoder, StreamingISTFT

K, LMBDA = 500, 4500

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass
class Case:
    make: Callable[[], Any]  # a fresh stage
    chunk: Callable[[np.random.Generator], Any]  # one random input chunk
    flushes: bool = True  # a StreamingStage (else a StreamState with push)


@pytest.fixture(scope="module")
def cases(tiny_models) -> dict[str, Case]:
    wavlm, _ = tiny_models.wavlm()
    wavlm.eval()
    runner = WindowRunner(wavlm)
    codebook = tiny_models.codebook(K)
    ulm, _ = tiny_models.ulm(K, LMBDA)
    ellav = tiny_models.ellav(K, LMBDA)
    vocoder, _, _ = tiny_models.wavtokenizer()
    window = vocoder.head.istft.window
    bins = W.TINY.n_fft // 2 + 1

    def spectra(rng):
        re, im = (torch.from_numpy(rng.standard_normal((1, bins, 3))).float() for _ in range(2))
        return torch.complex(re, im)

    return {
        "resampler": Case(lambda: StreamingResampler(44100),
                          lambda rng: rng.uniform(-0.5, 0.5, int(rng.integers(50, 3000))).astype(np.float32)),
        "frontend": Case(lambda: StreamingFrontend(wavlm),
                         lambda rng: torch.from_numpy(rng.uniform(-0.5, 0.5, 1500).astype(np.float32))),
        "encoder": Case(lambda: WindowedEncoder(runner, window_config("cached")),
                        lambda rng: torch.from_numpy(rng.standard_normal((7, runner.dim)).astype(np.float32))),
        "dpdp": Case(lambda: StreamingDPDP(codebook, LMBDA, max_lag=40),
                     lambda rng: torch.from_numpy(rng.standard_normal((9, codebook.shape[1])).astype(np.float32))),
        "scorer": Case(lambda: IncrementalScorer(ulm, max_context=24, chunk=8),
                       lambda rng: rng.integers(0, K, 3).tolist(), flushes=False),
        "ellav": Case(lambda: IncrementalELLAV(ellav, left_context=3, holdback=1, max_pass_units=4),
                      lambda rng: rng.integers(0, K, 2).tolist()),
        "vocoder": Case(lambda: IncrementalVocoder(vocoder, left_context=8, lookahead=2, min_step=2),
                        lambda rng: torch.from_numpy(rng.integers(0, 4096, 3))),
        "istft": Case(lambda: StreamingISTFT(window, W.TINY.hop_length), spectra),
    }


STAGES = ["resampler", "frontend", "encoder", "dpdp", "scorer", "ellav", "vocoder", "istft"]


def as_comparable(out: Any) -> Any:
    """Outputs as plain values (tensors to numpy arrays; lists of segments or ids stay lists)."""
    if isinstance(out, torch.Tensor):
        return out.detach().cpu().numpy()
    return out


def run(stage: Any, chunks: list, flushes: bool) -> list:
    outs = [as_comparable(stage.push(c)) for c in chunks]
    if flushes:
        outs.append(as_comparable(stage.flush()))
    return outs


def assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, np.ndarray):
            np.testing.assert_array_equal(x, y)
        else:
            assert x == y
    assert any(np.size(x) for x in a)  # something was compared


@pytest.mark.parametrize("name", STAGES)
def test_every_stage_implements_the_interface(cases, name):
    case = cases[name]
    stage = case.make()
    assert isinstance(stage, StreamingStage if case.flushes else StreamState)
    assert isinstance(stage.state_nbytes, int)


@pytest.mark.parametrize("name", STAGES)
def test_reset_gives_back_a_fresh_stage(cases, name):
    """A stage that has seen a stream, reset, behaves bit for bit as a new one on the next stream."""
    case = cases[name]
    rng = np.random.default_rng(1)
    first = [case.chunk(rng) for _ in range(6)]
    second = [case.chunk(rng) for _ in range(6)]
    fresh, used, dirty = case.make(), case.make(), case.make()
    initial = fresh.state_nbytes
    for c in first:
        used.push(c)
        dirty.push(c)
    if name == "dpdp":  # and one that was flushed too: its flush does not reset
        used.flush()
    used.reset()
    assert used.state_nbytes == initial
    expected = run(fresh, second, case.flushes)
    assert_same(run(used, second, case.flushes), expected)
    # Not vacuous: without the reset the first stream's state changes the output.
    with pytest.raises(AssertionError):
        assert_same(run(dirty, second, case.flushes), expected)


@pytest.mark.parametrize("name", STAGES)
def test_state_stops_growing_on_a_long_stream(cases, name):
    """state_nbytes after each of 60 pushes: the last 20 stay within 1.25x of the most seen over pushes 10..30 (the
    state may wander with the input's phase, e.g. the resampler's tail, but a state that grows with the stream, even
    by one id per push, passes that margin)."""
    case = cases[name]
    rng = np.random.default_rng(2)
    stage = case.make()
    sizes = []
    for _ in range(60):
        stage.push(case.chunk(rng))
        sizes.append(stage.state_nbytes)
    assert max(sizes) > 0
    assert max(sizes[40:]) <= 1.25 * max(sizes[10:30])
