"""Tests for dpslm_stream.dpdp against independent oracles: brute force over all unit sequences, an obviously-correct
float64 segmental DP written here, a transcription of upstream's segmental algorithm, nearest-centroid argmin, and
offline vs streaming for arbitrary chunkings."""

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpslm_stream.bench.dpdp import segmental_dpdp_reference, speech_like_features
from dpslm_stream.dpdp import (
    BLOCK_FRAMES,
    DPDPQuantizer,
    Segment,
    StreamingDPDP,
    _Distances,
    deduplicate,
    dpdp,
    dpdp_batch,
    dpdp_cost,
    segments_from_units,
)
from dpslm_stream.errors import InvalidInput

# ----------------------------------------------------------------------------------------------------------------
# Oracles and data


def exact_distances(x: torch.Tensor, c: torch.Tensor) -> np.ndarray:
    """||x_t - c_k||^2 in float64, as differences (no GEMM expansion)."""
    x64 = x.double().numpy()
    c64 = c.double().numpy()
    return ((x64[:, None, :] - c64[None, :, :]) ** 2).sum(-1)


def allowed_mask(d: np.ndarray, n: int | None) -> np.ndarray:
    """Each frame's n nearest codes, ties to the lowest index (stable sort)."""
    if n is None:
        return np.ones_like(d, dtype=bool)
    order = np.argsort(d, axis=1, kind="stable")[:, :n]
    mask = np.zeros_like(d, dtype=bool)
    np.put_along_axis(mask, order, True, axis=1)
    return mask


def objective(d: np.ndarray, units, lmbda: float) -> float:
    return float(sum(d[t, u] for t, u in enumerate(units))) + lmbda * sum(
        1 for a, b in zip(units[:-1], units[1:]) if a != b
    )


def brute_force(x, c, lmbda, n):
    """(min J, list of optimal unit sequences) by enumerating every allowed sequence (tiny T, K only)."""
    d = exact_distances(x, c)
    mask = allowed_mask(d, n)
    choices = [np.flatnonzero(mask[t]).tolist() for t in range(len(d))]
    scored = [(objective(d, seq, lmbda), seq) for seq in itertools.product(*choices)]
    best = min(j for j, _ in scored)
    return best, [list(seq) for j, seq in scored if j <= best + 1e-9 * max(1.0, abs(best))]


def segmental_float64(x, c, lmbda, n):
    """Obviously-correct segmental DP in float64: best[t] = min_{s<t, k} best[s] + sum d[s:t, k] + lmbda.

    Returns (units, J) where J = best[T] - lmbda (segments - 1 = changes). Ties: earliest start, lowest code.
    """
    d = exact_distances(x, c)
    d[~allowed_mask(d, n)] = np.inf
    num_frames = len(d)
    best = np.full(num_frames + 1, np.inf)
    best[0] = 0.0
    back = [(0, 0)] * (num_frames + 1)
    for t in range(1, num_frames + 1):
        for s in range(t):
            seg = d[s:t].sum(axis=0)
            k = int(np.argmin(seg))
            total = best[s] + seg[k] + lmbda
            if total < best[t]:
                best[t] = total
                back[t] = (s, k)
    units = [0] * num_frames
    t = num_frames
    while t > 0:
        s, k = back[t]
        units[s:t] = [k] * (t - s)
        t = s
    return torch.tensor(units), best[num_frames] - lmbda


def random_data(seed, num_frames, num_codes, dim, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_frames, dim, generator=g, dtype=dtype), torch.randn(num_codes, dim, generator=g, dtype=dtype)


class OnDevice:
    """The quantizer on the test device (DPSLM_TEST_DEVICE): inputs built on the CPU (seeded) are moved there, units
    come back to the CPU, where the oracles run. Streams take CPU frames (push moves them to the codebook's device)."""

    def __init__(self, device: torch.device):
        self.device = device

    def dpdp(self, x, c, *args):
        return dpdp(x.to(self.device), c.to(self.device), *args).cpu()

    def batch(self, seqs, c, *args):
        if isinstance(seqs, tuple):
            seqs = (seqs[0].to(self.device), seqs[1])
        else:
            seqs = [s.to(self.device) for s in seqs]
        return [u.cpu() for u in dpdp_batch(seqs, c.to(self.device), *args)]

    def stream(self, c, *args, **kwargs):
        return StreamingDPDP(c.to(self.device), *args, **kwargs)


