"""ULM: parity with transformers' MistralForCausalLM, incremental/batched scoring, checkpoint format, bad inputs."""

import dataclasses
import io
import random

import pytest
import torch

from dpslm_stream.errors import CheckpointError, InvalidInput
from dpslm_stream.models import ulm
from dpslm_stream.models.ulm import ULM, IncrementalScorer, ScoringPool, UnitTokenizer, score_blocks

K = 500


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_ulm(seed=0, config=ulm.TINY) -> ULM:
    torch.manual_seed(seed)
    model = ULM(config).eval()
    with torch.no_grad():  # non-trivial norm weights, so a mix-up of the norms would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def model(device) -> ULM:
    """The model under test, on the test device (DPSLM_TEST_DEVICE); the transformers oracle runs on the CPU."""
    return random_ulm().to(device)


def random_units(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, K, (n,), generator=g).tolist()


# ----- independent oracle: Hugging Face Mistral -----


def hf_mistral(model: ULM, sliding_window=None, permute=True):
    """transformers' MistralForCausalLM with our weights (the conversion is written here, from ulm.md §5)."""
    transformers = pytest.importorskip("transformers")
    c = model.config
    cfg = transformers.MistralConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.hidden_dim, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim, hidden_act="silu",
        rms_norm_eps=c.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        tie_word_embeddings=False, sliding_window=sliding_window, max_position_embeddings=16384,
        bos_token_id=0, eos_token_id=None, pad_token_id=None, attention_dropout=0.0,
    )
    cfg._attn_implementation = "eager"
    hf = transformers.MistralForCausalLM(cfg).eval()

    def rope_permute(w, n_heads):
        # interleaved pairs (2i, 2i+1) -> HF rotate-half halves (i, i + D/2), per head
        return w.view(n_heads, c.head_dim // 2, 2, c.dim).transpose(1, 2).reshape(n_heads * c.head_dim, c.dim)

    sd = {}
    for k, v in model.state_dict().items():
        k2 = (k.replace("tok_embeddings", "model.embed_tokens").replace("layers.", "model.layers.")
              .replace("attention_norm", "input_layernorm").replace("ffn_norm", "post_attention_layernorm")
              .replace("attention.wq", "self_attn.q_proj").replace("attention.wk", "self_attn.k_proj")
              .replace("attention.wv", "self_attn.v_proj").replace("attention.wo", "self_attn.o_proj")
              .replace("feed_forward.w1", "mlp.gate_proj").replace("feed_forward.w2", "mlp.down_proj")
              .replace("feed_forward.w3", "mlp.up_proj").replace("output.weight", "lm_head.weight"))
        if k2 == "norm.weight":
            k2 = "model.norm.weight"
        if permute and k.endswith("attention.wq.weight"):
            v = rope_permute(v, c.n_heads)
        if permute and k.endswith("attention.wk.weight"):
            v = rope_permute(v, c.n_kv_heads)
        sd[k2] = v.detach().cpu().clone()
    hf.load_state_dict(sd, strict=True)
    return hf


def hf_unit_logprobs(hf, ids):
    with torch.no_grad():
        logits = hf(ids[None, :-1]).logits[0].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[1:, None])[:, 0]


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_logits_and_loglikelihood_match_hf_mistral(model):
    hf = hf_mistral(model)
    ids = UnitTokenizer(K).encode(random_units(120, 1))
    with torch.no_grad():
        ours = model(ids[None].to(model.device))[0].cpu()
        ref = hf(ids[None]).logits[0].float()
    assert rel_err(ours, ref) <= 1e-4
    ll_ref = float(hf_unit_logprobs(hf, ids).sum())
    assert abs(model.loglikelihood(ids) - ll_ref) <= 1e-4 * abs(ll_ref)
    # The oracle is sensitive to the rotary layout: without the row permutation it disagrees grossly.
    with torch.no_grad():
        wrong = hf_mistral(model, permute=False)(ids[None]).logits[0].float()
    assert rel_err(wrong, ref) > 1e-2


