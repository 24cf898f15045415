"""ELLA-V: vocabulary and sequence format, generate's control flow, determinism, batching, checkpoint format."""

import io
import random
from fractions import Fraction

import pytest
import torch

from dpslm_stream.errors import CheckpointError, InvalidInput
from dpslm_stream.models import ellav
from dpslm_stream.models.ellav import ELLAV, ELLAVTokenizer, GenerationState, generation_step, sample

K, C = 500, 4096
UNK, BOS, EOP, EOS = 0, 1, 2, 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok() -> ELLAVTokenizer:
    return ELLAVTokenizer.for_units(K)


@pytest.fixture(scope="module")
def model(device) -> ELLAV:
    """The model under test, on the test device (DPSLM_TEST_DEVICE)."""
    torch.manual_seed(0)
    return ellav.random_model(K, ellav.TINY).to(device)


@pytest.fixture(scope="module")
def model64(model, device) -> ELLAV:
    # float64 for exact-equality checks between code paths that round differently (prefill vs decode, batch sizes)
    torch.manual_seed(0)
    return ellav.random_model(K, ellav.TINY).to(device, torch.float64)


# ----- vocabulary and sequence format, against builds written here from the spec's rules (ellav.md §3) -----


def spec_vocab(k):
    vocab = {"UNK": 0, "BOS": 1, "EOP": 2, "EOS": 3}
    for rank, s in enumerate(sorted(f"u{i}" for i in range(k))):  # lexicographic string order
        vocab[s] = 4 + rank
    vocab.update({str(c): 4 + k + c for c in range(C)})
    return vocab


def test_vocabulary_order(tok):
    assert tok.token_to_id_dict == spec_vocab(K)
    d = tok.token_to_id_dict
    assert [d[t] for t in ("u0", "u1", "u10", "u100", "u101", "u2", "u499")] == [4, 5, 6, 7, 8, 116, 448]
    assert d["0"] == 504 and d["4095"] == 4599 and tok.vocab_size == 4600
    assert ELLAVTokenizer.for_units(100).token_to_id_dict == spec_vocab(100)
    assert tok.unit_token_ids([0, 2, 10]) == [4, 116, 6]  # id != 4 + unit


def spec_train_ids(tok, frames, codes, rate_p=50, rate_c=40, dropped=()):
    """Training ids built differently from the tokenizer: assign each codec frame to the run containing its time."""
    runs, a = [], 0
    while a < len(frames):
        b = a
        while b < len(frames) and frames[b] == frames[a]:
            b += 1
        runs.append((frames[a], a, b))
        a = b
    kept = [r for r in runs if r[0] not in dropped]
    out = [r[0] for r in kept] + ["BOS"]
    j = 0
    for phone, a, b in runs:
        keep = phone not in dropped
        if keep:
            out.append(phone)
        # frame j at j/rate_c lies in [a/rate_p, b/rate_p)
        while j < len(codes) and Fraction(j, rate_c) < Fraction(b, rate_p):
            out.append(str(codes[j]))
            j += 1
        if keep:
            out.append("EOP")
    out += [str(c) for c in codes[j:]] + ["EOS"]
    return [tok.token_to_id_dict.get(t, 0) for t in out]


def test_sequence_format_spec_example(tok):
    frames = ["u1"] * 3 + ["u2"] + ["u3"] * 4 + ["u4"] * 2
    codes = list(range(8))
    expected = "u1 u2 u3 u4 BOS u1 0 1 2 EOP u2 3 EOP u3 4 5 6 EOP u4 7 EOP EOS".split()
    assert tok.encode_train(frames, codes) == [tok.token_to_id_dict[t] for t in expected]


def test_sequence_format_random(tok):
    rng = random.Random(0)
    for _ in range(200):
        frames = []
        while len(frames) < rng.randint(1, 60):
            frames += [f"u{rng.randint(0, 12)}"] * rng.randint(1, 7)
        n_codes = round(len(frames) * 40 / 50) + rng.randint(-3, 3)
        codes = [rng.randint(0, C - 1) for _ in range(max(n_codes, 0))]
        assert tok.encode_train(frames, codes, strict=False) == spec_train_ids(tok, frames, codes)


