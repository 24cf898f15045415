"""dpslm_stream.models.ellav at the edges the mutants of `make mutants MODULES=ellav` found untested
(docs/mutation.md): the batched per-row sampler `sample_rows` (what the streaming ELLA-V batch draws with) against a
slow reference written here, and the tokenizer's and generate's checks with their messages. Models have tiny RANDOM
weights."""

import numpy as np
import pytest
import torch

from dpslm_stream.errors import CheckpointError, InvalidInput
from dpslm_stream.models import ellav
from dpslm_stream.models.ellav import ELLAVTokenizer, GenerationState, generation_step, sample, sample_rows

K, C = 500, 4096
UNK, BOS, EOP, EOS = 0, 1, 2, 3
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reference_draw(logits, temperature, top_p, u):
    """Upstream's nucleus for one row, by hand: the most probable tokens up to and including the one whose
    cumulative probability crosses top_p, renormalised; inverse CDF at u."""
    probs = torch.softmax(logits.double() / temperature, -1).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept, total = [], 0.0
    for i in order:
        kept.append(i)
        total += probs[i]
        if total > top_p:
            break
    acc = 0.0
    for i in kept:
        acc += probs[i] / total
        if u < acc:
            return i
    return kept[-1]


def test_sample_rows_draws_each_row_by_its_own_settings():
    g = torch.Generator().manual_seed(0)
    V, B = 12, 64
    logits = torch.randn(B, V, generator=g) * 2
    temperature = torch.rand(B, generator=g) * 1.5 + 0.25
    top_p = torch.rand(B, generator=g)
    uniform = torch.rand(B, generator=g)
    greedy = torch.arange(B) % 5 == 0
    got = sample_rows(logits, greedy, temperature, top_p, uniform)
    for b in range(B):
        want = int(logits[b].argmax()) if greedy[b] else reference_draw(logits[b], float(temperature[b]),
                                                                       float(top_p[b]), float(uniform[b]))  # fmt: skip
        assert int(got[b]) == want, b


def test_sample_rows_frequencies_are_the_renormalised_nucleus():
    """Uniforms on a regular grid: each kept token is drawn in exactly its renormalised share, the token outside the
    nucleus never (0.5 then 0.3 crosses top_p = 0.6; 0.2 is cut)."""
    n = 1000
    logits = torch.tensor([0.2, 0.5, 0.3]).log().expand(n, 3)
    u = (torch.arange(n) + 0.5) / n
    drawn = sample_rows(logits, torch.zeros(n, dtype=torch.bool), torch.ones(n), torch.full((n,), 0.6), u)
    assert torch.bincount(drawn, minlength=3).tolist() == [0, 625, 375]
    everything = sample_rows(logits, torch.zeros(n, dtype=torch.bool), torch.ones(n), torch.ones(n), u)
    assert torch.bincount(everything, minlength=3).tolist() == [200, 500, 300]
    hot = sample_rows(logits, torch.zeros(n, dtype=torch.bool), torch.full((n,), 1e-3), torch.ones(n), u)
    assert hot.tolist() == [1] * n  # a tiny temperature is (numerically) greedy
    last = sample_rows(logits[:1], torch.tensor([False]), torch.ones(1), torch.ones(1), torch.tensor([0.99999994]))
    assert last.tolist() == [0]  # u just below 1: the least probable kept token, never past the vocabulary


# ----- the tokenizer's consistency checks -----


def small_vocab(k=3, codecs=4):
    """The vocabulary of ELLAVTokenizer.for_units(k, codecs), written out."""
    vocab = {"UNK": 0, "BOS": 1, "EOP": 2, "EOS": 3}
    vocab.update({s: 4 + r for r, s in enumerate(sorted(f"u{i}" for i in range(k)))})
    vocab.update({str(c): 4 + k + c for c in range(codecs)})
    return vocab