def test_unit_logprobs_are_per_unit_terms_of_loglikelihood(model):
    ids = UnitTokenizer(K).encode(random_units(40, 2))
    lp = model.unit_logprobs(ids)
    assert lp.shape == (40,) and lp.dtype == torch.float32 and bool((lp < 0).all())
    assert float(lp.sum()) == pytest.approx(model.loglikelihood(ids), rel=1e-6)
    # log p(u1 | BOS) by hand: softmax over all V tokens after BOS alone
    with torch.no_grad():
        first = torch.log_softmax(model(torch.tensor([[0]], device=model.device))[0, 0], -1).cpu()[ids[1]]
    assert float(lp[0]) == pytest.approx(float(first), abs=1e-5)
    assert model.loglikelihood(UnitTokenizer(K).encode([])) == 0.0


def test_incremental_blocks_sum_to_loglikelihood(model):
    for seed in range(4):
        rng = random.Random(seed)
        units = random_units(rng.randint(1, 90), 10 + seed)
        ref = model.unit_logprobs(UnitTokenizer(K).encode(units))
        scorer = IncrementalScorer(model, chunk=rng.choice([7, 256]))  # small chunk: long blocks get split
        got, i = [], 0
        while i < len(units):
            n = rng.randint(0, 20)
            got.append(scorer.push(units[i : i + n]))
            i += n
        got = torch.cat(got)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
        assert scorer.total_logprob == pytest.approx(model.loglikelihood(UnitTokenizer(K).encode(units)), rel=1e-5)
        assert scorer.num_units == len(units)
        # after a reset the stream starts again from BOS
        scorer.reset()
        torch.testing.assert_close(scorer.push(units[:5]), ref[:5], rtol=1e-5, atol=1e-4)


def test_sliding_window_matches_hf_mistral_sliding_window(model):
    W = 12
    units = random_units(70, 3)
    ids = UnitTokenizer(K).encode(units)
    ref = hf_unit_logprobs(hf_mistral(model, sliding_window=W), ids)
    scorer = IncrementalScorer(model, max_context=W, chunk=5)
    rng = random.Random(0)
    got, i = [], 0
    while i < len(units):
        n = rng.randint(1, 9)
        got.append(scorer.push(units[i : i + n]))
        i += n
    got = torch.cat(got)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    full = model.unit_logprobs(ids)
    torch.testing.assert_close(got[:W], full[:W], rtol=1e-5, atol=1e-4)  # exact while <= W units
    assert float((got[W + 5 :] - full[W + 5 :]).abs().max()) > 1e-3  # and it does differ later


def test_window_state_is_bounded_and_positions_past_8000_are_relative(model):
    W, tail = 16, 60
    shifted = IncrementalScorer(model, max_context=W, chunk=512)
    for start in range(0, 8200, 512):
        shifted.push(random_units(min(512, 8200 - start), 100 + start))
    nbytes = shifted.state_nbytes
    tail_units = random_units(tail, 7)
    late = shifted.push(tail_units)
    assert int(shifted.cache.next_pos[0]) > 8000 + tail
    assert shifted.state_nbytes == nbytes  # bounded: capacity W - 1 + chunk, never grows
    # Same tail at small positions: once the receptive field n_layers * (W - 1) holds only tail units, the
    # scores agree (RoPE depends on position differences only; fp32 angle rounding at ~8000 rad stays tiny).
    start = IncrementalScorer(model, max_context=W).push(tail_units)
    far = model.config.n_layers * (W - 1) + 1
    torch.testing.assert_close(late[far:], start[far:], rtol=0, atol=1e-4)
    assert float((late[:far] - start[:far]).abs().max()) > 1e-2  # before that, the different histories show


def test_score_blocks_equals_one_by_one(model):
    """Scorers sharing a pool run their blocks in one forward over the pool's rows; each scores what it scores alone
    (batch-1, its own pool), with and without a window (60 units: far past W = 9), with rows left idle in the span
    (blocks of 0), streams of different lengths, and long blocks split into chunks."""
    streams = [random_units(60, 20 + s) for s in range(4)]
    for max_context in (None, 9):
        solo = [IncrementalScorer(model, max_context=max_context, chunk=5) for _ in streams]
        pool = ScoringPool(model, max_context, chunk=5)
        batch = [IncrementalScorer(model, max_context=max_context, chunk=5, pool=pool) for _ in streams]
        storage = pool.cache.k.data_ptr()
        rng = random.Random(1)
        pos = [0] * len(streams)
        for _ in range(8):
            blocks = []
            for j, s in enumerate(streams):
                n = rng.choice([0, 1, 3, 8]) if j else rng.choice([0, 12])  # stream 0 runs ahead
                blocks.append(s[pos[j] : pos[j] + n])
                pos[j] += n
            expected = [sc.push(b) for sc, b in zip(solo, blocks)]
            got = score_blocks(batch, blocks)
            for e, g in zip(expected, got):
                torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-4)
            if max_context is not None:  # fixed capacity: every step wrote into the same storage, nothing copied
                assert pool.cache.k.data_ptr() == storage
        assert len(set(pos)) > 1 and max(pos) > 9
        assert [s.total_logprob for s in batch] == pytest.approx([s.total_logprob for s in solo], rel=1e-5)
        assert pool.num_rows == 4 and pool.cache.batch_size == 4


