"""ELLA-V: deduplicated units -> WavTokenizer codec ids (40 Hz, 4096 codes), the acoustic model of DP-SLM.

Upstream: nicolvisser/ELLA-V (`ellav/model.py`, `ellav/tokenizer.py`, `ellav/generate.py`,
`ellav/transformer/*.py`, `hubconf.py`); facts in docs/references.md §ELLA-V. The network is the shared Mistral-style
transformer (transformer.py) with a bias on the output layer. Checkpoint file:
`{"model_args": {...}, "tokenizer": {...}, "model_state": {...}}` (state keys without prefix).

Sequence format (training, `ELLAVTokenizer.encode_train`):
    u_1 ... u_N  BOS  u_1 c c c EOP  u_2 c EOP  ...  u_N c c EOP  EOS
i.e. the whole deduplicated unit list first ("global advance"), then each unit followed by the codec frames
that fall inside its time span and an EOP. Generation prompts end after the first interleaved unit
(`u_1 ... u_N BOS u_1`); the model writes codec tokens and EOPs, and the generate loop forces the next unit after
every EOP, caps each unit at M+1 codec tokens (M+2 for the first), and stops once every unit has had its EOP.
"""

from __future__ import annotations

import dataclasses
import io
import os
from dataclasses import dataclass, field
from fractions import Fraction
from itertools import groupby
from typing import ClassVar, Sequence

import torch

from dpslm_stream.errors import CheckpointError, InvalidInput
from dpslm_stream.models.transformer import (
    Transformer,
    TransformerConfig,
    load_state_dict_strict,
    read_checkpoint_file,
    read_config_fields,
)
from dpslm_stream.validate import check_int, check_number, is_int


