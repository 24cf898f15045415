"""Tests that kill the survivors of the independent hand-made mutation check (scripts/handmade_mutants.py,
docs/mutation.md "Hand-made mutants"): realistic small bugs the rest of the suite let through. Each test names the
mutant it kills. Models here have tiny RANDOM weights where a model is used at all."""

import math

import pytest
import torch

from dpslm_stream import protocol as P
from dpslm_stream.models import ellav as E
from dpslm_stream.models import transformer as T


def test_rmsnorm_keeps_eps_inside_the_root():
    """#19 (RMSNorm without eps): a silent frame (all zeros) must normalise to zeros, not NaN, and tiny inputs
    follow x / sqrt(mean(x^2) + eps) exactly (the slow obvious formula in float64)."""
    norm = T.RMSNorm(4, eps=1e-5)
    assert torch.equal(norm(torch.zeros(2, 4)), torch.zeros(2, 4))
    x = torch.tensor([[1e-4, -2e-4, 3e-4, 0.0]])
    ref = x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(norm(x).double(), ref, rtol=1e-5, atol=1e-9)


def test_ellav_sample_divides_logits_by_the_temperature():
    """#22 (nucleus sampling ignores the temperature): with logits [0, ln 3] the token probabilities are
    softmax(logits / T); at T = 2 token 0 has 1 / (1 + sqrt 3) = 0.366 (0.25 at T = 1). 20000 seeded draws, std
    0.0034: the frequency must sit within 0.015 of the formula at both temperatures."""
    logits = torch.tensor([[0.0, math.log(3.0)]]).expand(20000, 2)
    for temperature in (1.0, 2.0):
        gen = torch.Generator().manual_seed(0)
        drawn = E.sample(logits, temperature, 1.0, gen)
        expected = 1.0 / (1.0 + 3.0 ** (1.0 / temperature))
        assert abs((drawn == 0).double().mean().item() - expected) < 0.015


def test_a_binary_server_frame_of_unknown_kind_is_unknown_type_not_bad_audio():
    """#6 (wrong error code): a well-sized binary frame whose kind byte is neither audio nor bitstream is a frame
    type this client does not know (UNKNOWN_TYPE); a frame too short or of odd length is BAD_AUDIO."""
    good = P.encode_audio_chunk(3, 480, b"\x00\x00" * 4)
    assert P.decode_server_binary(good).seq == 3
    for kind in (0, 7, 255):
        with pytest.raises(P.ProtocolError) as info:
            P.decode_server_binary(bytes((kind,)) + good[1:])
        assert info.value.code == P.ErrorCode.UNKNOWN_TYPE and str(kind) in str(info.value)
    with pytest.raises(P.ProtocolError) as info:
        P.decode_audio_chunk(good[:-1])
    assert info.value.code == P.ErrorCode.BAD_AUDIO