def test_scoring_pool_lends_rows_and_reclaims_them(model):
    """Rows come and go (closed, reset, garbage-collected scorers; the last row moves into a hole) without
    changing anyone's scores; the pool's rows stay within 4x of the live ones."""
    pool = ScoringPool(model, 9, chunk=5)
    streams = [random_units(40, 40 + s) for s in range(5)]
    solo = [IncrementalScorer(model, max_context=9, chunk=5) for _ in streams]
    live = [IncrementalScorer(model, max_context=9, chunk=5, pool=pool) for _ in streams]
    assert pool.cache.batch_size == 8  # doubled as they attached: 1, 2, 4, 8

    def step(a, b, idx):
        blocks = [streams[j][a:b] for j in idx]
        expected = [solo[j].push(blk) for j, blk in zip(idx, blocks)]
        got = score_blocks([live[j] for j in idx], blocks)
        for e, g in zip(expected, got):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-4)

    step(0, 7, range(5))
    live[1].close()  # row 1 is freed: the last row (stream 4) moves into it
    assert pool.num_rows == 4 and live[4]._row == 1 and live[1].cache is None and live[1].state_nbytes == 0
    with pytest.raises(InvalidInput, match="closed"):
        live[1].push([1])
    step(7, 15, [0, 2, 3, 4])
    live[2] = None  # dropped without close(): reclaimed at the pool's next operation
    import gc

    gc.collect()
    step(15, 20, [0, 3, 4])
    assert pool.num_rows == 3
    live[1].reset()  # a new stream on a fresh row
    solo[1].reset()
    step(0, 6, [1])
    step(20, 30, [0, 1, 3, 4])
    for j in (0, 1, 3):
        live[j].close()
    assert pool.num_rows == 1 and pool.cache.batch_size == 2  # shrunk by half once <= a quarter was used
    step(30, 40, [4])


def test_unwindowed_pool_grows_and_shrinks_its_slots(model):
    pool = ScoringPool(model, None, chunk=4)
    a = IncrementalScorer(model, chunk=4, pool=pool)
    b = IncrementalScorer(model, chunk=4, pool=pool)
    long, short = random_units(70, 1), random_units(3, 2)
    got = score_blocks([a, b], [long, short])
    torch.testing.assert_close(got[0], IncrementalScorer(model).push(long), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got[1], IncrementalScorer(model).push(short), rtol=1e-5, atol=1e-4)
    assert pool.cache.capacity >= 71
    a.close()  # the longest stream leaves: the slots shrink (by half per release while <= a quarter is used)
    assert pool.cache.capacity < 71 and b.cache.lengths[0] == 4
    torch.testing.assert_close(b.push(long[:5]), IncrementalScorer(model).push(short + long[:5])[3:],
                               rtol=1e-5, atol=1e-4)


def test_last_scorer_of_a_pool_closes_after_a_long_stream(model):
    """A scorer alone in its pool (the CLI's batch-1 path) scores past the starting capacity, then closes: its row is
    emptied, so the pool shrinks back instead of refusing to drop the slots the freed row once held; a new scorer
    on the same pool starts from nothing."""
    pool = ScoringPool(model, None, chunk=4)
    a = IncrementalScorer(model, chunk=4, pool=pool)
    long = random_units(70, 3)
    a.push(long)
    assert pool.cache.capacity >= 71
    a.close()
    assert pool.cache.capacity < 71 and int(pool.cache.lengths.max(initial=0)) == 0
    b = IncrementalScorer(model, chunk=4, pool=pool)
    torch.testing.assert_close(b.push(long[:9]), IncrementalScorer(model).push(long[:9]), rtol=1e-5, atol=1e-4)