def test_small_unit_vocabulary_and_its_lookups():
    tok = ELLAVTokenizer.for_units(3, num_codec_types=4, phone_token_rate=25, codec_token_rate=75)
    assert tok.token_to_id_dict == small_vocab() and tok.vocab_size == 11 and tok.first_codec_id == 7
    assert (tok.num_phone_types, tok.num_codec_types, tok.phone_token_rate, tok.codec_token_rate) == (3, 4, 25, 75)
    assert tok.num_units == 3 and tok.phone_ranks == {} and tok.tokens_not_to_sandwich == []
    assert tok.unit_token_ids([2, 0]) == [6, 4] and tok.codec_token_ids([0, 3]) == [7, 10]
    assert tok.decode([7, 2, 5, 10, 3, 8]) == [0, 3, 1]
    assert tok.split_units([7, 8, EOP, 5, 9, EOP, 6]) == [[0, 1], [2], []]
    assert tok.split_units(torch.tensor([[7, EOP, 5, UNK, 9]]), raw=True) == [[7], [UNK, 9]]
    for bad, needle in [(3, r"unit 3 is not in the vocabulary: units must be integers in 0\.\.2"),
                        (True, "unit True is not"), ("u1", "unit 'u1' is not")]:  # fmt: skip
        with pytest.raises(InvalidInput, match=needle):
            tok.unit_token_ids([bad])
    for bad in (4, -1, True, 1.0):
        with pytest.raises(InvalidInput, match=r"codec id .* out of range: expected an integer in 0\.\.3"):
            tok.codec_token_ids([bad])
    for bad in (0, True, 2.0):
        with pytest.raises(InvalidInput, match="k must be a positive integer number of units"):
            ELLAVTokenizer.for_units(bad)
    assert ellav.config_for_k(3, ellav.TINY, num_codec_types=4).vocab_size == 11


@pytest.mark.parametrize("edit,needle", [
    (lambda d: d.pop("u1"), "token_to_id_dict has 10 tokens, expected 4 special \\+ 3 phone \\+ 4 codec"),
    (lambda d: d.update({"u1": 99}), "token ids must be exactly 0..vocab_size-1, each once"),
    (lambda d: d.update({"u1": 5.0}), "must map token strings to integer ids"),
    (lambda d: d.update({"u1": True}), "must map token strings to integer ids"),
    (lambda d: d.update({"u1": np.int64(5)}), "must map token strings to integer ids"),  # torch.save'd as plain ints
    (lambda d: d.update({"BOS": 2, "EOP": 1}), "special tokens must be"),
    (lambda d: d.update({"UNK": 3, "EOS": 0}), "special tokens must be"),
    (lambda d: d.update({"x": d.pop("3")}), "ids 7.. must be the codec tokens '0'..'3'"),
    (lambda d: d.update({"u0": 7, "0": 4}), "ids 7.. must be the codec tokens '0'..'3'"),
])  # fmt: skip
def test_tokenizer_refuses_inconsistent_vocabularies(edit, needle):
    vocab = small_vocab()
    edit(vocab)
    with pytest.raises(InvalidInput, match=needle):
        ELLAVTokenizer(vocab, 3, 50, 4, 40)
    with pytest.raises(InvalidInput, match="must map token strings"):
        ELLAVTokenizer([("UNK", 0)], 3, 50, 4, 40)
    with pytest.raises(InvalidInput, match="must map token strings"):
        ELLAVTokenizer({**small_vocab(), 7: 11}, 3, 50, 5, 40)