@pytest.fixture(scope="module")
def dq(device):
    return OnDevice(device)


def small_speech(seed, num_frames, num_codes=12, dim=8, noise=0.9, dtype=torch.float32):
    """Speech-like data at small dimensions: codes on a 3-D manifold, runs of 1..7 frames, noise that confuses ~10%
    of nearest-code decisions. Squared gaps between neighbouring codes are ~10, so lambda in 0..30 matters."""
    x, c, _ = speech_like_features(num_frames, num_codes, dim, latent_dim=3, code_scale=1.0, noise=noise,
                                   walk_neighbors=4, seed=seed)
    return x.to(dtype), c.to(dtype)


def expand(segments):
    if not segments:
        return torch.zeros(0, dtype=torch.int64)
    return torch.cat([torch.full((s.duration,), s.unit, dtype=torch.int64) for s in segments])


def run_stream(stream, x, chunk_sizes):
    """Pushes x in the given chunk sizes (cycled), then flushes; checks the per-push invariants on the way."""
    segments = []
    pos = 0
    sizes = itertools.cycle(chunk_sizes)
    committed = 0
    while pos < len(x):
        size = next(sizes)
        new = stream.push(x[pos : pos + size])
        pos = min(pos + size, len(x))
        for seg in new:
            assert seg.duration >= 1
            assert seg.start == (segments[-1].end if segments else 0)  # contiguous: extends, never revises
            assert not segments or seg.unit != segments[-1].unit  # deduplicated
            assert seg.end <= stream.frames_committed
            segments.append(seg)
        assert committed <= stream.frames_committed <= stream.frames_seen == pos
        committed = stream.frames_committed
    tail = stream.flush()
    for seg in tail:
        assert seg.start == (segments[-1].end if segments else 0)
        assert not segments or seg.unit != segments[-1].unit
        segments.append(seg)
    assert stream.frames_committed == len(x)
    return segments


# ----------------------------------------------------------------------------------------------------------------
# Offline quantizer vs oracles


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("lmbda", [0.0, 0.7, 3.0, 50.0])
@pytest.mark.parametrize("n", [None, 1, 2])
def test_matches_brute_force(seed, lmbda, n, dq):
    x, c = random_data(seed, 6, 4, 3)
    best, optimal = brute_force(x, c, lmbda, n)
    units = dq.dpdp(x, c, lmbda, n)
    assert dpdp_cost(x, c, units, lmbda) == pytest.approx(best, rel=1e-12, abs=1e-12)
    assert units.tolist() in optimal


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("lmbda", [0.0, 2.0, 8.0, 30.0])
@pytest.mark.parametrize("n", [None, 1, 3])
def test_matches_segmental_reference(seed, lmbda, n, dq):
    x, c = small_speech(seed, 45, dtype=torch.float64)
    ref_units, ref_cost = segmental_float64(x, c, lmbda, n)
    units = dq.dpdp(x, c, lmbda, n)
    assert dpdp_cost(x, c, units, lmbda) == pytest.approx(ref_cost, rel=1e-12)
    # Continuous random data in float64: exact cost ties do not occur, so the optimum is unique.
    assert torch.equal(units, ref_units)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("lmbda", [0.0, 600.0, 4500.0])