def test_sequence_format_drops_tokens_not_to_sandwich():
    phones = ["AA", "B", "SIL", "K"]
    ptok = ELLAVTokenizer.from_phone_vocab(phones, 50, C, 40)  # default tokens_not_to_sandwich: UNK, SIL
    assert ptok.token_to_id_dict["AA"] == 4 and ptok.token_to_id_dict["UNK"] == 0
    rng = random.Random(1)
    for _ in range(100):
        frames = []
        while len(frames) < 40:
            frames += [rng.choice(["AA", "B", "SIL", "K", "ZZ"])] * rng.randint(1, 6)  # ZZ: not in vocab -> UNK
        codes = [rng.randint(0, C - 1) for _ in range(len(frames) * 4 // 5)]
        assert ptok.encode_train(frames, codes) == spec_train_ids(ptok, frames, codes, dropped=("UNK", "SIL"))
    with pytest.raises(InvalidInput, match="agree"):
        ptok.encode_train(["AA"] * 50, [0] * 10)


def test_prompt_format(tok):
    units = [7, 7, 3, 12, 12, 12, 7]
    ids = tok.encode_prompt(units)
    assert ids == tok.encode_infer([f"u{u}" for u in units])
    assert ids == tok.unit_token_ids([7, 3, 12, 7]) + [BOS] + tok.unit_token_ids([7])
    # With a teacher-forced prefix the prompt is the training sequence cut after the next interleaved unit.
    frames = ["u7"] * 4 + ["u3"] * 2 + ["u12"] * 5 + ["u7"] * 3
    codes = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]
    train = tok.encode_train(frames, codes)
    per_unit = [[11, 12, 13, 14], [15], [16, 17, 18, 19], [20, 21]]  # frame j at j/40 within [a/50, b/50)
    for c in range(4):
        prompt = tok.encode_prompt(units, codec_prefix=per_unit[:c])
        cut = 4 + 1 + sum(len(p) + 2 for p in per_unit[:c]) + 1
        assert prompt == train[:cut]


# ----- generate's control flow on hand-built logits -----


class Scripted(ELLAV):
    """ELLA-V whose logits come from a policy: policy(row, history) -> the token it puts all the mass on."""

    def __init__(self, policy):
        super().__init__(ellav.TINY, ELLAVTokenizer.for_units(K))
        self.policy = policy

    def generate_tokens(self, prompts, *args, **kwargs):
        self.history = [[] for _ in prompts]  # every token the network is fed, per row
        return super().generate_tokens(prompts, *args, **kwargs)

    def forward(self, tokens, cache=None, valid=None):
        B, T = tokens.shape
        valid = [T] * B if valid is None else valid.tolist()
        logits = torch.full((B, T, self.config.vocab_size), -30.0, device=tokens.device)
        for b in range(B):
            for t in range(valid[b]):
                self.history[b].append(int(tokens[b, t]))
                logits[b, t, self.policy(b, list(self.history[b]))] = 0.0
        return logits


def reference_generate(prompts, policy, M, max_tokens):
    """Slow, scalar re-statement of the upstream loop (ellav.md §4), for hand-built policies."""
    N = [len(p) - 2 for p in prompts]
    hist = [list(p) for p in prompts]
    since, idx, forced = [0] * len(prompts), [0] * len(prompts), [None] * len(prompts)
    out = [[] for _ in prompts]
    finished = [False] * len(prompts)
    for _ in range(max_tokens):
        step = [forced[b] if forced[b] is not None else policy(b, hist[b]) for b in range(len(prompts))]
        for b, t in enumerate(step):
            since[b] = 0 if t == EOP else since[b] + 1
            idx[b] += t == EOP
            finished[b] = idx[b] >= N[b]
            if finished[b]:
                forced[b] = EOS  # upstream ties EOS and EOP at 1e9 here; decode drops both
            elif since[b] > M + 1:
                forced[b] = EOP
            elif t == EOP:
                forced[b] = prompts[b][idx[b]]
            else:
                forced[b] = None
        if all(finished):
            break
        for b, t in enumerate(step):
            out[b].append(t)
            hist[b].append(t)
    return out, finished


def codec(c):
    return 4 + K + c


@pytest.fixture(scope="module")
def scripted(device):
    """Scripted(policy) on the test device: generate's control flow runs there (its logits are built there)."""
    return lambda policy: Scripted(policy).to(device)


def test_per_unit_cap_and_forced_units(tok, scripted):
    M = 2
    m = scripted(lambda b, h: codec(7))  # the model never ends a unit by itself
    raw, fin = m.generate_tokens([[5, 9, 9, 1]], 100, M, 1.0, 0.8)
    u9, u1 = tok.unit_token_ids([9, 1])
    c7 = codec(7)
    assert raw == [[c7] * (M + 2) + [EOP, u9] + [c7] * (M + 1) + [EOP, u1] + [c7] * (M + 1)] and fin == [True]
    codes, fin = m.generate_ids([[5, 9, 9, 1]], 100, M, 1.0, 0.8)
    assert codes == [[7] * (3 * M + 4)] and fin == [True]


def test_zero_length_units_and_model_eos_does_not_stop(tok, scripted):
    m = scripted(lambda b, h: EOP)
    raw, fin = m.generate_tokens([[4, 8, 15]], 100, 10, 1.0, 0.8)
    assert raw == [[EOP] + tok.unit_token_ids([8]) + [EOP] + tok.unit_token_ids([15])] and fin == [True]
    m = scripted(lambda b, h: EOS)
    raw, fin = m.generate_tokens([[4, 8]], 100, 1, 1.0, 0.8)
    assert raw == [[EOS, EOS, EOS, EOP] + tok.unit_token_ids([8]) + [EOS, EOS]] and fin == [True]


def test_max_tokens_cuts_and_flags_unfinished(scripted):
    m = scripted(lambda b, h: codec(1))
    codes, fin = m.generate_ids([[1, 2, 3]], 5, 10, 1.0, 0.8)
    assert codes == [[1] * 5] and fin == [False]
    codes, fin = m.generate_ids([[1, 2, 3]], 0, 10, 1.0, 0.8)
    assert codes == [[]] and fin == [False]
    # a single unit whose first token is EOP: nothing is generated, the row is finished (upstream: ([], []))
    codes, fin = scripted(lambda b, h: EOP).generate_ids([[3]], 10, 10, 1.0, 0.8)
    assert codes == [[]] and fin == [True]


def test_control_flow_matches_reference_on_random_policies(tok, scripted):
    for seed in range(12):
        rng = random.Random(seed)
        choices = [codec(rng.randint(0, C - 1)) for _ in range(5)] + [EOP] * 2
        choices += [EOS, BOS, UNK, 4 + rng.randint(0, K - 1)]  # stray tokens a model could emit

        def policy(b, h, seed=seed):
            return random.Random(hash((seed, b, len(h), h[-1]))).choice(choices)

        prompts = [[rng.randint(0, K - 1) for _ in range(rng.randint(1, 6))] for _ in range(rng.randint(1, 4))]
        M, max_tokens = rng.randint(0, 4), rng.randint(0, 40)
        raw, fin = scripted(policy).generate_tokens(prompts, max_tokens, M, 1.0, 0.8)
        enc = [tok.encode_prompt(p) for p in prompts]
        ref_raw, ref_fin = reference_generate(enc, policy, M, max_tokens)
        assert raw == ref_raw and fin == ref_fin


def test_teacher_forced_prefix_restarts_counter_and_unit_index(tok, scripted):
    M = 3
    m = scripted(lambda b, h: codec(5))
    raw, fin = m.generate_tokens([[1, 2, 3]], 100, M, 1.0, 0.8, codec_prefix=[[[9, 9]]])
    u3 = tok.unit_token_ids([3])[0]
    assert raw == [[codec(5)] * (M + 1) + [EOP, u3] + [codec(5)] * (M + 1)] and fin == [True]
    prompt = tok.unit_token_ids([1, 2, 3]) + [BOS] + tok.unit_token_ids([1]) + [codec(9), codec(9), EOP]
    assert m.history[0][:8] == prompt


def test_generation_step_on_hand_built_logits(tok, device):
    V = tok.vocab_size
    state = GenerationState.start([tok.unit_token_ids([1, 2]), tok.unit_token_ids([3])], [0, 0], device=device)
    logits = torch.full((2, V), -1e4, device=device)
    logits[0, EOP] = 0  # row 0 ends unit 1
    logits[1, codec(4)] = 0
    t = generation_step(logits, state, max_codec_tokens_per_phone=0, temperature=0.0, top_p=1.0)
    assert t.tolist() == [EOP, codec(4)]
    assert state.forced.tolist() == [tok.unit_token_ids([2])[0], -1] and state.unit_idx.tolist() == [1, 0]
    t = generation_step(logits, state, max_codec_tokens_per_phone=0, temperature=0.0, top_p=1.0)
    assert t.tolist() == [tok.unit_token_ids([2])[0], codec(4)]  # forced unit beats the logits
    assert state.since_eop.tolist() == [1, 2] and state.forced.tolist() == [-1, EOP]  # M+2 = 2 for the first unit


def test_sample_nucleus_and_greedy(device):
    probs = torch.tensor([[0.2, 0.5, 0.3]], device=device)
    logits = probs.log()
    assert sample(logits, 1.0, 0.0).tolist() == [1]
    assert sample(logits, 0.0, 0.9).tolist() == [1]
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([sample(logits.expand(1000, 3), 1.0, 0.6, g) for _ in range(4)])
    counts = torch.bincount(draws, minlength=3).float() / draws.numel()
    assert counts[0] == 0  # outside the nucleus {1, 2} (0.5 then 0.3 crosses 0.6)
    assert abs(float(counts[1]) - 0.5 / 0.8) < 0.03


# ----- the real (tiny, random) network -----

PROMPTS = [[12, 7, 7, 300, 41, 41, 2], [5], [499, 0, 10, 100, 11]]


def test_greedy_is_deterministic_and_batched_equals_one_by_one(model64):
    batched, fin = model64.generate_ids(PROMPTS, 60, 4, 1.0, 0.0)
    again, _ = model64.generate_ids(PROMPTS, 60, 4, 1.0, 0.0)
    assert batched == again
    for p, codes, f in zip(PROMPTS, batched, fin):
        one, one_fin = model64.generate_ids([p], 60, 4, 1.0, 0.0)
        assert one == [codes] and one_fin == [f]
    assert any(len(c) > 0 for c in batched)


def test_seeded_sampling_is_reproducible(model):
    a = model.generate_ids(PROMPTS, 40, 10, 1.0, 0.8, generator=torch.Generator().manual_seed(3))
    b = model.generate_ids(PROMPTS, 40, 10, 1.0, 0.8, generator=torch.Generator().manual_seed(3))
    c = model.generate_ids(PROMPTS, 40, 10, 1.0, 0.8, generator=torch.Generator().manual_seed(4))
    assert a == b and a != c


def test_token_prefix_continues_offline_generation(model64, tok):
    units = [12, 7, 300, 41, 2, 9]
    raw, fin = model64.generate_tokens([units], 200, 4, 1.0, 0.0)
    runs, groups = tok.split_units(raw[0], raw=True), tok.split_units(raw[0])
    assert fin == [True] and len(runs) == len(groups) == len(units)
    assert any(t < tok.first_codec_id for run in runs for t in run)  # the random model emits non-codec tokens too
    for c in (1, 3, 5):
        rest, fin_c = model64.generate_tokens([units], 200, 4, 1.0, 0.0, token_prefix=[runs[:c]])
        assert tok.split_units(rest[0], raw=True) == runs[c:] and fin_c == [True]
        codes, _ = model64.generate_ids([units], 200, 4, 1.0, 0.0, token_prefix=[runs[:c]])
        assert codes == [sum(groups[c:], [])]
    # codec_prefix builds the prompt from codec ids alone
    prompt = tok.encode_prompt(units, codec_prefix=groups[:2])
    codec_only = [[t for t in run if t >= tok.first_codec_id] for run in runs[:2]]
    assert prompt == tok.encode_prompt(units, token_prefix=codec_only)


def test_generation_positions_continue_per_row(model64):
    # A prompt padded in a batch must see exactly the positions it sees alone: compare the first-step logits.
    tok = model64.tokenizer
    short, long_ = tok.encode_prompt([5]), tok.encode_prompt(PROMPTS[0])
    dev = model64.device
    with torch.no_grad():
        alone = model64(torch.tensor([short], device=dev))[0, -1]
        cache = model64.new_cache(2, len(long_) + 1)
        tokens = torch.zeros((2, len(long_)), dtype=torch.long, device=dev)
        tokens[0, : len(short)], tokens[1] = torch.tensor(short, device=dev), torch.tensor(long_, device=dev)
        both = model64(tokens, cache, torch.tensor([len(short), len(long_)], device=dev))
    torch.testing.assert_close(both[0, len(short) - 1], alone, rtol=1e-9, atol=1e-9)


# ----- checkpoint format -----

MODEL_ARGS = ["dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "norm_eps", "vocab_size",
              "rope_theta", "max_batch_size"]
TOKENIZER_FIELDS = ["token_to_id_dict", "num_phone_types", "phone_token_rate", "num_codec_types", "codec_token_rate",
                    "tokens_not_to_sandwich", "num_special_types", "UNK_token", "BOS_token", "EOP_token", "EOS_token",
                    "UNK_id", "BOS_id", "EOP_id", "EOS_id"]


def upstream_keys(n_layers):
    keys = ["tok_embeddings.weight", "norm.weight", "output.weight", "output.bias"]
    for i in range(n_layers):
        keys += [f"layers.{i}.attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")]
        keys += [f"layers.{i}.feed_forward.{w}.weight" for w in ("w1", "w2", "w3")]
        keys += [f"layers.{i}.attention_norm.weight", f"layers.{i}.ffn_norm.weight"]
    return keys


