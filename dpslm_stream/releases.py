"""The release table: every checkpoint file the paper released (name, URL, SHA-256 prefix) and the (k, lambda) pairs.

Data only (plus the two checks of a requested k / pair against it), in a module of its own so that what needs the
table — the loaders in `dpslm_stream.hub`, the tiny-set builder in `dpslm_stream.tiny` — imports it without
importing each other. `dpslm_stream.hub` re-exports every name, so `hub.ULM_1K`, `hub.check_pair` etc. keep working.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dpslm_stream.errors import UnknownModel

# ---------------------------------------------------------------------------------------------------------------------
# The release registry: every file the paper released, by name. Hash prefixes are the upstream ones (the 8 hex digits
# in the file name are the leading digits of the file's SHA-256, as torch.hub checks them).

_WAVLM_BASE = "https://github.com/nicolvisser/WavLM-codebooks/releases/download/v0.1.0/"
_ULM_BASE = "https://github.com/nicolvisser/Mistral-ULM/releases/download/v0.1.0/"
_ELLAV_BASE = "https://github.com/nicolvisser/ELLA-V/releases/download/v0.1.0/"
_WAVTOKENIZER_BASE = "https://github.com/nicolvisser/WavTokenizer/releases/download/v0.1/"


@dataclass(frozen=True)
class Release:
    """One released checkpoint file."""

    filename: str
    url: str
    check_hash: bool = True  # upstream WavTokenizer files are loaded without a hash check (their suffix uses '_')

    @property
    def sha256_prefix(self) -> str | None:
        m = re.search(r"-([a-f0-9]+)\.", self.filename)
        return m.group(1) if (m and self.check_hash) else None


WAVLM_LARGE = Release("wavlm-large-6fb4b3c3.pt", _WAVLM_BASE + "wavlm-large-6fb4b3c3.pt")

_CODEBOOK_HASHES = {100: "8b2b254e", 200: "55b06314", 500: "2c2dee95", 1000: "db31d361", 2000: "af7a6260"}
CODEBOOKS = {
    k: Release(f"codebook-layer-11-k-{k}-{h}.pt", f"{_WAVLM_BASE}codebook-layer-11-k-{k}-{h}.pt")
    for k, h in _CODEBOOK_HASHES.items()
}

# The 24 (k, lambda) pairs that have both a ULM and an ELLA-V (dp-slm README); default k=500, lambda=4500.
_ULM_1K_HASHES = {
    (100, 0): "b7a35cc5", (100, 600): "17e91718", (100, 1500): "6ba3cc55",
    (100, 3000): "5d0669b5", (100, 5000): "0c1af6fe", (100, 9000): "92bc9c97",
    (200, 0): "5574c355", (200, 700): "487bae0c", (200, 1500): "8524865e",
    (200, 3000): "ac40635d", (200, 5000): "09a1f87c", (200, 7500): "b685aac0",
    (500, 0): "532387cd", (500, 600): "b96bee1d", (500, 1500): "853fbee4",
    (500, 2800): "ef015b7f", (500, 4500): "9b75c46e", (500, 7000): "886ec1dd",
    (1000, 0): "56124eaa", (1000, 600): "810cb2f0", (1000, 1400): "7f014b7e",
    (1000, 2500): "c5cd03ce", (1000, 3800): "2c798110", (1000, 6000): "df9e72a7",
}  # fmt: skip
_ULM_60K_HASHES = {(500, 4500): "09759305"}
# Every pair is keyed by its real k (early upstream ELLA-V hubconf keyed k=100 as (0, lambda); fixed upstream since).
_ELLAV_HASHES = {
    (100, 0): "c4686bf9", (100, 600): "1448a9ec", (100, 1500): "6bdae6f8",
    (100, 3000): "6e277bbd", (100, 5000): "90149573", (100, 9000): "58352115",
    (200, 0): "bc26448e", (200, 700): "32e22dc4", (200, 1500): "7b009e62",
    (200, 3000): "8c19612d", (200, 5000): "a7d6e988", (200, 7500): "c6673f9e",
    (500, 0): "e6f3c91d", (500, 600): "9e639ac6", (500, 1500): "89352a68",
    (500, 2800): "f76d2db5", (500, 4500): "3815b3ab", (500, 7000): "f0b78c0f",
    (1000, 0): "96650d8d", (1000, 600): "1505a398", (1000, 1400): "98bd66a9",
    (1000, 2500): "fedea4c6", (1000, 3800): "d286d597", (1000, 6000): "5fb405fc",
}  # fmt: skip

VALID_PAIRS: tuple[tuple[int, int], ...] = tuple(sorted(_ULM_1K_HASHES))
DEFAULT_K, DEFAULT_LMBDA = 500, 4500


def _ulm_name(k: int, lmbda: int, hours: str, steps: str, h: str) -> str:
    return f"mistral-ulm-k-{k}-lmbda-{lmbda}-hours-{hours}-steps-{steps}-{h}.pt"


ULM_1K = {p: Release(_ulm_name(*p, "1k", "10k", h), _ULM_BASE + _ulm_name(*p, "1k", "10k", h)) for p, h in _ULM_1K_HASHES.items()}
ULM_60K = {p: Release(_ulm_name(*p, "60k", "200k", h), _ULM_BASE + _ulm_name(*p, "60k", "200k", h)) for p, h in _ULM_60K_HASHES.items()}
ELLAV = {
    (k, lm): Release(f"ella-v-wavlm-layer-11-k-{k}-lmbda-{lm}-clean-10k-40hz-{h}.pt",
                     f"{_ELLAV_BASE}ella-v-wavlm-layer-11-k-{k}-lmbda-{lm}-clean-10k-40hz-{h}.pt")
    for (k, lm), h in _ELLAV_HASHES.items()
}  # fmt: skip
WAVTOKENIZER = {
    600: Release("WavTokenizer_small_600_24k_4096_d44c40fb.ckpt",
                 _WAVTOKENIZER_BASE + "WavTokenizer_small_600_24k_4096_d44c40fb.ckpt", check_hash=False),
    320: Release("WavTokenizer_small_320_24k_4096_721a204f.ckpt",
                 _WAVTOKENIZER_BASE + "WavTokenizer_small_320_24k_4096_721a204f.ckpt", check_hash=False),
}  # fmt: skip


# The phone-based releases (the paper's topline): a phone LM with its tokenizer, and a phone-to-codec ELLA-V.
PLM = Release("mistral-plm-hours-1k-steps-10k-6d3a38a9.pt", _ULM_BASE + "mistral-plm-hours-1k-steps-10k-6d3a38a9.pt")
# Upstream fetches the tokenizer JSON without a hash check (its name carries none); so does this registry.
PHONE_TOKENIZER = Release("us_arpa_tokenizer.json", _ULM_BASE + "us_arpa_tokenizer.json", check_hash=False)
ELLAV_PHONES = Release("ella-v-phonemes-us-arpa-clean-10k-40hz-e06af002.pt",
                       _ELLAV_BASE + "ella-v-phonemes-us-arpa-clean-10k-40hz-e06af002.pt")  # fmt: skip


def all_releases() -> list[Release]:
    """Every released file this package knows, in a stable order (`dpslm-stream download --list`)."""
    return [WAVLM_LARGE, *CODEBOOKS.values(), *ULM_1K.values(), *ULM_60K.values(), PLM, PHONE_TOKENIZER,
            *ELLAV.values(), ELLAV_PHONES, *WAVTOKENIZER.values()]  # fmt: skip


def check_pair(k: int, lmbda: float, table: dict | None = None) -> tuple[int, int]:
    """Return (k, lambda) as ints if the pair was released, else raise UnknownModel listing the valid pairs."""
    table = ULM_1K if table is None else table
    try:
        key = (int(k), int(lmbda))
    except (TypeError, ValueError):
        key = None
    if key is None or key != (k, lmbda) or key not in table:
        valid = ", ".join(f"({a}, {b})" for a, b in sorted(table))
        raise UnknownModel(f"no released model for (k, lambda) = ({k}, {lmbda}); valid pairs: {valid}")
    return key


def check_codebook_k(k: int) -> int:
    if k not in CODEBOOKS:
        raise UnknownModel(f"no released codebook for layer 11, k={k}; valid k: {sorted(CODEBOOKS)}")
    return int(k)