@pytest.mark.parametrize("n", [None, 5])
def test_matches_upstream_segmental_algorithm(seed, lmbda, n, dq):
    """Against the float32 segmental algorithm as upstream runs it; units may differ only on cost-equal near-ties."""
    x, c, _ = speech_like_features(70, 40, 64, latent_dim=4, code_scale=2.0, noise=6.0, walk_neighbors=5, seed=seed)
    ref_units = segmental_dpdp_reference(x, c, lmbda, n)
    units = dq.dpdp(x, c, lmbda, n)
    if not torch.equal(units, ref_units):
        ref_cost = dpdp_cost(x, c, ref_units, lmbda)
        assert dpdp_cost(x, c, units, lmbda) == pytest.approx(ref_cost, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lambda_zero_is_nearest_centroid(dtype, dq):
    x, c = random_data(7, 300, 20, 16, dtype)
    expected = torch.from_numpy(exact_distances(x, c).argmin(axis=1))
    assert torch.equal(dq.dpdp(x, c, 0.0), expected)
    assert torch.equal(dq.dpdp(x, c, 0.0, 3), expected)  # the nearest code is always allowed


def test_one_neighbor_is_nearest_centroid_for_any_lambda(dq):
    x, c = random_data(8, 200, 20, 16)
    expected = torch.from_numpy(exact_distances(x, c).argmin(axis=1))
    assert torch.equal(dq.dpdp(x, c, 1e6, 1), expected)


def test_all_neighbors_equals_unrestricted(dq):
    x, c = small_speech(3, 200)
    for lmbda in (0.0, 5.0, 40.0):
        assert torch.equal(dq.dpdp(x, c, lmbda, c.shape[0]), dq.dpdp(x, c, lmbda, None))


def test_units_stay_within_each_frames_neighbors(dq):
    x, c = small_speech(4, 300, noise=1.5, dtype=torch.float64)
    n = 3
    mask = allowed_mask(exact_distances(x, c), n)
    restricted = dq.dpdp(x, c, 30.0, n)
    assert mask[np.arange(len(x)), restricted.numpy()].all()
    # ...and the restriction matters here: the unrestricted optimum uses codes outside some frame's 3 nearest.
    unrestricted = dq.dpdp(x, c, 30.0)
    assert not mask[np.arange(len(x)), unrestricted.numpy()].all()


def test_lambda_reduces_changes(dq):
    x, c = small_speech(5, 400)
    changes = [len(deduplicate(dq.dpdp(x, c, lmbda))[0]) for lmbda in (0.0, 3.0, 10.0, 30.0, 1e9)]
    assert changes == sorted(changes, reverse=True) and changes[0] > changes[-2] and changes[-1] == 1


def test_exact_ties_resolve_to_the_lowest_index(dq):
    c = torch.tensor([[0.0], [2.0]], dtype=torch.float64)
    assert dq.dpdp(torch.tensor([[1.0]], dtype=torch.float64), c, 0.0).tolist() == [0]  # equidistant lone frame
    dup = torch.tensor([[1.0], [1.0], [1.0]], dtype=torch.float64)  # duplicate codes, also at the N-th place
    assert dq.dpdp(torch.tensor([[1.0], [1.0]], dtype=torch.float64), dup, 5.0, 1).tolist() == [0, 0]
    assert dq.dpdp(torch.tensor([[1.0], [1.0]], dtype=torch.float64), dup, 0.0).tolist() == [0, 0]


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    num_frames=st.integers(1, 40),
    chunk_sizes=st.lists(st.integers(1, 10), min_size=1, max_size=5),
    lmbda=st.sampled_from([0.0, 1.0, 2.0, 4.0]),
    n=st.sampled_from([None, 1, 2, 5]),
)
def test_exact_ties_are_resolved_alike_offline_and_streaming(seed, num_frames, chunk_sizes, lmbda, n, dq):
    """Small-integer data: distances and path costs tie exactly all the time (duplicate codes too)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 3, (num_frames, 2), generator=g).float()
    c = torch.randint(0, 3, (5, 2), generator=g).float()
    units = dq.dpdp(x, c, lmbda, n)
    _, best = segmental_float64(x, c, lmbda, n)
    assert dpdp_cost(x, c, units, lmbda) == best  # integers: exact
    assert torch.equal(expand(run_stream(dq.stream(c, lmbda, n), x, chunk_sizes)), units)


def test_cost_matches_definition():
    x, c = random_data(9, 30, 5, 4)
    units = torch.randint(0, 5, (30,), generator=torch.Generator().manual_seed(0))
    assert dpdp_cost(x, c, units, 2.5) == pytest.approx(objective(exact_distances(x, c), units.tolist(), 2.5))


# ----------------------------------------------------------------------------------------------------------------
# Batch, module, deduplication


def test_batch_equals_one_by_one(dq):
    x, c = small_speech(11, 3 * BLOCK_FRAMES + 5)
    seqs = [x[:1], x[:BLOCK_FRAMES], x[3 : 2 * BLOCK_FRAMES + 10], x]
    expected = [dq.dpdp(s, c, 7.0, 4) for s in seqs]
    got = dq.batch(seqs, c, 7.0, 4)
    assert len(got) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    padded = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=float("nan"))
    lengths = torch.tensor([len(s) for s in seqs])
    got = dq.batch((padded, lengths), c, 7.0, 4)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert dq.batch([], c, 7.0) == []


def test_quantizer_module_matches_upstream_call_shape():
    x, c = small_speech(12, 120)
    quantizer = DPDPQuantizer.from_codebook(c, 6.0, 4)
    assert list(quantizer.state_dict()) == ["codebook"]
    features = x.clone().requires_grad_(True)
    quantized, units = quantizer(features)
    assert torch.equal(units, dpdp(x, c, 6.0, 4))
    torch.testing.assert_close(quantized, c[units])  # value: the codes (up to the straight-through rounding)
    quantized.sum().backward()
    assert torch.equal(features.grad, torch.ones_like(x))  # gradient: straight through to the features
    blank = DPDPQuantizer(12, 8, 6.0, 4)
    blank.load_state_dict({"codebook": c})
    assert torch.equal(blank(x)[1], units)


@pytest.mark.parametrize("units", [[], [3], [1, 1, 2, 2, 2, 1, 4, 4], [5, 5, 5, 5]])
def test_deduplicate_and_segments(units):
    expected_units, expected_durations = [], []
    for unit, group in itertools.groupby(units):
        expected_units.append(unit)
        expected_durations.append(len(list(group)))
    deduped, durations = deduplicate(torch.tensor(units, dtype=torch.int64))
    assert deduped.tolist() == expected_units and durations.tolist() == expected_durations
    assert deduplicate(units)[0].tolist() == expected_units  # plain sequences too
    segments = segments_from_units(units)
    assert [s.unit for s in segments] == expected_units
    assert [s.duration for s in segments] == expected_durations
    assert expand(segments).tolist() == units
    assert all(isinstance(s, Segment) for s in segments)


# ----------------------------------------------------------------------------------------------------------------
# Streaming


def test_distances_do_not_depend_on_chunking(device):
    """Full-size shapes, where float32 GEMM rounding really does depend on the row count: every frame's distances
    must be bitwise the same whether computed alone, in odd chunks, or in one call (on the test device; the frames
    are pushed from the CPU, as a session does)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * BLOCK_FRAMES + 7, 1024, generator=g)
    c = torch.randn(500, 1024, generator=g)
    distances = _Distances(c.to(device))
    q, offset = distances(x, 0)
    whole = q[offset : offset + len(x)]
    pos = 0
    for size in itertools.cycle([1, 5, 64, 3, 70]):
        if pos >= len(x):
            break
        part, off = distances(x[pos : pos + size], pos)
        assert torch.equal(part[off : off + len(x[pos : pos + size])], whole[pos : pos + size])
        pos += size
    # Frames in memory that is not 64-byte aligned (a view 4 bytes into a buffer) give the same bits as well.
    flat = torch.empty(x.numel() + 1)
    flat[1:] = x.flatten()
    misaligned = flat[1:].view(x.shape)
    assert misaligned.data_ptr() % 64 != 0
    part, off = distances(misaligned, 0)
    assert torch.equal(part[off : off + len(x)], whole)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    num_frames=st.integers(1, 3 * BLOCK_FRAMES + 10),
    chunk_sizes=st.lists(st.integers(1, 90), min_size=1, max_size=8),
    lmbda=st.sampled_from([0.0, 1.0, 4.0, 12.0, 40.0, 1e4]),
    n=st.sampled_from([None, 1, 3, 12]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_streaming_equals_offline_for_any_chunking(seed, num_frames, chunk_sizes, lmbda, n, dtype, dq):
    x, c = small_speech(seed, num_frames, dtype=dtype)
    offline = dq.dpdp(x, c, lmbda, n)
    segments = run_stream(dq.stream(c, lmbda, n), x, chunk_sizes)
    assert torch.equal(expand(segments), offline)
    assert segments == segments_from_units(offline)


@pytest.mark.parametrize("lmbda", [0.0, 10.0, 40.0])
def test_streaming_one_frame_chunks_and_one_chunk(lmbda, dq):
    x, c = small_speech(21, 500, noise=1.2)
    offline = dq.dpdp(x, c, lmbda, 4)
    for sizes in ([1], [len(x)]):
        segments = run_stream(dq.stream(c, lmbda, 4), x, sizes)
        assert torch.equal(expand(segments), offline)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 1000), chunk_sizes=st.lists(st.integers(1, 80), min_size=1, max_size=5))
