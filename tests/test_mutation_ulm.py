"""dpslm_stream.models.ulm at the edges the mutants of `make mutants MODULES=ulm` found untested (docs/mutation.md):
the phone LM's tokenizer (upstream `ulm.phones.PhonemeTokenizer`, used by the phone topline and hub's
`plm_us_arpa_hours_1k_steps_10k`), the argument checks with their error types, and the scoring pool's bookkeeping.
Models here have tiny RANDOM weights (tests/test_ulm.py's helper); the oracles are the model's own full-utterance
scores and hand-written expectations."""

import numpy as np
import pytest
import torch

from dpslm_stream.errors import CheckpointError, InvalidInput
from dpslm_stream.models import ulm
from dpslm_stream.models.ulm import IncrementalScorer, PhonemeTokenizer, ScoringPool, UnitTokenizer, score_blocks

K = 500
pytestmark = pytest.mark.usefixtures("one_torch_thread")

PHONES = {"BOS": 0, "UNK": 1, "HH": 2, "EY1": 3, "AH0": 4}


# ----- the phone tokenizer -----


def test_phone_tokenizer_encodes_and_decodes_as_upstream():
    tok = PhonemeTokenizer(PHONES)
    assert tok.vocab_size == 5 and tok.BOS_token == "BOS" and tok.UNK_token == "UNK" and tok.delimiter == " "
    ids = tok.encode("HH EY1 ZZ AH0")
    assert ids.tolist() == [0, 2, 3, 1, 4] and ids.dtype == torch.int64  # BOS first, unknown phone -> UNK
    assert tok.decode(ids) == "HH EY1 UNK AH0"  # every BOS dropped
    assert tok.decode([0, 3, 0, 2, 99]) == "EY1 HH UNK"  # unknown ids read as UNK
    dashed = PhonemeTokenizer(PHONES, delimiter="-")
    assert dashed.encode("HH-EY1").tolist() == [0, 2, 3] and dashed.decode(torch.tensor([0, 2, 3])) == "HH-EY1"
    with pytest.raises(InvalidInput, match="string of phones"):
        tok.encode(["HH", "EY1"])


def test_phone_tokenizer_dict_round_trip_and_upstream_constants():
    d = PhonemeTokenizer(PHONES, "-").to_dict()
    assert d == {"phoneme_to_id": PHONES, "delimiter": "-", "BOS_id": 0, "UNK_id": 1}
    back = PhonemeTokenizer.from_dict(d)
    assert back.phoneme_to_id == PHONES and back.delimiter == "-" and back.id_to_phoneme[3] == "EY1"
    assert PhonemeTokenizer.from_dict({"phoneme_to_id": PHONES}).delimiter == " "  # upstream's default
    for bad in ([1], {"delimiter": " "}, "phoneme_to_id"):
        with pytest.raises(CheckpointError, match="not a phone tokenizer file"):
            PhonemeTokenizer.from_dict(bad)
    with pytest.raises(CheckpointError, match="BOS_id is 2, upstream fixes it to 0"):
        PhonemeTokenizer.from_dict({**d, "BOS_id": 2})
    with pytest.raises(CheckpointError, match="UNK_id is 0, upstream fixes it to 1"):
        PhonemeTokenizer.from_dict({**d, "UNK_id": 0})


@pytest.mark.parametrize("mapping,delimiter,needle", [
    ([("BOS", 0)], " ", "must map phone strings to integer ids"),
    ({"BOS": 0, "UNK": 1, 2: 2}, " ", "must map phone strings to integer ids"),
    ({"BOS": 0, "UNK": 1, "HH": 2.0}, " ", "must map phone strings to integer ids"),
    ({"BOS": 0, "UNK": True}, " ", "must map phone strings to integer ids"),
    ({"BOS": 0, "UNK": np.int64(1)}, " ", "must map phone strings to integer ids"),  # JSON gives plain ints
    ({"BOS": 0, "UNK": 1, "HH": 1}, " ", "one-to-one"),
    ({"BOS": 0, "UNK": 1, " ": 2}, " ", "delimiter ' ' must be a string not in the vocabulary"),
    (PHONES, 3, "delimiter 3 must be a string"),
    ({"BOS": 0, "HH": 2}, " ", r"ids 0 \(BOS\) and 1 \(UNK\) must be in the vocabulary"),
    ({"UNK": 1, "HH": 2}, " ", r"ids 0 \(BOS\) and 1 \(UNK\)"),
])  # fmt: skip
def test_phone_tokenizer_refuses_inconsistent_vocabularies(mapping, delimiter, needle):
    with pytest.raises(CheckpointError, match=f"^phone tokenizer: .*{needle}"):
        PhonemeTokenizer(mapping, delimiter)