@dataclass
class ELLAVTokenizer:
    """Upstream `ELLAVTokenizer`: the vocabulary (special, phone/unit and codec tokens) and the sequence format.

    Vocabulary: ids 0-3 are UNK, BOS, EOP, EOS; then the K phone tokens in *lexicographic string order* (for
    units "u0", "u1", "u10", "u100", ..., so the id of unit u is NOT 4 + u); then codec c as the string
    str(c) with id 4 + K + c. Always look ids up in `token_to_id_dict`, which comes from the checkpoint.
    """

    token_to_id_dict: dict[str, int]
    num_phone_types: int
    phone_token_rate: float  # Hz of the frame-wise phones/units (50 for WavLM units)
    num_codec_types: int
    codec_token_rate: float  # Hz of the codec frames (40 for WavTokenizer small_600_24k_4096)
    tokens_not_to_sandwich: list[str] = field(default_factory=lambda: ["UNK", "SIL"])

    # Upstream declares these as init=False dataclass fields, so its to_dict writes them too.
    num_special_types: ClassVar[int] = 4
    UNK_token: ClassVar[str] = "UNK"
    BOS_token: ClassVar[str] = "BOS"
    EOP_token: ClassVar[str] = "EOP"
    EOS_token: ClassVar[str] = "EOS"
    UNK_id: ClassVar[int] = 0
    BOS_id: ClassVar[int] = 1
    EOP_id: ClassVar[int] = 2
    EOS_id: ClassVar[int] = 3
    CONSTANTS: ClassVar[tuple[str, ...]] = (
        "num_special_types", "UNK_token", "BOS_token", "EOP_token", "EOS_token", "UNK_id", "BOS_id", "EOP_id", "EOS_id"
    )
    REQUIRED: ClassVar[tuple[str, ...]] = (
        "token_to_id_dict", "num_phone_types", "phone_token_rate", "num_codec_types", "codec_token_rate"
    )

    def __post_init__(self):
        d, num_phones, num_codecs = self.token_to_id_dict, self.num_phone_types, self.num_codec_types
        if not isinstance(d, dict) or not all(isinstance(k, str) and is_int(v, int) for k, v in d.items()):
            raise InvalidInput("token_to_id_dict must map token strings to integer ids")
        if len(d) != self.num_special_types + num_phones + num_codecs:
            raise InvalidInput(
                f"token_to_id_dict has {len(d)} tokens, expected "
                f"{self.num_special_types} special + {num_phones} phone + {num_codecs} codec"
            )
        if sorted(d.values()) != list(range(len(d))):
            raise InvalidInput("token ids must be exactly 0..vocab_size-1, each once")
        specials = self.special_tokens()
        if any(d.get(tok) != i for tok, i in specials.items()):
            raise InvalidInput(f"special tokens must be {specials}")
        first_codec = self.num_special_types + num_phones
        # decode() treats every id >= 4 + K as a codec token: those must be exactly the strings "0".."num_codecs-1".
        id_to_token = {i: t for t, i in d.items()}
        codec_tokens = [id_to_token[i] for i in range(first_codec, len(d))]
        if sorted(codec_tokens, key=lambda t: int(t) if t.isdigit() else -1) != [str(c) for c in range(num_codecs)]:
            raise InvalidInput(f"ids {first_codec}.. must be the codec tokens '0'..'{num_codecs - 1}'")
        self._id_to_token = id_to_token
        # codec index of every id (-1 for non-codec ids), and the id of every unit token "u{n}" present.
        self._codec_of_id = torch.full((len(d),), -1, dtype=torch.long, device="cpu")
        for i in range(first_codec, len(d)):
            self._codec_of_id[i] = int(id_to_token[i])
        self._unit_ids = {int(t[1:]): i for t, i in d.items() if t[:1] == "u" and t[1:].isdigit()}
        # A phone vocabulary (no "u{n}" tokens): its phones are addressed by rank (id - 4) where units go, so the
        # same prompt, generation and teacher-forcing code serves both; `phone_ranks` maps phone strings to ranks.
        self.phone_ranks = {} if self._unit_ids else {t: i - self.num_special_types for t, i in d.items()
                                                      if self.num_special_types <= i < first_codec}  # fmt: skip
        self._prompt_ids = self._unit_ids or {r: r + self.num_special_types for r in range(num_phones)}

    # ----- construction and (de)serialisation -----

    @classmethod
    def from_phone_vocab(
        cls,
        phones: Sequence[str],
        phone_token_rate: float,
        num_codec_types: int,
        codec_token_rate: float,
        tokens_not_to_sandwich: Sequence[str] = ("UNK", "SIL"),
    ) -> "ELLAVTokenizer":
        """Upstream `from_phone_vocab`: phone ids follow the *sorted* phone strings, codec c gets id 4 + K + c."""
        phones = list(dict.fromkeys(phones))
        vocab = cls.special_tokens()
        for rank, phone in enumerate(sorted(phones)):
            vocab[phone] = cls.num_special_types + rank
        for c in range(num_codec_types):
            vocab[str(c)] = cls.num_special_types + len(phones) + c
        return cls(
            vocab, len(phones), phone_token_rate, num_codec_types, codec_token_rate, list(tokens_not_to_sandwich)
        )

    @classmethod
    def special_tokens(cls) -> dict[str, int]:
        return {cls.UNK_token: cls.UNK_id, cls.BOS_token: cls.BOS_id, cls.EOP_token: cls.EOP_id, cls.EOS_token: cls.EOS_id}

    @classmethod
    def for_units(
        cls, k: int, num_codec_types: int = 4096, phone_token_rate: float = 50, codec_token_rate: float = 40
    ) -> "ELLAVTokenizer":
        """The tokenizer of the released unit models (upstream example_train_script_units.py)."""
        if not is_int(k, int) or k < 1:
            raise InvalidInput(f"k must be a positive integer number of units, got {k!r}")
        units = [f"u{i}" for i in range(k)]
        return cls.from_phone_vocab(units, phone_token_rate, num_codec_types, codec_token_rate, [])

    @classmethod
    def from_dict(cls, d: dict) -> "ELLAVTokenizer":
        """Read a checkpoint's "tokenizer" dict (simple-parsing to_dict form)."""
        fields_ = read_config_fields(d, cls.REQUIRED, "ELLA-V tokenizer")
        for name in cls.CONSTANTS:
            if name in d and d[name] != getattr(cls, name):
                raise CheckpointError(
                    f"ELLA-V tokenizer field {name!r} is {d[name]!r}; "
                    f"this implementation requires {getattr(cls, name)!r}"
                )
        try:
            return cls(**fields_, tokens_not_to_sandwich=list(d.get("tokens_not_to_sandwich", ["UNK", "SIL"])))
        except (InvalidInput, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"inconsistent ELLA-V tokenizer in checkpoint: {e}") from e

    def to_dict(self) -> dict:
        """Every upstream dataclass field, init=False constants included, in upstream order."""
        out = {
            "token_to_id_dict": dict(self.token_to_id_dict),
            "num_phone_types": self.num_phone_types,
            "phone_token_rate": self.phone_token_rate,
            "num_codec_types": self.num_codec_types,
            "codec_token_rate": self.codec_token_rate,
            "tokens_not_to_sandwich": list(self.tokens_not_to_sandwich),
        }
        out.update({name: getattr(self, name) for name in self.CONSTANTS})
        return out

    # ----- lookups -----

    @property
    def vocab_size(self) -> int:
        return len(self.token_to_id_dict)

    @property
    def first_codec_id(self) -> int:
        return self.num_special_types + self.num_phone_types

    @property
    def num_units(self) -> int:
        """K for a unit tokenizer ("u0".."u{K-1}"); 0 for a phone tokenizer."""
        return len(self._unit_ids)

    def unit_token_ids(self, units: Sequence[int]) -> list[int]:
        """Token ids of unit ids (validated: each must be one of the vocabulary's "u{n}"; for a phone vocabulary,
        phone ranks, see `phone_ranks`)."""
        out = []
        for u in units:
            if not is_int(u, int) or u not in self._prompt_ids:
                raise InvalidInput(
                    f"unit {u!r} is not in the vocabulary: units must be integers in 0..{len(self._prompt_ids) - 1}"
                )
            out.append(self._prompt_ids[u])
        return out

    def prompt_index(self, token: object) -> object:
        """A prompt entry as generate takes it -> the integer encode_prompt takes: 'u12' -> 12 for a unit model, a
        phone string -> its rank for a phone model (unknown phones are an error; upstream would map them to UNK);
        anything else is passed on for validation."""
        if isinstance(token, str) and self.phone_ranks:
            if token not in self.phone_ranks:
                raise InvalidInput(f"phone {token!r} is not in this model's vocabulary ({len(self.phone_ranks)} phones)")
            return self.phone_ranks[token]
        return _unit_id(token)

    def codec_token_ids(self, codes: Sequence[int]) -> list[int]:
        """Token ids of codec indices 0..num_codec_types-1."""
        out = []
        for c in codes:
            if not is_int(c, int) or not 0 <= c < self.num_codec_types:
                raise InvalidInput(f"codec id {c!r} out of range: expected an integer in 0..{self.num_codec_types - 1}")
            out.append(self.token_to_id_dict[str(c)])
        return out

    # ----- sequence format -----

    def encode_train(
        self,
        framewise_phones: Sequence[str],
        framewise_codes: Sequence[int],
        strict: bool = True,
        tolerance_s: float = 0.1,
    ) -> list[int]:
        """Upstream `encode_train` ids: global units, BOS, time-interleaved (unit, codec..., EOP) runs, EOS.

        framewise_phones: one token string per phone frame (phone_token_rate Hz, repeated while a unit lasts).
        framewise_codes: one codec index per codec frame (codec_token_rate Hz).
        A run of equal phones spanning frames [a, b) starts at a/rate_p (placed before codec frames of the same
        instant) and ends with an EOP at b/rate_p (placed before a unit or codec of the same instant). Codec frame j
        sits at j/rate_c. Times are compared exactly (fractions). Tokens not in the vocabulary become UNK.
        """
        if strict:
            dur_p = len(framewise_phones) / self.phone_token_rate
            dur_c = len(framewise_codes) / self.codec_token_rate
            if abs(dur_p - dur_c) > tolerance_s:
                raise InvalidInput(
                    f"phones last {dur_p} s but codec frames {dur_c} s; they must agree within {tolerance_s} s"
                )
        rate_p, rate_c = Fraction(self.phone_token_rate), Fraction(self.codec_token_rate)
        runs, start = [], 0
        for phone, group in groupby(framewise_phones):
            n = len(list(group))
            if phone not in self.tokens_not_to_sandwich:
                runs.append((phone, start, start + n))
            start += n
        # (time, priority, token): EOP 0 < phone 1 < codec 2 at equal times; sort is stable.
        events = [(Fraction(a) / rate_p, 1, phone) for phone, a, _ in runs]
        events += [(Fraction(b) / rate_p, 0, self.EOP_token) for _, _, b in runs]
        events += [(Fraction(j) / rate_c, 2, str(int(c))) for j, c in enumerate(framewise_codes)]
        events.sort(key=lambda e: (e[0], e[1]))
        tokens = [phone for phone, _, _ in runs] + [self.BOS_token] + [e[2] for e in events] + [self.EOS_token]
        return [self.token_to_id_dict.get(t, self.UNK_id) for t in tokens]

    def encode_infer(self, phones: Sequence[str]) -> list[int]:
        """Upstream `encode_infer` (phone strings): dedup, drop tokens_not_to_sandwich, [p_1..p_N, BOS, p_1]."""
        kept = [p for p, _ in groupby(phones) if p not in self.tokens_not_to_sandwich]
        if not kept:
            raise InvalidInput("the prompt has no phones/units (after deduplication); at least one is needed")
        return [self.token_to_id_dict.get(p, self.UNK_id) for p in kept + [self.BOS_token, kept[0]]]

    def encode_prompt(
        self,
        units: Sequence[int],
        codec_prefix: Sequence[Sequence[int]] | None = None,
        token_prefix: Sequence[Sequence[int]] | None = None,
    ) -> list[int]:
        """Prompt ids for integer unit ids: [u_1..u_N, BOS, (u_i, prefix_i..., EOP) for i <= c, u_{c+1}].

        Units are deduplicated first (consecutive repeats merged), as upstream. Without a prefix (c = 0) this
        equals encode_infer(["u%d" % u for u in units]) for a unit vocabulary. A teacher-forced prefix covers
        the first c < N deduplicated units, given either as
        - codec_prefix[i]: the codec ids committed for unit i (0..num_codec_types-1), or
        - token_prefix[i]: the exact token ids generated inside unit i (`split_units(..., raw=True)`), which also
          keeps any non-codec token the model emitted there, so the continuation equals offline generation.
        """
        if codec_prefix is not None and token_prefix is not None:
            raise InvalidInput("give codec_prefix or token_prefix, not both")
        units = [u for u, _ in groupby(_int_list(units, "units"))]
        if not units:
            raise InvalidInput("the unit list is empty; ELLA-V needs at least one unit")
        ids = self.unit_token_ids(units)
        ids = [i for i in ids if self._id_to_token[i] not in self.tokens_not_to_sandwich]
        if codec_prefix is not None:
            runs = [self.codec_token_ids(_int_list(codes, "codec_prefix entries")) for codes in codec_prefix]
        elif token_prefix is not None:
            runs = [self._check_run(_int_list(run, "token_prefix entries")) for run in token_prefix]
        else:
            runs = []
        if len(runs) >= len(ids):
            raise InvalidInput(
                f"the prefix covers {len(runs)} units but the prompt has {len(ids)}: at least one unit must be left"
            )
        interleaved = []
        for unit_id, run in zip(ids, runs):
            interleaved += [unit_id] + run + [self.EOP_id]
        return ids + [self.BOS_id] + interleaved + [ids[len(runs)]]

    def _check_run(self, run: list[int]) -> list[int]:
        bad = [i for i in run if not 0 <= i < self.vocab_size or i == self.EOP_id]
        if bad:
            raise InvalidInput(
                f"token_prefix entries must be token ids in 0..{self.vocab_size - 1} other than EOP, got {bad[:5]}"
            )
        return run

    def split_units(self, ids: Sequence[int] | torch.Tensor, raw: bool = False) -> list[list[int]]:
        """A generated token stream cut at every EOP into per-unit groups: codec ids, or with raw=True the exact
        token ids generated inside each unit (without the forced unit token that opens it and the closing EOP).

        The stream of a generate call starts inside the prompt's current unit, so group 0 belongs to it; the last
        group is the unit in progress (its EOP not generated; a finished batch never emits the final EOP). Rows
        that finished before the rest of the batch continue with EOS/EOP filler, which adds (near-)empty groups.
        """
        groups: list[list[int]] = [[]]
        for i in torch.as_tensor(ids, dtype=torch.long).reshape(-1).tolist():
            if i == self.EOP_id:
                groups.append([])
            elif raw:
                groups[-1].append(i)
            elif int(self._codec_of_id[i]) >= 0:
                groups[-1].append(int(self._codec_of_id[i]))
        if raw:  # every group after an EOP opens with the forced next-unit (or, once finished, EOS) token
            groups = groups[:1] + [g[1:] for g in groups[1:]]
        return groups

    def decode(self, ids: Sequence[int] | torch.Tensor) -> list[int]:
        """Codec indices of the codec tokens among `ids` (everything else dropped), as upstream."""
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        codes = self._codec_of_id.to(ids.device)[ids]
        return codes[codes >= 0].tolist()