def test_streaming_equals_offline_full_size_gemm(seed, chunk_sizes, dq):
    """D=1024, K=500, N=25, lambda=4500 (DP-SLM's defaults), where float32 GEMM rounding is shape-dependent."""
    x, c, _ = speech_like_features(150, seed=seed)
    offline = dq.dpdp(x, c, 4500.0, 25)
    assert torch.equal(expand(run_stream(dq.stream(c, 4500.0, 25), x, chunk_sizes)), offline)


def test_commits_happen_early_and_state_stays_bounded(dq):
    """A long stream: commits keep up (frames are decided within a few frames), and the state does not grow."""
    x, c = small_speech(31, 20_000, noise=1.2)
    stream = dq.stream(c, 12.0, 4)
    base = stream.state_nbytes
    segments = []
    worst_excess = -math.inf
    for pos in range(0, len(x), 7):
        segments += stream.push(x[pos : pos + 7])
        undecided = stream.frames_seen - stream.frames_committed
        # Two int64 per undecided frame, with slack for capacity doubling: never a term in the stream's length.
        worst_excess = max(worst_excess, stream.state_nbytes - (base + 64 * (undecided + 33)))
    assert worst_excess <= 0
    assert stream.state_nbytes < base + 64 * 1000 < 16 * len(x)
    segments += stream.flush()
    assert torch.equal(expand(segments), dq.dpdp(x, c, 12.0, 4))