def test_tokenizer_dict_and_config_checks():
    tok = ELLAVTokenizer.for_units(3, num_codec_types=4)
    d = tok.to_dict()
    back = ELLAVTokenizer.from_dict(d)
    assert back.to_dict() == d and back.tokens_not_to_sandwich == []
    del d["tokens_not_to_sandwich"]
    assert ELLAVTokenizer.from_dict(d).tokens_not_to_sandwich == ["UNK", "SIL"]  # upstream's default
    with pytest.raises(CheckpointError, match=r"ELLA-V tokenizer field 'EOS_id' is 4; this implementation requires 3"):
        ELLAVTokenizer.from_dict({**d, "EOS_id": 4})
    with pytest.raises(CheckpointError, match=r"^ELLA-V tokenizer is missing required field\(s\) \['num_codec_types'\]"):
        ELLAVTokenizer.from_dict({k: v for k, v in d.items() if k != "num_codec_types"})
    with pytest.raises(CheckpointError, match="^inconsistent ELLA-V tokenizer in checkpoint: token_to_id_dict has 11"):
        ELLAVTokenizer.from_dict({**d, "num_codec_types": 5})
    with pytest.raises(CheckpointError, match="^inconsistent ELLA-V tokenizer in checkpoint"):
        ELLAVTokenizer.from_dict({**d, "token_to_id_dict": {**d["token_to_id_dict"], "u0": "4"}})
    args = ellav.TINY.to_dict()
    assert ellav.ELLAVConfig.from_dict({**args, "max_batch_size": 8}).max_batch_size == 8
    assert ellav.ELLAVConfig.from_dict({**args, "max_batch_size": "8"}).max_batch_size == 0
    # a numpy scalar would be written back by to_dict, and weights_only loading refuses numpy objects
    assert type(ellav.ELLAVConfig.from_dict({**args, "max_batch_size": np.int64(8)}).max_batch_size) is int
    assert ellav.ELLAVConfig.from_dict({k: v for k, v in args.items() if k != "max_batch_size"}) == ellav.TINY
    with pytest.raises(CheckpointError, match=r"^ELLA-V model_args is missing required field\(s\) \['dim'\]"):
        ellav.ELLAVConfig.from_dict({k: v for k, v in args.items() if k != "dim"})
    cfg = ellav.config_for_k(3, ellav.TINY, num_codec_types=4)
    with pytest.raises(InvalidInput, match=r"the ELLA-V output layer has a bias \(output_bias=True\)"):
        ellav.ELLAV(ellav.ELLAVConfig(**{**cfg.__dict__, "output_bias": False}), tok)
    with pytest.raises(InvalidInput, match="config vocab_size 12 != tokenizer vocabulary 11"):
        ellav.ELLAV(ellav.ELLAVConfig(**{**cfg.__dict__, "vocab_size": 12}), tok)