def test_checkpoint_round_trip_in_upstream_format(model):
    buf = io.BytesIO()
    torch.save(ellav.checkpoint_dict(model), buf)
    ckpt = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    assert list(ckpt) == ["model_args", "tokenizer", "model_state"]
    assert list(ckpt["model_args"]) == MODEL_ARGS
    assert list(ckpt["tokenizer"]) == TOKENIZER_FIELDS
    assert ckpt["tokenizer"]["tokens_not_to_sandwich"] == [] and ckpt["tokenizer"]["phone_token_rate"] == 50
    assert sorted(ckpt["model_state"]) == sorted(upstream_keys(model.config.n_layers))
    assert all(v.dtype == torch.float32 for v in ckpt["model_state"].values())
    loaded = ellav.load_checkpoint(io.BytesIO(buf.getvalue())).to(model.device)  # same kernels: same greedy ids
    assert not loaded.training and loaded.tokenizer.token_to_id_dict == model.tokenizer.token_to_id_dict
    assert loaded.generate_ids(PROMPTS, 30, 4, 1.0, 0.0) == model.generate_ids(PROMPTS, 30, 4, 1.0, 0.0)
    with torch.device("meta"):
        assert len(ELLAV(ellav.FULL, ELLAVTokenizer.for_units(K)).state_dict()) == 112 == len(upstream_keys(12))