@pytest.mark.parametrize("max_lag", [0, 1, 3, 8])
def test_max_lag_bounds_the_undecided_stretch(max_lag, dq):
    x, c = small_speech(41, 600, noise=1.5)
    lmbda = 40.0
    offline = dq.dpdp(x, c, lmbda, None)
    stream = dq.stream(c, lmbda, None, max_lag=max_lag)
    segments = []
    arrival_lag = []
    committed = 0
    for t in range(len(x)):
        segments += stream.push(x[t : t + 1])
        assert stream.frames_seen - stream.frames_committed <= max_lag
        arrival_lag += [t - f for f in range(committed, stream.frames_committed)]
        committed = stream.frames_committed
    assert max(arrival_lag) <= max_lag
    segments += stream.flush()
    units = expand(segments)
    assert len(units) == len(x)
    assert stream.forced_commits > 0  # this data needs more than 8 frames of lookahead now and then
    # Forced decisions can only cost more than the exact optimum.
    assert dpdp_cost(x, c, units, lmbda) >= dpdp_cost(x, c, offline, lmbda) - 1e-6
    # Decisions are taken per frame, so the chunking still does not matter.
    again = dq.stream(c, lmbda, None, max_lag=max_lag)
    assert torch.equal(expand(run_stream(again, x, [len(x)])), units)
    assert again.forced_commits == stream.forced_commits


def test_max_lag_without_forced_commits_equals_offline(dq):
    x, c = small_speech(42, 400)
    stream = dq.stream(c, 4.0, 4, max_lag=len(x))
    assert torch.equal(expand(run_stream(stream, x, [3])), dq.dpdp(x, c, 4.0, 4))
    assert stream.forced_commits == 0


def test_zero_length_chunk_flush_and_reset(dq):
    x, c = small_speech(51, 100)
    offline = dq.dpdp(x, c, 10.0)
    stream = dq.stream(c, 10.0)
    assert stream.flush() == []  # nothing pushed: nothing to emit
    stream.reset()
    assert stream.push(x[:0]) == [] and stream.frames_seen == 0
    segments = stream.push(x[:50])
    assert stream.push(x[:0]) == []
    segments += stream.push(x[50:]) + stream.flush()
    assert torch.equal(expand(segments), offline)
    assert stream.flush() == []
    with pytest.raises(InvalidInput, match="reset"):
        stream.push(x[:1])
    stream.reset()
    assert stream.frames_seen == 0 and stream.frames_committed == 0
    assert torch.equal(expand(run_stream(stream, x, [9])), offline)


def test_inference_mode_on_either_side(dq):
    x, c = small_speech(52, 90)
    offline = dq.dpdp(x, c, 10.0)
    with torch.inference_mode():
        stream = dq.stream(c, 10.0)
        assert torch.equal(dq.dpdp(x, c, 10.0), offline)
        segments = stream.push(x[:40])
    segments += stream.push(x[40:]) + stream.flush()
    assert torch.equal(expand(segments), offline)