@dataclass
class ELLAVConfig(TransformerConfig):
    """Upstream ELLA-V `TransformerModelArgs`; the output layer has a bias. max_batch_size is unused upstream."""

    output_bias: bool = True
    max_batch_size: int = 0

    REQUIRED: ClassVar[tuple[str, ...]] = (
        "dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "norm_eps", "vocab_size", "rope_theta"
    )

    @classmethod
    def from_dict(cls, d: dict) -> "ELLAVConfig":
        fields_ = read_config_fields(d, cls.REQUIRED, "ELLA-V model_args")
        max_batch_size = d.get("max_batch_size", 0)
        return cls(**fields_, max_batch_size=max_batch_size if is_int(max_batch_size, int) else 0)

    def to_dict(self) -> dict:
        return {
            "dim": self.dim,
            "n_layers": self.n_layers,
            "head_dim": self.head_dim,
            "hidden_dim": self.hidden_dim,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "norm_eps": self.norm_eps,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
            "max_batch_size": self.max_batch_size,
        }


# Released size (upstream example_train_script_units.py) for K = 500 units and 4096 codec types: 4 + 500 + 4096.
FULL = ELLAVConfig(
    dim=1024, n_layers=12, head_dim=64, hidden_dim=4096, n_heads=16, n_kv_heads=16,
    norm_eps=1e-6, vocab_size=4600, rope_theta=10000.0,
)
# Same architecture and vocabulary, small widths.
TINY = dataclasses.replace(FULL, dim=64, n_layers=2, head_dim=16, hidden_dim=160, n_heads=4, n_kv_heads=4)


