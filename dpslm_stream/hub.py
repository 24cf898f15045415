"""Release registry and checkpoint loaders, mirroring the upstream torch.hub entry points of DP-SLM.

Every loader takes either the release identity (downloaded once from the upstream release URL with a progress bar,
SHA-256 prefix checked, cached in torch.hub's checkpoint directory, so files that upstream DP-SLM already fetched are
reused) or ``path=`` a local file in the same upstream format. Checkpoints are read with ``weights_only=True`` and
models are built from the checkpoint's own config and loaded strictly.

Upstream entry points (names and return shapes kept):
    wavlm_large()                                   -> (model, extract_features)      nicolvisser/WavLM-codebooks
    codebook(layer=11, k=500)                       -> Tensor[K, 1024]                nicolvisser/WavLM-codebooks
    dpdp_quantizer_from_codebook(codebook, lmbda)   -> DPDPQuantizer                  nicolvisser/dpdp
    ulm_wavlm_layer_11_dpdp_hours_1k_steps_10k(k, lmbda)  -> (ulm, tokenizer)         nicolvisser/Mistral-ULM
    ulm_wavlm_layer_11_dpdp_hours_60k_steps_200k(k, lmbda) -> (ulm, tokenizer)        nicolvisser/Mistral-ULM
    ellav_units_to_wavtokenizer(k, lmbda)           -> ELLA-V model                   nicolvisser/ELLA-V
    small_600_24k_4096() / small_320_24k_4096()     -> (wavtokenizer, None, vocode)   nicolvisser/WavTokenizer
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from dpslm_stream.errors import CheckpointError, CheckpointUnavailable, UnknownModel

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


# ---------------------------------------------------------------------------------------------------------------------
# Fetching and reading checkpoint files.


def checkpoint_dir() -> Path:
    """Where torch.hub caches checkpoints ($TORCH_HOME/hub/checkpoints), shared with upstream DP-SLM's downloads."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def fetch(release: Release, progress: bool = True) -> Path:
    """Return the local path of a released file, downloading it into the torch.hub cache on first use."""
    dst = checkpoint_dir() / release.filename
    if dst.is_file():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        # torch's own downloader: progress bar, SHA-256 prefix check, atomic rename into place.
        torch.hub.download_url_to_file(release.url, str(dst), hash_prefix=release.sha256_prefix, progress=progress)
    except RuntimeError as e:  # torch raises RuntimeError on a hash mismatch
        raise CheckpointError(f"downloaded {release.filename} but it failed its check: {e}") from e
    except Exception as e:  # URLError, socket timeouts, HTTP errors: no network here or upstream moved
        raise CheckpointUnavailable(
            f"{release.filename} is not cached in {dst.parent} and could not be downloaded from {release.url} ({e}).\n"
            f"Pre-fetch it on a machine with network access (`dpslm-stream download` there, or fetch the URL by hand)"
            f" and copy it to {dst}, or pass path=... / --models DIR pointing at a folder that holds it."
        ) from e
    return dst


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """torch.load(weights_only=True) with errors that name the file and say what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointUnavailable(f"checkpoint file not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable checkpoint (corrupt or truncated?): {e}") from e
    except Exception as e:  # pickle.UnpicklingError for anything that is not weights-only
        raise CheckpointError(f"{path} could not be loaded with weights_only=True: {e}") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, expected a dict checkpoint")
    return ckpt


def _resolve(release: Release | None, path: str | os.PathLike | None, progress: bool) -> Path:
    if path is not None:
        return Path(path)
    assert release is not None
    return fetch(release, progress=progress)


def _report(name: str, model: torch.nn.Module, verbose: bool) -> None:
    if verbose:  # upstream prints the parameter count on load; it is the quickest check of which file was loaded
        print(f"Loaded {name} with {sum(p.numel() for p in model.parameters()):,} parameters.")


# ---------------------------------------------------------------------------------------------------------------------
# Loaders with the upstream entry-point names.


def wavlm_large(path=None, map_location="cpu", progress=True, verbose=False):
    """WavLM-Large -> (model, extract_features); ``extract_features(model, wav[1, T], sr, layer=11)`` as upstream."""
    from dpslm_stream.models import wavlm

    ckpt = read_checkpoint(_resolve(WAVLM_LARGE, path, progress), map_location)
    model = wavlm.load_checkpoint_dict(ckpt, map_location=map_location)
    _report("WavLM", model, verbose)
    return model, wavlm.extract_features


def codebook(layer: int = 11, k: int = DEFAULT_K, path=None, map_location="cpu", progress=True) -> torch.Tensor:
    """The k-means codebook of WavLM-Large layer 11 -> float32 Tensor[K, 1024]."""
    if layer != 11:
        raise UnknownModel(f"only layer-11 codebooks were released (asked for layer {layer})")
    release = CODEBOOKS[check_codebook_k(k)] if path is None else None
    ckpt = read_checkpoint(_resolve(release, path, progress), map_location)
    if "codebook" not in ckpt or not isinstance(ckpt["codebook"], torch.Tensor) or ckpt["codebook"].dim() != 2:
        raise CheckpointError(f"{path or release.filename}: expected {{'codebook': Tensor[K, D]}}, got keys {list(ckpt)}")
    cb = ckpt["codebook"].float()
    if path is None and cb.shape[0] != k:
        raise CheckpointError(f"{release.filename} holds {cb.shape[0]} centroids, expected k={k}")
    return cb


def dpdp_quantizer_from_codebook(codebook: torch.Tensor, lmbda: float, num_neighbors: int | None = None):
    """Upstream nicolvisser/dpdp's entry point: a DPDPQuantizer module (exact O(T·N) Viterbi here)."""
    from dpslm_stream.dpdp import DPDPQuantizer

    return DPDPQuantizer.from_codebook(codebook, lmbda, num_neighbors)