def test_bad_chunk_raises_and_leaves_the_state_intact(dq):
    x, c = small_speech(61, 150, dtype=torch.float64)
    offline = dq.dpdp(x, c, 10.0, 3)
    stream = dq.stream(c, 10.0, 3)
    segments = stream.push(x[:70])
    seen, committed, nbytes = stream.frames_seen, stream.frames_committed, stream.state_nbytes
    bad = x[70:80].clone()
    bad[4, 2] = float("nan")
    with pytest.raises(InvalidInput, match="frame 74"):
        stream.push(bad)
    bad[4, 2] = float("inf")
    with pytest.raises(InvalidInput, match="NaN/Inf"):
        stream.push(bad)
    with pytest.raises(InvalidInput, match="D="):
        stream.push(x[70:80, :5])
    with pytest.raises(InvalidInput, match="shape"):
        stream.push(x[70])
    assert (stream.frames_seen, stream.frames_committed, stream.state_nbytes) == (seen, committed, nbytes)
    segments += stream.push(x[70:]) + stream.flush()
    assert torch.equal(expand(segments), offline)


# ----------------------------------------------------------------------------------------------------------------
# Bad input


def _good():
    return small_speech(71, 20)


@pytest.mark.parametrize(
    "make_call, match",
    [
        (lambda x, c: dpdp(x[0], c, 1.0), "shape"),
        (lambda x, c: dpdp(x[None], c, 1.0), "shape"),
        (lambda x, c: dpdp(x[:0], c, 1.0), "empty"),
        (lambda x, c: dpdp(x[:, :3], c, 1.0), "D="),
        (lambda x, c: dpdp(x, c, -1.0), "lmbda"),
        (lambda x, c: dpdp(x, c, float("nan")), "lmbda"),
        (lambda x, c: dpdp(x, c, float("inf")), "lmbda"),
        (lambda x, c: dpdp(x, c, "1"), "lmbda"),
        (lambda x, c: dpdp(x, c, 1.0, 0), "num_neighbors"),
        (lambda x, c: dpdp(x, c, 1.0, c.shape[0] + 1), "num_neighbors"),
        (lambda x, c: dpdp(x, c, 1.0, 2.5), "num_neighbors"),
        (lambda x, c: dpdp(torch.where(torch.arange(20)[:, None] == 3, float("nan"), x), c, 1.0), "frame 3"),
        (lambda x, c: dpdp(torch.where(torch.arange(20)[:, None] == 5, float("inf"), x), c, 1.0), "frame 5"),
        (lambda x, c: dpdp(torch.full_like(x, 1e30), c, 1.0), "too large"),
        (lambda x, c: dpdp(x.long(), c, 1.0), "floating"),
        (lambda x, c: dpdp(x.numpy(), c, 1.0), "torch.Tensor"),
        (lambda x, c: dpdp(x, c[0], 1.0), "codebook"),
        (lambda x, c: dpdp(x, c[:0], 1.0), "codebook"),
        (lambda x, c: dpdp(x, torch.full_like(c, float("nan")), 1.0), "codebook"),
        (lambda x, c: dpdp_batch([x, x[:0]], c, 1.0), r"features\[1\]"),
        (lambda x, c: dpdp_batch((x[None], torch.tensor([21])), c, 1.0), "lengths"),
        (lambda x, c: dpdp_batch((x[None], [5, 5]), c, 1.0), "lengths"),
        (lambda x, c: dpdp_batch(x, c, 1.0), "list"),
        (lambda x, c: dpdp_cost(x, c, [0] * 19, 1.0), "units"),
        (lambda x, c: dpdp_cost(x, c, [99] * 20, 1.0), "units"),
        (lambda x, c: StreamingDPDP(c, 1.0, max_lag=-1), "max_lag"),
        (lambda x, c: StreamingDPDP(c, -2.0), "lmbda"),
        (lambda x, c: StreamingDPDP(c, 1.0, 0), "num_neighbors"),
        (lambda x, c: DPDPQuantizer.from_codebook(c, 1.0, 99), "num_neighbors"),
    ],
)
def test_bad_input_raises_clear_error(make_call, match):
    x, c = _good()
    with pytest.raises(InvalidInput, match=match):
        make_call(x, c)