def config_for_k(k: int, base: ELLAVConfig = FULL, num_codec_types: int = 4096) -> ELLAVConfig:
    """`base` with the vocabulary of K units: 4 special + K unit + num_codec_types codec tokens."""
    if not is_int(k, int) or k < 1:
        raise InvalidInput(f"k must be a positive integer number of units, got {k!r}")
    return dataclasses.replace(base, vocab_size=4 + k + num_codec_types)


# ----- generation control flow -----


@dataclass
class GenerationState:
    """Per-row bookkeeping of the generate loop (all tensors [B] unless noted), updated by `generation_step`."""

    unit_tokens: torch.Tensor  # [B, N_max] token ids of each row's global unit section (right-padded)
    num_units: torch.Tensor  # N per row
    unit_idx: torch.Tensor  # EOPs seen so far = index of the current unit in the global section
    since_eop: torch.Tensor  # tokens since the last EOP (the forced unit token counts)
    forced: torch.Tensor  # token id forced as the next token, -1 where the model samples freely
    finished: torch.Tensor  # bool: every unit of the row has had its EOP

    @classmethod
    def start(
        cls, unit_tokens: list[list[int]], start_unit: list[int], device: torch.device | str = "cpu"
    ) -> "GenerationState":
        """State right after the prompt: current unit = start_unit[b] (0, or the number of teacher-forced units).

        The counter starts at 0 for the first unit (whose prompt token is not counted, hence its M+2 cap) and at
        1 after a teacher-forced prefix, as if the current unit's token had just been forced (cap M+1, as offline).
        """
        B, width = len(unit_tokens), max(len(u) for u in unit_tokens)
        table = torch.zeros((B, width), dtype=torch.long)
        for b, u in enumerate(unit_tokens):
            table[b, : len(u)] = torch.tensor(u, dtype=torch.long)
        idx = torch.tensor(start_unit, dtype=torch.long)
        num = torch.tensor([len(u) for u in unit_tokens], dtype=torch.long)
        return cls(
            unit_tokens=table.to(device),
            num_units=num.to(device),
            unit_idx=idx.to(device),
            since_eop=(idx > 0).long().to(device),
            forced=torch.full((B,), -1, dtype=torch.long, device=device),
            finished=(idx >= num).to(device),
        )