def test_strict_loading_errors(model):
    good = ellav.checkpoint_dict(model)

    def load(edit):
        ckpt = {k: dict(v) for k, v in good.items()}
        edit(ckpt)
        return ellav.load_checkpoint_dict(ckpt)

    with pytest.raises(CheckpointError, match=r"output\.bias"):
        load(lambda c: c["model_state"].pop("output.bias"))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight"):
        load(lambda c: c["model_state"].__setitem__("model.norm.weight", c["model_state"].pop("norm.weight")))
    with pytest.raises(CheckpointError, match="vocab_size"):
        load(lambda c: c["model_args"].__setitem__("vocab_size", 4601))
    with pytest.raises(CheckpointError, match="tokenizer"):
        load(lambda c: c["tokenizer"]["token_to_id_dict"].pop("u3"))
    with pytest.raises(CheckpointError, match="EOP_id"):
        load(lambda c: c["tokenizer"].__setitem__("EOP_id", 5))
    with pytest.raises(CheckpointError, match="model_state"):
        load(lambda c: c.pop("model_state"))
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        ellav.load_checkpoint(io.BytesIO(b"\x00" * 100))


@pytest.mark.parametrize(
    "k,expected", [(100, 209_957_992), (200, 210_162_892), (500, 210_777_592), (1000, 211_802_092)]
)
def test_full_size_parameter_counts(k, expected):
    with torch.device("meta"):
        m = ELLAV(ellav.config_for_k(k), ELLAVTokenizer.for_units(k))
    assert sum(p.numel() for p in m.parameters()) == expected