def test_checkpoint_dict_errors_say_what_is_wrong():
    torch.manual_seed(0)
    tok = ELLAVTokenizer.for_units(3, num_codec_types=4)
    model = ellav.ELLAV(ellav.config_for_k(3, ellav.TINY, num_codec_types=4), tok).to(torch.bfloat16)
    ckpt = ellav.checkpoint_dict(model)
    assert {v.dtype for v in ckpt["model_state"].values()} == {torch.float32}  # fp32 whatever the model runs in
    loaded = ellav.load_checkpoint_dict(ckpt)
    assert loaded.dtype == torch.float32 and not loaded.training
    assert torch.equal(loaded.output.bias, model.output.bias.float())
    assert ellav.load_checkpoint_dict(ckpt, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert ellav.load_checkpoint_dict(ckpt, map_location="meta").device.type == "meta"  # built where it is asked
    with pytest.raises(CheckpointError, match="^an ELLA-V checkpoint is a dict, got list"):
        ellav.load_checkpoint_dict([ckpt])
    with pytest.raises(CheckpointError, match="^not an ELLA-V checkpoint: top-level key 'tokenizer' missing"):
        ellav.load_checkpoint_dict({k: v for k, v in ckpt.items() if k != "tokenizer"})
    with pytest.raises(CheckpointError, match="^ELLA-V checkpoint: model_args.vocab_size = 12 but the tokenizer has 11"):
        ellav.load_checkpoint_dict({**ckpt, "model_args": {**ckpt["model_args"], "vocab_size": 12}})
    with pytest.raises(CheckpointError, match=r"^ELLA-V checkpoint: state dict keys do not match"):
        ellav.load_checkpoint_dict({**ckpt, "model_state": {}})


# ----- sequence format and prompt edges -----


def test_train_format_duration_check_is_inclusive():
    tok = ELLAVTokenizer.for_units(3, num_codec_types=4)
    # 10 unit frames at 50 Hz = 0.2 s; 4 codec frames at 40 Hz = 0.1 s: off by exactly the 0.1 s tolerance
    ids = tok.encode_train(["u0"] * 5 + ["u2"] * 5, [0, 1, 2, 3], tolerance_s=0.1)
    assert ids == [4, 6, BOS, 4, 7, 8, 9, 10, EOP, 6, EOP, EOS]  # codec frame j at j/40: all four inside u0
    with pytest.raises(InvalidInput, match=r"phones last 0\.2 s but codec frames 0\.075 s; they must agree within 0\.1 s"):
        tok.encode_train(["u0"] * 10, [0, 1, 2])
    assert tok.encode_train(["u0"] * 10, [0], strict=False) == [4, BOS, 4, 7, EOP, EOS]


def test_prompt_entries_and_their_errors():
    tok = ELLAVTokenizer.for_units(3, num_codec_types=4)
    assert tok.encode_infer(["u1", "u1", "u2", "u1"]) == [5, 6, 5, BOS, 5]
    with pytest.raises(InvalidInput, match="the prompt has no phones/units"):
        ELLAVTokenizer.from_phone_vocab(["AA", "SIL"], 50, 4, 40).encode_infer(["SIL", "SIL"])
    assert [tok.prompt_index(t) for t in ("u2", 1, "u0")] == [2, 1, 0]
    for bad in ("x2", "u", "u-1", "U1"):
        with pytest.raises(InvalidInput, match="prompt tokens must be unit ids or 'u<id>' strings"):
            tok.prompt_index(bad)
    phones = ELLAVTokenizer.from_phone_vocab(["OW1", "HH", "SIL", "AH0", "HH"], 50, 4, 40)
    assert phones.phone_ranks == {"AH0": 0, "HH": 1, "OW1": 2, "SIL": 3} and phones.num_units == 0
    assert [phones.prompt_index(p) for p in ("HH", "OW1")] == [1, 2] and phones.prompt_index(2) == 2
    with pytest.raises(InvalidInput, match=r"phone 'ZZ' is not in this model's vocabulary \(4 phones\)"):
        phones.prompt_index("ZZ")
    assert phones.encode_prompt([1, 3, 2]) == [5, 6, BOS, 5]  # SIL (rank 3) is not sandwiched
    # entries: lists, tuples, 1-D integer tensors and numpy scalars; anything else is refused with its name
    assert tok.encode_prompt(torch.tensor([1, 1, 2])) == tok.encode_prompt((np.int64(1), torch.tensor(2))) == [5, 6,
                                                                                                            BOS, 5]  # fmt: skip
    assert tok.encode_prompt([1, 2], codec_prefix=[torch.tensor([3, 0])]) == [5, 6, BOS, 5, 10, 7, EOP, 6]
    assert tok.encode_prompt([1, 2], token_prefix=[(9, UNK)]) == [5, 6, BOS, 5, 9, UNK, EOP, 6]
    for bad, needle in [(torch.tensor([[1]]), r"units must be a 1-D integer sequence, got \(1, 1\)"),
                        (torch.tensor([1.0]), "units must be a 1-D integer sequence"),
                        (torch.tensor([True]), "units must be a 1-D integer sequence"),
                        ("12", "units must be a sequence of integers, got str"),
                        (5, "units must be a sequence of integers, got int"),
                        ([1, [2]], r"units must contain integers, got \[2\]"),
                        ([1, 2.0], "units must contain integers, got 2.0")]:  # fmt: skip
        with pytest.raises(InvalidInput, match=needle):
            tok.encode_prompt(bad)
    with pytest.raises(InvalidInput, match="^codec_prefix entries must contain integers, got 0.5"):
        tok.encode_prompt([1, 2], codec_prefix=[[0.5]])
    with pytest.raises(InvalidInput, match="^token_prefix entries must contain integers, got 1.5"):
        tok.encode_prompt([1, 2], token_prefix=[[1.5]])
    with pytest.raises(InvalidInput, match=r"token_prefix entries must be token ids in 0\.\.10 other than EOP, got \[11\]"):
        tok.encode_prompt([1, 2], token_prefix=[[11]])
    with pytest.raises(InvalidInput, match="other than EOP, got \\[-1\\]"):
        tok.encode_prompt([1, 2], token_prefix=[[-1]])
    with pytest.raises(InvalidInput, match="the prefix covers 2 units but the prompt has 2: at least one unit must be"):
        tok.encode_prompt([1, 2, 2], codec_prefix=[[0], [1]])


def test_unknown_phones_of_an_inference_prompt_read_as_unk():
    phones = ELLAVTokenizer.from_phone_vocab(["AA", "B"], 50, 4, 40)
    assert phones.encode_infer(["B", "ZZ", "ZZ", "AA"]) == [5, UNK, 4, BOS, 5]
    assert phones.encode_infer(["ZZ", "B"]) == [UNK, 5, BOS, UNK]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ellav.random_model(K, ellav.TINY)


def test_upstream_generate_call_seeds_and_types(model, tmp_path):
    prompts = [[f"u{u}" for u in (12, 7, 300)], [5, 9]]
    codes, fin = model.generate(prompts, 30, 4, 1.0, 0.9, generator=torch.Generator().manual_seed(5))
    ids, fin_ids = model.generate_ids([[12, 7, 300], [5, 9]], 30, 4, 1.0, 0.9,
                                      generator=torch.Generator().manual_seed(5))  # fmt: skip
    assert [c.tolist() for c in codes] == ids and fin == fin_ids  # the generator reaches the sampler
    empty, fin0 = model.generate(prompts, 0, 4, 1.0, 0.0)
    assert [(c.dtype, c.numel()) for c in empty] == [(torch.int64, 0)] * 2 and fin0 == [False, False]
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match=r"^cannot read the ELLA-V checkpoint .*junk\.pt"):
        ellav.load_checkpoint(tmp_path / "junk.pt")