def sample(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One token per row of logits [B, V]: argmax if temperature == 0 or top_p == 0, else nucleus sampling.

    Nucleus as upstream: softmax(logits / T), keep the most probable tokens up to and including the one whose
    cumulative probability crosses top_p, renormalise, draw with torch.multinomial(generator=generator)
    (on the generator's device).
    """
    if temperature == 0 or top_p == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    sorted_probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
    if generator is not None and generator.device != sorted_probs.device:
        # A generator on another device (e.g. a CPU seed for a CUDA model): draw there, same stream of numbers.
        choice = torch.multinomial(sorted_probs.cpu(), 1, generator=generator).to(sorted_probs.device)
    else:
        choice = torch.multinomial(sorted_probs, num_samples=1, generator=generator)
    return order.gather(-1, choice)[:, 0]


def sample_rows(
    logits: torch.Tensor, greedy: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, uniform: torch.Tensor
) -> torch.Tensor:
    """One token per row of logits [B, V], each row with its own settings ([B] tensors on the logits' device):
    argmax where `greedy`, else upstream's nucleus (softmax(logits / T), the most probable tokens up to and including
    the one whose cumulative probability crosses top_p, renormalised) drawn by inverse CDF with the row's `uniform`
    number in [0, 1). Runs on the device with no host sync; the uniforms come from each stream's own generator, so
    a stream's draws do not depend on its batch neighbours."""
    probs = torch.softmax(logits.float() / temperature[:, None], dim=-1)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    cumulative = sorted_probs.cumsum(dim=-1)
    kept = sorted_probs.masked_fill(cumulative - sorted_probs > top_p[:, None], 0.0)
    kept_cumulative = kept.cumsum(dim=-1)
    threshold = uniform[:, None] * kept_cumulative[:, -1:]
    rank = (kept_cumulative <= threshold).sum(dim=-1, keepdim=True).clamp(max=logits.shape[-1] - 1)
    drawn = order.gather(-1, rank)[:, 0]
    return torch.where(greedy, logits.argmax(dim=-1), drawn)


def generation_step(
    logits: torch.Tensor,
    state: GenerationState,
    *,
    max_codec_tokens_per_phone: int,
    temperature: float,
    top_p: float,
    eop_id: int = ELLAVTokenizer.EOP_id,
    eos_id: int = ELLAVTokenizer.EOS_id,
    generator: torch.Generator | None = None,
    sampled: torch.Tensor | None = None,
) -> torch.Tensor:
    """Choose the next token of every row from its logits [B, V] and update `state`; returns tokens [B].

    `sampled` [B]: tokens already drawn for the rows (e.g. by `sample_rows`); None samples here with `sample`.

    Upstream semantics (ellav/generate.py): a row whose next token is forced takes it (upstream puts 1e9 on the
    forced logit, which sampling then picks with probability 1); otherwise the token is sampled. Then:
    - an EOP ends the current unit: unit_idx += 1 and the counter restarts at 0;
    - once unit_idx reaches N the row is finished and is forced to EOS from then on;
    - otherwise after an EOP the next global unit is forced as the next token;
    - once the counter exceeds M + 1 the next token is forced to be EOP (so at most M+1 codec tokens per unit,
      M+2 for the first).
    A model-sampled EOS does not stop a row. The caller stops (without appending the token) when all rows are
    finished, and runs at most max_tokens steps.
    """
    if sampled is None:
        sampled = sample(logits, temperature, top_p, generator)
    token = torch.where(state.forced >= 0, state.forced, sampled)
    reached_eop = token == eop_id
    state.since_eop = torch.where(reached_eop, 0, state.since_eop + 1)
    state.unit_idx = state.unit_idx + reached_eop.long()
    state.finished = state.unit_idx >= state.num_units
    force_eop = state.since_eop > max_codec_tokens_per_phone + 1
    force_unit = reached_eop & ~state.finished
    next_unit = state.unit_tokens.gather(1, state.unit_idx.clamp(max=state.unit_tokens.shape[1] - 1)[:, None])[:, 0]
    forced = torch.full_like(token, -1)
    forced = torch.where(force_unit, next_unit, forced)
    forced = torch.where(force_eop, eop_id, forced)
    # Finished rows: upstream puts 1e9 on EOS (and on EOP when the counter also overflows); both are dropped by
    # decode, so EOS is used.
    forced = torch.where(state.finished, eos_id, forced)
    state.forced = forced
    return token


class ELLAV(Transformer):
    """ELLA-V GAR model: the transformer (output bias) plus its tokenizer; `generate` turns units into codec ids."""

    def __init__(self, config: ELLAVConfig, tokenizer: ELLAVTokenizer):
        if not config.output_bias:
            raise InvalidInput("the ELLA-V output layer has a bias (output_bias=True)")
        if config.vocab_size != tokenizer.vocab_size:
            raise InvalidInput(f"config vocab_size {config.vocab_size} != tokenizer vocabulary {tokenizer.vocab_size}")
        super().__init__(config)
        self.tokenizer = tokenizer

    def generate(
        self,
        prompts: Sequence[Sequence[int | str]],
        max_tokens: int,
        max_codec_tokens_per_phone: int,
        temperature: float,
        top_p: float,
        generator: torch.Generator | None = None,
        **prefixes,
    ) -> tuple[list[torch.Tensor], list[bool]]:
        """Upstream-compatible call: prompts of unit tokens as upstream writes them (``[f"u{unit}" ...]``; phone strings
        such as ``["HH", "AH0", "L", "OW1"]`` for a phone model) or plain
        unit ids; returns B int64 tensors of codec ids on the model's device (upstream's return type, so
        ``vocode(wavtokenizer, codec_ids[None, None, :])`` works unchanged) and the finished flags.
        See `generate_ids` for the semantics and the teacher-forcing prefixes."""
        prompts = [[self.tokenizer.prompt_index(u) for u in p] if isinstance(p, (list, tuple)) else p for p in prompts]
        codes, finished = self.generate_ids(prompts, max_tokens, max_codec_tokens_per_phone, temperature, top_p,
                                            generator, **prefixes)  # fmt: skip
        return [torch.tensor(c, dtype=torch.long, device=self.device) for c in codes], finished

    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        max_tokens: int,
        max_codec_tokens_per_phone: int,
        temperature: float,
        top_p: float,
        generator: torch.Generator | None = None,
        codec_prefix: Sequence[Sequence[Sequence[int]]] | None = None,
        token_prefix: Sequence[Sequence[Sequence[int]]] | None = None,
    ) -> tuple[list[list[int]], list[bool]]:
        """Codec ids for each prompt (a list of unit ids), and whether each prompt was generated to its end.

        Upstream `ELLAVGARModel.generate` semantics, batched over prompts in lockstep with one preallocated KV
        cache of max(prompt length) + max_tokens slots. max_tokens bounds all generated tokens (codec, EOP and
        forced unit tokens). Greedy when temperature == 0 or top_p == 0 (DP-SLM's greedy setting is
        temperature=1, top_p=0). `generator` seeds the sampling (a CPU generator works for any model device).

        Teacher forcing (for streaming resynthesis): codec_prefix[b][i] are the codec ids already committed for
        the i-th deduplicated unit of prompt b, for its first c_b < N_b units (or token_prefix[b][i], the exact
        tokens generated inside that unit, see `ELLAVTokenizer.encode_prompt`). The prompt becomes
        `u_1..u_N BOS (u_i prefix_i EOP)_{i<=c_b} u_{c_b+1}` and generation resumes at unit c_b+1 in the state
        offline generation has after producing that prefix (current unit index c_b; per-unit counter 1, as if
        u_{c_b+1} had just been forced, so its cap is M+1). Only units c_b+1.. are generated and returned. With
        token_prefix taken from an offline run, the continuation equals that run (greedy, up to float rounding);
        codec_prefix loses any non-codec token the model emitted inside a unit. `generate_tokens` returns the
        raw token stream and `tokenizer.split_units` cuts it per unit (what a streaming caller commits).

        Returns B lists of Python ints (`generate` wraps them in tensors as upstream; upstream returns ([], []) when
        no token was generated, and float tensors for empty rows); finished is False for rows cut by max_tokens.
        """
        tokens, finished = self.generate_tokens(
            prompts, max_tokens, max_codec_tokens_per_phone, temperature, top_p, generator, codec_prefix, token_prefix
        )
        return [self.tokenizer.decode(row) for row in tokens], finished

    @torch.inference_mode()
    def generate_tokens(
        self,
        prompts: Sequence[Sequence[int]],
        max_tokens: int,
        max_codec_tokens_per_phone: int,
        temperature: float,
        top_p: float,
        generator: torch.Generator | None = None,
        codec_prefix: Sequence[Sequence[Sequence[int]]] | None = None,
        token_prefix: Sequence[Sequence[Sequence[int]]] | None = None,
    ) -> tuple[list[list[int]], list[bool]]:
        """Like `generate`, but returns the raw generated token ids (codec, EOP, forced unit, EOS tokens)."""
        if not isinstance(prompts, Sequence) or isinstance(prompts, (str, bytes)) or len(prompts) == 0:
            raise InvalidInput("prompts must be a non-empty list of unit-id lists")
        check_int("max_tokens", max_tokens, 0, kind=int)
        check_int("max_codec_tokens_per_phone", max_codec_tokens_per_phone, 0, kind=int)
        check_number("temperature", temperature, 0.0, what="finite number")
        check_number("top_p", top_p, 0.0, 1.0)
        for name, pre in (("codec_prefix", codec_prefix), ("token_prefix", token_prefix)):
            if pre is not None and len(pre) != len(prompts):
                raise InvalidInput(f"{name} has {len(pre)} entries for {len(prompts)} prompts")
        tok = self.tokenizer
        none = [None] * len(prompts)
        codec_prefix = none if codec_prefix is None else list(codec_prefix)
        token_prefix = none if token_prefix is None else list(token_prefix)
        encoded = [tok.encode_prompt(p, cp, tp) for p, cp, tp in zip(prompts, codec_prefix, token_prefix)]
        # number of teacher-forced units per row = index of the unit generation resumes at
        starts = [len(cp or tp or ()) for cp, tp in zip(codec_prefix, token_prefix)]
        # The global section is everything before BOS.
        unit_tokens = [e[: e.index(tok.BOS_id)] for e in encoded]

        B, device = len(encoded), self.device
        lengths = torch.tensor([len(e) for e in encoded], dtype=torch.long, device=device)
        width = int(lengths.max())
        tokens = torch.zeros((B, width), dtype=torch.long, device=device)
        for b, e in enumerate(encoded):
            tokens[b, : len(e)] = torch.tensor(e, dtype=torch.long)
        cache = self.new_cache(B, width + max_tokens)
        logits = self(tokens, cache, lengths)
        logits = logits[torch.arange(B, device=device), lengths - 1]  # after each row's last prompt token

        state = GenerationState.start(unit_tokens, starts, device=device)
        generated = []
        for _ in range(max_tokens):
            token = generation_step(
                logits, state, max_codec_tokens_per_phone=max_codec_tokens_per_phone,
                temperature=temperature, top_p=top_p, eop_id=tok.EOP_id, eos_id=tok.EOS_id, generator=generator,
            )
            if bool(state.finished.all()):
                break  # the final EOP is neither kept nor fed, as upstream
            generated.append(token)
            logits = self(token[:, None], cache)[:, 0]
        ids = torch.stack(generated, dim=1) if generated else torch.zeros((B, 0), dtype=torch.long, device=device)
        return ids.tolist(), state.finished.tolist()


def random_model(k: int, base: ELLAVConfig = TINY) -> ELLAV:
    """ELLA-V for K units with random weights (torch's default init, from the global RNG), in eval mode."""
    return ELLAV(config_for_k(k, base), ELLAVTokenizer.for_units(k)).eval()


def _unit_id(token: object) -> object:
    """'u12' (upstream's prompt token for unit 12) -> 12; anything else is passed on for validation."""
    if isinstance(token, str) and token.startswith("u") and token[1:].isdigit():
        return int(token[1:])
    if isinstance(token, str):
        raise InvalidInput(f"prompt tokens must be unit ids or 'u<id>' strings, got {token!r}")
    return token


def _int_list(values: object, what: str) -> list[int]:
    """A list of Python ints from a list/tuple/1-D tensor/array of integers."""
    if isinstance(values, torch.Tensor):
        if values.ndim != 1 or values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
            raise InvalidInput(f"{what} must be a 1-D integer sequence, got {tuple(values.shape)} {values.dtype}")
        return values.tolist()
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise InvalidInput(f"{what} must be a sequence of integers, got {type(values).__name__}")
    out = []
    for v in values:
        if hasattr(v, "item") and not isinstance(v, (list, tuple)):
            v = v.item()  # numpy / 0-d tensor scalars
        if not is_int(v, int):
            raise InvalidInput(f"{what} must contain integers, got {v!r}")
        out.append(v)
    return out


def load_checkpoint_dict(
    ckpt: dict, map_location: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> ELLAV:
    """Build ELLA-V from the checkpoint's "model_args" and "tokenizer"; load "model_state" strictly; eval mode."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"an ELLA-V checkpoint is a dict, got {type(ckpt).__name__}")
    for key in ("model_args", "tokenizer", "model_state"):
        if key not in ckpt:
            raise CheckpointError(
                f"not an ELLA-V checkpoint: top-level key {key!r} missing (has {sorted(map(str, ckpt))})"
            )
    config = ELLAVConfig.from_dict(ckpt["model_args"])
    tokenizer = ELLAVTokenizer.from_dict(ckpt["tokenizer"])
    if config.vocab_size != tokenizer.vocab_size:
        raise CheckpointError(
            f"ELLA-V checkpoint: model_args.vocab_size = {config.vocab_size} "
            f"but the tokenizer has {tokenizer.vocab_size} tokens"
        )
    with torch.device("meta"):
        model = ELLAV(config, tokenizer)
    load_state_dict_strict(model, ckpt["model_state"], "ELLA-V checkpoint")
    return model.to(device=map_location, dtype=dtype).eval()


def checkpoint_dict(model: ELLAV) -> dict:
    """The upstream file content: {"model_args", "tokenizer", "model_state" (fp32 CPU, keys without prefix)}."""
    return {
        "model_args": model.config.to_dict(),
        "tokenizer": model.tokenizer.to_dict(),
        "model_state": {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()},
    }


def load_checkpoint(path: str | os.PathLike | io.BufferedIOBase, map_location: torch.device | str = "cpu") -> ELLAV:
    """Read an upstream ELLA-V file (weights_only) and load it; unreadable files are a CheckpointError."""
    return load_checkpoint_dict(read_checkpoint_file(path, "ELLA-V"), map_location)