def test_bad_inputs(model):
    ok = dict(max_tokens=10, max_codec_tokens_per_phone=10, temperature=1.0, top_p=0.8)
    with pytest.raises(InvalidInput, match="empty"):
        model.generate_ids([[]], **ok)
    with pytest.raises(InvalidInput, match="non-empty"):
        model.generate_ids([], **ok)
    with pytest.raises(InvalidInput, match="0..499"):
        model.generate_ids([[1, 500]], **ok)
    with pytest.raises(InvalidInput, match="0..499"):
        model.generate_ids([[-1]], **ok)
    with pytest.raises(InvalidInput, match="integers"):
        model.generate_ids([[1.0, 2.0]], **ok)
    with pytest.raises(InvalidInput, match="top_p"):
        model.generate_ids([[1]], **{**ok, "top_p": 1.5})
    with pytest.raises(InvalidInput, match="temperature"):
        model.generate_ids([[1]], **{**ok, "temperature": -1.0})
    with pytest.raises(InvalidInput, match="max_tokens"):
        model.generate_ids([[1]], **{**ok, "max_tokens": -1})
    with pytest.raises(InvalidInput, match="at least one unit"):
        model.generate_ids([[1, 2]], **ok, codec_prefix=[[[1], [2]]])
    with pytest.raises(InvalidInput, match="codec id"):
        model.generate_ids([[1, 2]], **ok, codec_prefix=[[[4096]]])
    with pytest.raises(InvalidInput, match="entries"):
        model.generate_ids([[1, 2]], **ok, codec_prefix=[[[1]], [[2]]])
    with pytest.raises(InvalidInput, match="not both"):
        model.generate_ids([[1, 2]], **ok, codec_prefix=[[[1]]], token_prefix=[[[600]]])
    with pytest.raises(InvalidInput, match="EOP"):
        model.generate_ids([[1, 2]], **ok, token_prefix=[[[600, 2]]])
    with pytest.raises(InvalidInput):
        ellav.config_for_k(0)


def test_upstream_call_shape_string_prompts_and_tensor_codes(model64):
    """dp-slm's README calls generate([[f"u{u}" ...]] * 3, ...) and vocodes codec_ids[None, None, :]."""
    units = PROMPTS[0]
    codes, fin = model64.generate([[f"u{u}" for u in units]] * 2, 60, 4, 1.0, 0.0)
    ids, fin_ids = model64.generate_ids([units] * 2, 60, 4, 1.0, 0.0)
    assert all(isinstance(c, torch.Tensor) and c.dtype == torch.long for c in codes)
    assert [c.tolist() for c in codes] == ids and fin == fin_ids
    assert codes[0][None, None, :].shape == (1, 1, len(ids[0]))
    with pytest.raises(InvalidInput, match="u<id>"):
        model64.generate([["x12"]], 10, 4, 1.0, 0.0)