def test_loglikelihood_batch_equals_per_utterance(model):
    tok = UnitTokenizer(K)
    batch = [tok.encode(random_units(n, n)) for n in (17, 1, 0, 64, 5)]
    got = model.loglikelihood_batch(batch)
    assert got == pytest.approx([model.loglikelihood(ids) for ids in batch], rel=1e-5, abs=1e-5)
    assert got[2] == 0.0


def test_tokenizer_semantics():
    tok = UnitTokenizer(K)
    ids = tok.encode([0, 5, 499])
    assert ids.tolist() == [0, 1, 6, 500] and ids.dtype == torch.int64
    empty = tok.encode([])
    assert empty.tolist() == [0] and empty.dtype == torch.int64  # upstream gives float [0.]
    assert tok.decode(torch.tensor([0, 1, 6, 0, 500])) == [0, 5, 499]  # every BOS dropped
    assert tok.encode(torch.tensor([3, 4])).tolist() == [0, 4, 5]
    with pytest.raises(InvalidInput, match="0..499"):
        tok.encode([500])
    with pytest.raises(InvalidInput):
        tok.encode([-1])
    with pytest.raises(InvalidInput, match="integers"):
        tok.encode([1.5, 2.0])
    with pytest.raises(InvalidInput, match="1-D"):
        tok.encode([[1, 2]])
    assert UnitTokenizer().encode([100000]).tolist() == [0, 100001]  # K unknown: no upper bound


# ----- checkpoint format -----

UPSTREAM_MODEL_ARGS = ["dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "dropout", "norm_eps",
                       "vocab_size", "rope_theta"]


def upstream_keys(n_layers):
    keys = ["tok_embeddings.weight", "norm.weight", "output.weight"]
    for i in range(n_layers):
        keys += [f"layers.{i}.attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")]
        keys += [f"layers.{i}.feed_forward.{w}.weight" for w in ("w1", "w2", "w3")]
        keys += [f"layers.{i}.attention_norm.weight", f"layers.{i}.ffn_norm.weight"]
    return keys


def saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_checkpoint_round_trip_in_upstream_format(model):
    data = saved(ulm.checkpoint_dict(model))
    ckpt = torch.load(io.BytesIO(data), weights_only=True)
    assert list(ckpt) == ["model_args", "model_state_dict"]
    assert list(ckpt["model_args"]) == UPSTREAM_MODEL_ARGS
    assert sorted(ckpt["model_state_dict"]) == sorted(upstream_keys(model.config.n_layers))
    assert all(v.dtype == torch.float32 for v in ckpt["model_state_dict"].values())
    loaded = ulm.load_checkpoint(io.BytesIO(data))
    assert not loaded.training and loaded.dtype == torch.float32 and loaded.device.type == "cpu"
    loaded = loaded.to(model.device)  # same kernels as the model: the same result, bit for bit
    ids = UnitTokenizer(K).encode(random_units(30, 4))
    assert loaded.loglikelihood(ids) == model.loglikelihood(ids)
    assert ulm.ULMConfig.from_dict(ckpt["model_args"]) == model.config
    # The full-size state dict has the 111 tensors of the release.
    with torch.device("meta"):
        assert len(ULM(ulm.FULL).state_dict()) == 111 == len(upstream_keys(12))


def test_from_dict_ignores_training_only_fields():
    d = ulm.FULL.to_dict()
    del d["dropout"]
    d["some_future_field"] = 1
    assert ulm.ULMConfig.from_dict(d) == ulm.FULL
    del d["vocab_size"]
    with pytest.raises(CheckpointError, match="vocab_size"):
        ulm.ULMConfig.from_dict(d)


def test_strict_loading_errors(model):
    good = ulm.checkpoint_dict(model)

    def broken(edit):
        ckpt = {"model_args": dict(good["model_args"]), "model_state_dict": dict(good["model_state_dict"])}
        edit(ckpt)
        return ckpt

    cases = [
        (lambda c: c["model_state_dict"].pop("layers.1.feed_forward.w3.weight"), "layers.1.feed_forward.w3.weight"),
        (lambda c: c["model_state_dict"].__setitem__("output.bias", torch.zeros(K + 1)), "output.bias"),
        (lambda c: c["model_state_dict"].__setitem__("norm.weight", torch.ones(3)), "norm.weight"),
        (lambda c: c["model_args"].__setitem__("vocab_size", 1001), "tok_embeddings.weight"),
        (lambda c: c["model_args"].pop("n_heads"), "n_heads"),
        (lambda c: c.pop("model_state_dict"), "model_state_dict"),
        (lambda c: c["model_state_dict"].__setitem__("norm.weight", torch.ones(64, dtype=torch.long)), "norm.weight"),
    ]
    for edit, needle in cases:
        with pytest.raises(CheckpointError, match=needle.replace(".", r"\.")):
            ulm.load_checkpoint_dict(broken(edit))
    with pytest.raises(CheckpointError):
        ulm.load_checkpoint_dict([1, 2, 3])