def _ulm(table, k, lmbda, path, map_location, progress, verbose):
    release = table[check_pair(k, lmbda, table)] if path is None else None
    from dpslm_stream.models import ulm

    ckpt = read_checkpoint(_resolve(release, path, progress), map_location)
    model = ulm.load_checkpoint_dict(ckpt, map_location=map_location)
    _report("ULM", model, verbose)
    return model, ulm.UnitTokenizer(num_units=model.config.vocab_size - 1)


def ulm_wavlm_layer_11_dpdp_hours_1k_steps_10k(k=DEFAULT_K, lmbda=DEFAULT_LMBDA, path=None, map_location="cpu",
                                               progress=True, verbose=False):  # fmt: skip
    """The unit LM trained on 1k hours for 10k steps -> (ulm, tokenizer)."""
    return _ulm(ULM_1K, k, lmbda, path, map_location, progress, verbose)


def ulm_wavlm_layer_11_dpdp_hours_60k_steps_200k(k=DEFAULT_K, lmbda=DEFAULT_LMBDA, path=None, map_location="cpu",
                                                 progress=True, verbose=False):  # fmt: skip
    """The unit LM trained on 60k hours for 200k steps (only k=500, lambda=4500) -> (ulm, tokenizer)."""
    return _ulm(ULM_60K, k, lmbda, path, map_location, progress, verbose)


def ellav_units_to_wavtokenizer(k=DEFAULT_K, lmbda=DEFAULT_LMBDA, path=None, map_location="cpu", progress=True,
                                verbose=False):  # fmt: skip
    """ELLA-V acoustic model (units -> WavTokenizer codec ids) with ``generate(...)`` as upstream."""
    release = ELLAV[check_pair(k, lmbda, ELLAV)] if path is None else None
    from dpslm_stream.models import ellav

    ckpt = read_checkpoint(_resolve(release, path, progress), map_location)
    model = ellav.load_checkpoint_dict(ckpt, map_location=map_location)
    _report("ELLA-V GAR model", model, verbose)
    return model


def _wavtokenizer(hop: int, path, map_location, progress, verbose):
    from dpslm_stream.models import wavtokenizer

    release = WAVTOKENIZER[hop] if path is None else None
    ckpt = read_checkpoint(_resolve(release, path, progress), map_location)
    model = wavtokenizer.load_checkpoint_dict(ckpt, map_location=map_location)
    wavtokenizer.check_release_structure(model.config, wavtokenizer.FULL if hop == 600 else wavtokenizer.FULL_320)
    _report("WavTokenizer", model, verbose)
    # Upstream returns (model, encode, decode); only the decoder is kept here, so encode is None.
    return model, None, wavtokenizer.vocode


def small_600_24k_4096(path=None, map_location="cpu", progress=True, verbose=False):
    """WavTokenizer small, hop 600 (40 Hz), 24 kHz, 4096 codes -> (model, None, vocode)."""
    return _wavtokenizer(600, path, map_location, progress, verbose)


def small_320_24k_4096(path=None, map_location="cpu", progress=True, verbose=False):
    """WavTokenizer small, hop 320 (75 Hz), 24 kHz, 4096 codes -> (model, None, vocode)."""
    return _wavtokenizer(320, path, map_location, progress, verbose)


