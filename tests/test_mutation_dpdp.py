"""DPDP's Python layer at the edges the mutants of `make mutants MODULES=dpdp` found untested (docs/mutation.md):
batches given as tuples, the quantizer's neighbour setting, exact error messages, the streaming window's growth and
trimming. Public API only, so the tests survive a reshaping of dpslm_stream/dpdp.py."""

import pytest
import torch

from dpslm_stream.dpdp import DPDPQuantizer, StreamingDPDP, deduplicate, dpdp, dpdp_batch, dpdp_cost
from dpslm_stream.errors import InvalidInput


def _data(seed=0, t=30, k=20, d=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, d, generator=g), torch.randn(k, d, generator=g)


def test_a_tuple_of_sequences_is_a_batch_of_sequences_not_a_padded_batch():
    x, c = _data()
    a, b = x[:12], x[12:]
    got = dpdp_batch((a, b), c, 1.5)  # a tuple of two (T_i, D) tensors: two sequences
    assert len(got) == 2
    assert torch.equal(got[0], dpdp(a, c, 1.5)) and torch.equal(got[1], dpdp(b, c, 1.5))


def test_padded_batch_length_error_names_the_padded_length():
    x, c = _data(t=20)
    with pytest.raises(InvalidInput) as err:
        dpdp_batch((x[None], [21]), c, 1.0)
    assert str(err.value) == "lengths[0] = 21; expected an int in 1..T=20"


def test_quantizer_keeps_num_neighbors_none_as_given_and_checks_it_against_k():
    x, c = _data(k=20, d=8)
    assert DPDPQuantizer(20, 8, 1.0).num_neighbors is None
    assert DPDPQuantizer(20, 8, 1.0, 20).num_neighbors == 20
    # num_neighbors is checked against the number of codes K = 20, not the dimension D = 8.
    q = DPDPQuantizer.from_codebook(c, 1.0, 12)
    assert q.num_neighbors == 12 and q.codebook.shape == (20, 8)
    quantized, units = q(x)
    assert torch.equal(units, dpdp(x, c, 1.0, 12))
    torch.testing.assert_close(quantized, c[units], rtol=0, atol=1e-6)  # x - (x - c[u]): rounding only


def test_streaming_errors_name_the_chunk():
    _, c = _data(d=8)
    stream = StreamingDPDP(c, 1.0)
    with pytest.raises(InvalidInput) as err:
        stream.push(torch.zeros(3, 5))
    assert str(err.value) == "features_chunk have D=5 but the codebook has D=8; they must match"


def test_fresh_stream_state_is_the_cost_column_and_a_32_frame_window():
    _, c = _data(k=20, d=8)
    stream = StreamingDPDP(c, 1.0, num_neighbors=5)
    # int64/float64 arrays: cost (K) + segment starts (K) + last allowed codes (N) + 1 float + 6 ints + two
    # 32-frame windows (unit, start).
    expected = 8 * (20 + 20 + 5 + 1 + 6 + 32 + 32)
    assert stream.state_nbytes == expected
    x, _ = _data(seed=3, t=40, k=20, d=8)
    assert stream.push(x) + stream.flush()
    stream.reset()
    assert stream.state_nbytes == expected  # reset gives the pushed memory back


def test_streaming_from_a_fresh_and_a_reset_stream_equals_offline_in_small_chunks():
    x, c = _data(seed=5, t=90, k=20, d=8)
    offline = dpdp(x, c, 2.0, 6)
    stream = StreamingDPDP(c, 2.0, num_neighbors=6)
    for _ in range(2):  # fresh, then after reset
        segments = []
        for i in range(0, 90, 7):
            segments += stream.push(x[i : i + 7])
        segments += stream.flush()
        assert [s.start for s in segments] == sorted(s.start for s in segments)
        assert segments[0].start == 0 and segments[-1].end == 90
        units = torch.cat([torch.full((s.end - s.start,), s.unit) for s in segments])
        assert torch.equal(units, offline)
        stream.reset()


@pytest.mark.parametrize("chunk", [32, 33])
def test_chunks_around_the_initial_window_capacity_equal_offline(chunk):
    """The undecided window starts with room for 32 frames and grows on demand: chunks of 32 and 33 frames fill it
    exactly or overflow it by one (a mutant starting the window base at 1 wrote out of bounds here)."""
    for seed in range(12, 18):
        g = torch.Generator().manual_seed(seed)
        t = 20 + seed % 50
        x, c = torch.randn(t, 4, generator=g), torch.randn(6, 4, generator=g)
        for lmbda in (0.5, 5.0):
            stream = StreamingDPDP(c, lmbda)
            segments = [s for i in range(0, t, chunk) for s in stream.push(x[i : i + chunk])] + stream.flush()
            units = torch.cat([torch.full((s.end - s.start,), s.unit) for s in segments])
            assert segments[0].start == 0 and torch.equal(units, dpdp(x, c, lmbda))


def test_unit_inputs_come_back_as_int64_and_errors_say_why():
    units, durations = deduplicate(torch.tensor([4, 4, 1], dtype=torch.int32))
    assert units.dtype == torch.int64 and durations.dtype == torch.int64
    assert units.tolist() == [4, 1] and durations.tolist() == [2, 1]
    with pytest.raises(InvalidInput) as err:
        deduplicate(torch.zeros(2, 2, dtype=torch.int64))
    assert str(err.value) == "units must be 1-D (T,), got shape (2, 2)"
    with pytest.raises(InvalidInput) as err:
        deduplicate(torch.zeros(3))
    assert str(err.value) == "units must be an integer tensor, got dtype torch.float32"


def test_cost_rejects_units_outside_the_codebook_naming_the_range():
    x, c = _data(t=5, k=20, d=8)
    assert dpdp_cost(x, c, [19] * 5, 1.0) == pytest.approx(float(((x.double() - c[19].double()) ** 2).sum()))
    with pytest.raises(InvalidInput) as err:
        dpdp_cost(x, c, [20] * 5, 1.0)
    assert str(err.value) == "units must lie in 0..19"