def test_generation_state_right_after_the_prompt():
    """GenerationState.start as its fields document: right-padded unit table, the unit generation resumes at,
    counter 0 for a fresh stream and 1 after a teacher-forced prefix, nothing forced (-1), finished rows none."""
    state = GenerationState.start([[4, 5, 6], [7], [8, 9]], [0, 1, 1])
    assert state.unit_tokens.tolist() == [[4, 5, 6], [7, 0, 0], [8, 9, 0]]
    assert state.num_units.tolist() == [3, 1, 2] and state.unit_idx.tolist() == [0, 1, 1]
    assert state.since_eop.tolist() == [0, 1, 1] and state.forced.tolist() == [-1, -1, -1]
    assert state.finished.tolist() == [False, True, False]
    assert all(t.dtype == torch.int64 for t in (state.unit_tokens, state.num_units, state.unit_idx, state.since_eop,
                                                state.forced))  # fmt: skip


def test_a_one_token_nucleus_is_drawn_without_error():
    """top_p below the top token's probability leaves a nucleus of one token: sampling returns it (every seed)."""
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
    for seed in range(5):
        assert sample(logits, 1.0, 0.5, torch.Generator().manual_seed(seed)).tolist() == [1, 0]
    with pytest.raises(InvalidInput, match="^the unit list is empty; ELLA-V needs at least one unit$"):
        ELLAVTokenizer.for_units(3, num_codec_types=4).encode_prompt([])