# ---------------------------------------------------------------------------------------------------------------------
# Model sets: where a command finds its checkpoints ("release", "tiny", or a folder of upstream-named files).


@dataclass(frozen=True)
class ModelSet:
    """Resolves checkpoint files for one source.

    ``source`` is ``"release"`` (the torch.hub cache, downloading when allowed), ``"tiny"`` (the deterministic
    random-weight set, built on first use, see dpslm_stream.tiny) or a folder holding files named as the releases
    (the hash part of the name may differ, so a folder of re-exported or tiny files works the same way).
    """

    source: str = "release"
    progress: bool = True

    @property
    def is_random(self) -> bool:
        """True when the weights are random (the tiny set): outputs are plumbing checks, not speech."""
        if self.source == "tiny":
            return True
        return (Path(self.source) / "RANDOM_WEIGHTS").exists()

    def describe(self) -> str:
        if self.is_random:
            return f"{self.source} (RANDOM WEIGHTS: units, scores and audio are not speech)"
        return self.source

    def _folder(self) -> Path:
        if self.source == "tiny":
            from dpslm_stream.tiny import ensure_tiny_set

            return ensure_tiny_set()
        folder = Path(self.source)
        if not folder.is_dir():
            raise CheckpointUnavailable(f"model folder not found: {folder} (use --models release|tiny|DIR)")
        return folder

    def path(self, release: Release) -> Path:
        if self.source == "release":
            return fetch(release, progress=self.progress)
        folder = self._folder()
        exact = folder / release.filename
        if exact.is_file():
            return exact
        # Same name up to the hash suffix: "<stem>-<hash>.<ext>" or "<stem>_<hash>.<ext>".
        stem, ext = re.match(r"(.*)[-_][a-f0-9]{8}(\.\w+)$", release.filename).groups()
        matches = sorted(folder.glob(f"{stem}[-_]*{ext}"))
        if not matches:
            raise CheckpointUnavailable(
                f"{release.filename} not found in {folder} (looked for {stem}-*{ext}); "
                f"download it with `dpslm-stream download` or from {release.url}"
            )
        return matches[0]

    def pairs(self) -> list[tuple[int, int]]:
        """The (k, lambda) pairs whose ULM is available in this set (all 24 for the releases)."""
        if self.source == "release":
            return list(VALID_PAIRS)
        folder = self._folder()
        return [p for p, r in ULM_1K.items() if any(folder.glob(r.filename.rsplit("-", 1)[0] + "-*.pt"))]

    # The loaders, by what they load.
    def wavlm(self, map_location="cpu"):
        return wavlm_large(path=self.path(WAVLM_LARGE), map_location=map_location)

    def codebook(self, k: int, map_location="cpu") -> torch.Tensor:
        return codebook(11, k, path=self.path(CODEBOOKS[check_codebook_k(k)]), map_location=map_location)

    def ulm(self, k: int, lmbda: int, map_location="cpu"):
        return ulm_wavlm_layer_11_dpdp_hours_1k_steps_10k(path=self.path(ULM_1K[check_pair(k, lmbda)]),
                                                          map_location=map_location)  # fmt: skip

    def ellav(self, k: int, lmbda: int, map_location="cpu"):
        return ellav_units_to_wavtokenizer(path=self.path(ELLAV[check_pair(k, lmbda, ELLAV)]), map_location=map_location)

    def wavtokenizer(self, map_location="cpu"):
        return small_600_24k_4096(path=self.path(WAVTOKENIZER[600]), map_location=map_location)


def download(k: int = DEFAULT_K, lmbda: int = DEFAULT_LMBDA, *, what: tuple[str, ...] = ("wavlm", "codebook", "ulm",
             "ellav", "wavtokenizer"), progress: bool = True, on_file: Callable[[Path], None] | None = None) -> list[Path]:  # fmt: skip
    """Pre-fetch the files one (k, lambda) setting needs into the torch.hub cache; returns their paths."""
    k, lmbda = check_pair(k, lmbda)
    releases = {
        "wavlm": WAVLM_LARGE, "codebook": CODEBOOKS[k], "ulm": ULM_1K[(k, lmbda)],
        "ellav": ELLAV[(k, lmbda)], "wavtokenizer": WAVTOKENIZER[600],
    }  # fmt: skip
    paths = []
    for name in what:
        p = fetch(releases[name], progress=progress)
        paths.append(p)
        if on_file:
            on_file(p)
    return paths