# ----- argument checks -----


def test_config_for_k_takes_python_ints_only():
    assert ulm.config_for_k(7).vocab_size == 8 and ulm.config_for_k(7, ulm.TINY).dim == ulm.TINY.dim
    for bad in (np.int64(7), True, 7.0, 0, -3):
        with pytest.raises(InvalidInput, match="k must be a positive integer"):
            ulm.config_for_k(bad)


def test_checkpoint_errors_name_the_ulm():
    """The errors a user sees for a broken file say which model's file and which part of it is wrong."""
    args = ulm.TINY.to_dict()
    del args["rope_theta"]
    with pytest.raises(CheckpointError, match=r"^ULM model_args is missing required field\(s\) \['rope_theta'\]"):
        ulm.ULMConfig.from_dict(args)
    with pytest.raises(CheckpointError, match="^ULM model_args must be a dict"):
        ulm.ULMConfig.from_dict([1])
    assert ulm.ULMConfig.from_dict({**ulm.TINY.to_dict(), "dropout": 0.3}).dropout == 0.3
    assert ulm.ULMConfig.from_dict({**ulm.TINY.to_dict(), "dropout": "high"}).dropout == 0.15
    torch.manual_seed(0)
    ckpt = ulm.checkpoint_dict(ulm.ULM(ulm.TINY))
    del ckpt["model_state_dict"]["norm.weight"]
    with pytest.raises(CheckpointError, match=r"^ULM checkpoint: state dict keys do not match"):
        ulm.load_checkpoint_dict(ckpt)


def test_checkpoint_of_a_bf16_model_is_written_in_fp32():
    """The upstream file holds float32 tensors whatever dtype the model runs in."""
    torch.manual_seed(0)
    model = ulm.ULM(ulm.TINY).to(torch.bfloat16)
    state = ulm.checkpoint_dict(model)["model_state_dict"]
    assert {v.dtype for v in state.values()} == {torch.float32} and {v.device.type for v in state.values()} == {"cpu"}
    assert torch.equal(state["output.weight"], model.output.weight.float())


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ulm.ULM(ulm.TINY).eval()


def test_scoring_arguments_are_checked_with_clear_errors(model):
    with pytest.raises(InvalidInput, match="the ULM output layer has no bias"):
        ulm.ULM(ulm.ULMConfig(**{**ulm.TINY.__dict__, "output_bias": True}))
    assert model.k == K and model.tokenizer().num_units == K
    for kwargs, needle in [
        ({"max_context": 0}, "max_context must be a positive number of tokens or None, got 0"),
        ({"max_context": True}, "max_context must be"), ({"max_context": 4.0}, "max_context must be"),
        ({"max_context": np.int64(4)}, "max_context must be"), ({"chunk": np.int64(4)}, "chunk must be"),
        ({"chunk": 0}, "chunk must be a positive number of tokens, got 0"), ({"chunk": 2.0}, "chunk must be"),
        ({"rows": 0}, "rows must be a positive number of rows, got 0"), ({"rows": np.int64(2)}, "rows must be"),
    ]:
        with pytest.raises(InvalidInput, match=needle):
            ScoringPool(model, **kwargs)
    assert ScoringPool(model, max_context=1, chunk=1, rows=1).cache.capacity == 1  # W - 1 + chunk slots
    assert ScoringPool(model, max_context=5, chunk=3, rows=3).cache.batch_size == 3
    with pytest.raises(InvalidInput, match="must live with the model: model on cpu, asked meta"):
        IncrementalScorer(model, device="meta")
    assert IncrementalScorer(model, device="cpu").pool.cache.capacity == 256
    default_pool = ScoringPool(model)  # the defaults agree: a default scorer joins a default pool
    assert IncrementalScorer(model, pool=default_pool).pool is default_pool and default_pool.chunk == 256
    scorer = IncrementalScorer(model)
    with pytest.raises(InvalidInput, match="got 1 scorers but 2 blocks"):
        score_blocks([scorer], [[1], [2]])
    scorer.close()
    with pytest.raises(InvalidInput, match="this scorer was closed; reset"):
        score_blocks([scorer], [[1]])
    assert [len(x) for x in score_blocks([scorer], [[]])] == [0]  # an empty block asks nothing of a closed scorer