def test_corrupt_and_truncated_files(model, tmp_path):
    data = saved(ulm.checkpoint_dict(model))
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all" * 10)
    for name in ("trunc.pt", "junk.pt"):
        with pytest.raises(CheckpointError, match="corrupt or truncated"):
            ulm.load_checkpoint(tmp_path / name)


def test_half_precision_weights_load_as_fp32(model):
    ckpt = ulm.checkpoint_dict(model)
    ckpt["model_state_dict"] = {k: v.to(torch.bfloat16) for k, v in ckpt["model_state_dict"].items()}
    loaded = ulm.load_checkpoint_dict(ckpt)
    assert loaded.dtype == torch.float32
    ids = UnitTokenizer(K).encode(random_units(20, 5))
    assert loaded.loglikelihood(ids) == pytest.approx(model.loglikelihood(ids), rel=2e-2)


def test_bf16_model_runs_with_fp32_rotary_and_logits(model):
    ids = UnitTokenizer(K).encode(random_units(50, 6))
    m16 = random_ulm().to(model.device, torch.bfloat16)
    with torch.no_grad():
        assert m16(ids[None].to(model.device)).dtype == torch.float32
    assert m16.loglikelihood(ids) == pytest.approx(model.loglikelihood(ids), rel=3e-2)
    scorer = IncrementalScorer(m16)
    got = torch.cat([scorer.push(random_units(50, 6)[i : i + 10]) for i in range(0, 50, 10)])
    assert float(got.sum()) == pytest.approx(m16.loglikelihood(ids), rel=3e-2)


@pytest.mark.parametrize(
    "k,expected", [(100, 201_559_040), (200, 201_763_840), (500, 202_378_240), (1000, 203_402_240)]
)
def test_full_size_parameter_counts(k, expected):
    with torch.device("meta"):
        m = ULM(ulm.config_for_k(k))
    assert sum(p.numel() for p in m.parameters()) == expected


def test_tiny_keeps_semantics():
    for f in ("vocab_size", "rope_theta", "norm_eps"):
        assert getattr(ulm.TINY, f) == getattr(ulm.FULL, f)
    assert dataclasses.replace(ulm.TINY, dim=ulm.FULL.dim) != ulm.FULL  # only widths differ


def test_bad_inputs(model):
    with pytest.raises(InvalidInput, match="1-D"):
        model.loglikelihood(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(InvalidInput, match="integers"):
        model.loglikelihood(torch.tensor([0.0, 1.0]))
    with pytest.raises(InvalidInput, match="0..500"):
        model.loglikelihood(torch.tensor([0, 501]))
    with pytest.raises(InvalidInput, match="empty"):
        model.loglikelihood(torch.tensor([], dtype=torch.long))
    scorer = IncrementalScorer(model)
    with pytest.raises(InvalidInput, match="0..499"):
        scorer.push([3, 500])
    with pytest.raises(InvalidInput, match="integers"):
        scorer.push([0.5])
    assert scorer.push([]).shape == (0,) and scorer.num_units == 0
    with pytest.raises(InvalidInput):
        IncrementalScorer(model, max_context=0)
    with pytest.raises(InvalidInput, match="more than once"):
        score_blocks([scorer, scorer], [[1], [2]])
    with pytest.raises(InvalidInput, match="pool must hold"):
        IncrementalScorer(model, max_context=5, pool=scorer.pool)
    with pytest.raises(InvalidInput):
        ScoringPool(model, chunk=0)
    other = IncrementalScorer(model, max_context=5)  # scorers of different pools: one forward per pool
    got = score_blocks([scorer, other], [[1, 2], [3]])
    assert [len(g) for g in got] == [2, 1] and other.num_units == 1
    with pytest.raises(InvalidInput):
        ulm.config_for_k(0)