def test_unit_and_id_checks(model):
    tok = UnitTokenizer(K)
    for bad in (np.array([1.0, 2.0]), np.array(["a"], dtype=object), [True, False], torch.tensor([True])):
        with pytest.raises(InvalidInput, match="units must be integers"):
            tok.encode(bad)
    with pytest.raises(InvalidInput, match="units must be a 1-D sequence, got shape"):
        tok.encode(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(InvalidInput, match=r"unit ids must lie in 0\.\.K-1, got min -1 max 3"):
        UnitTokenizer().encode([3, -1])
    with pytest.raises(InvalidInput, match=r"unit ids must lie in 0\.\.499, got min 0 max 500"):
        tok.encode(np.array([0, 500], dtype=np.int32))
    assert tok.encode(np.array([], dtype=np.float32)).tolist() == [0]  # an empty block of any dtype
    assert tok.encode(np.array([4, 499], dtype=np.uint16)).tolist() == [0, 5, 500]
    for bad in (torch.zeros(2, 2, dtype=torch.long), torch.tensor([0.0, 1.0])):
        with pytest.raises(InvalidInput, match="ids must be a 1-D integer sequence"):
            tok.decode(bad)
    with pytest.raises(InvalidInput, match="ids must be integers, got torch.bool"):
        model.loglikelihood(torch.tensor([True, False]))
    with pytest.raises(InvalidInput, match=r"token ids must lie in 0\.\.500 .*got min -1 max 3"):
        model.unit_logprobs([0, 3, -1])
    assert model.unit_logprobs([0]).shape == (0,) and model.loglikelihood_batch([[0], [0]]) == [0.0, 0.0]


def test_pool_halves_slots_at_a_quarter_used_and_rows_down_to_one(model):
    """The documented bounds of ScoringPool: slots grow by doubling, and shrink by half (once per release) as soon as
    at most a quarter of them is used; rows shrink by half down to a single one. A scorer's `cache` is its own
    row only."""
    pool = ScoringPool(model, None, chunk=4)
    a, b = IncrementalScorer(model, chunk=4, pool=pool), IncrementalScorer(model, chunk=4, pool=pool)
    long, short = list(range(15)), [7, 8, 9]
    score_blocks([a, b], [long, short])  # a: BOS + 15 tokens in chunks of 4 -> capacity 4, 8, 16
    assert (pool.cache.batch_size, pool.cache.capacity) == (2, 16)
    assert a.cache.batch_size == 1 and b.cache.batch_size == 1 and int(b.cache.lengths[0]) == 4
    a.close()  # b's 4 slots are exactly a quarter of 16: halved, once
    assert (pool.cache.batch_size, pool.cache.capacity) == (2, 8)
    torch.testing.assert_close(b.push([1, 2]), IncrementalScorer(model).push(short + [1, 2])[3:], rtol=1e-5, atol=1e-5)
    b.close()
    assert (pool.cache.batch_size, pool.cache.capacity) == (1, 4) and pool.num_rows == 0


def test_windowed_scorer_holds_w_minus_1_plus_chunk_slots(model):
    """The documented memory bound of a windowed scorer: its row holds W - 1 + chunk tokens, plus the next-token
    distribution once a block was pushed; a second scorer with the same settings can share its pool."""
    scorer = IncrementalScorer(model, max_context=8, chunk=4)
    slot_bytes = 2 * model.config.n_layers * model.config.n_kv_heads * model.config.head_dim * 4 + 8
    row_bytes = 11 * slot_bytes + 2 * 8  # k and v (fp32) and slot positions per slot; length and next position
    assert scorer.cache.capacity == 11 and scorer.state_nbytes == row_bytes
    scorer.push(list(range(30)))
    assert scorer.state_nbytes == row_bytes + 4 * (K + 1)
    IncrementalScorer(model, max_context=8, chunk=4, pool=scorer.pool).push([1, 2])
    assert scorer.pool.num_rows == 2


def test_ids_of_any_integer_dtype_score_the_same(model):
    ids = UnitTokenizer(K).encode([3, 9, 250, 7])
    want = model.unit_logprobs(ids)
    for small in (ids.to(torch.int16), ids.to(torch.int32), ids.numpy().astype(np.uint16), ids.tolist()):
        torch.testing.assert_close(model.unit_logprobs(small), want, rtol=0, atol=0)
    assert model.loglikelihood_batch([ids.to(torch.int16)]) == pytest.approx([float(want.sum())], rel=1e-6)
    torch.testing.assert_close(model.unit_logprobs(ids.numpy().astype(np.uint32)), want, rtol=0, atol=0)
