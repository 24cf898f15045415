"""Release registry and checkpoint loaders: a drop-in for the upstream torch.hub entry points of DP-SLM.

Every entry point has upstream's name, positional parameters, defaults and return value, so a call copied from an
upstream README or hubconf works unchanged; our extras are keyword-only after them:
``path=`` a local file in the same upstream format (instead of the release download) and ``verbose=`` (upstream
prints what it loaded; ``verbose=False`` silences it, also through ``torch.hub.load(..., verbose=False)``, which
passes it on because our hubconf wraps each entry).

Release files are downloaded once from the upstream release URL with a progress bar, SHA-256 prefix checked, and
cached in torch.hub's checkpoint directory, so files that upstream DP-SLM already fetched are reused. Checkpoints are
read with ``weights_only=True`` onto the CPU (memory-mapped where the file format allows), models are built from
the checkpoint's own config, loaded strictly, and only then moved to ``map_location``: a device that does not exist,
a bad ordinal or running out of device memory is reported as such, and the parts of a file that are dropped (e.g.
WavTokenizer's encoder and training modules) never reach the device.

Upstream entry points:
    wavlm_large(map_location="cpu", progress=True)          -> (model, extract_features)   nicolvisser/WavLM-codebooks
    codebook(layer, k, map_location="cpu", progress=True)   -> Tensor[K, 1024] as stored   nicolvisser/WavLM-codebooks
    dpdp_quantizer_from_codebook(codebook, lmbda, num_neighbors=None) -> DPDPQuantizer    nicolvisser/dpdp
    dpdp_quantizer(codebook_size, codebook_dim, lmbda, num_neighbors=None) -> DPDPQuantizer nicolvisser/dpdp
    ulm_wavlm_layer_11_dpdp_hours_1k_steps_10k(k, lmbda, map_location="cpu", progress=True)  -> (ulm, UnitTokenizer)
    ulm_wavlm_layer_11_dpdp_hours_60k_steps_200k(k, lmbda, map_location="cpu", progress=True) -> (ulm, UnitTokenizer)
    plm_us_arpa_hours_1k_steps_10k(k, lmbda, map_location="cpu", progress=True) -> (phone LM, PhonemeTokenizer)
                                                          (k and lambda are ignored, as upstream) nicolvisser/Mistral-ULM
    ellav_units_to_wavtokenizer(k, lmbda, map_location="cpu", progress=True)  -> ELLA-V        nicolvisser/ELLA-V
    ellav_phones_to_wavtokenizer(map_location="cpu", progress=True)           -> ELLA-V        nicolvisser/ELLA-V
    small_600_24k_4096(pretrained=True, progress=True) / small_320_24k_4096(...) -> (model, encode, decode)
                                                                                            nicolvisser/WavTokenizer
WavTokenizer: only the decoder is implemented (what DP-SLM uses), so ``encode`` raises NotImplementedError saying so;
``decode`` (upstream's, which dp-slm calls ``vocode``) works as upstream. Upstream loads WavTokenizer on the CPU and
has no map_location; ours takes it as a keyword-only extra.
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from dpslm_stream.errors import CheckpointError, CheckpointUnavailable, DeviceError, DPSLMError, UnknownModel
# The release table lives in dpslm_stream.releases (shared with the tiny-set builder); re-exported here so
# `hub.ULM_1K`, `hub.check_pair`, ... keep working.
from dpslm_stream.releases import (  # noqa: F401  (re-exports)
    CODEBOOKS, DEFAULT_K, DEFAULT_LMBDA, ELLAV, ELLAV_PHONES, PHONE_TOKENIZER, PLM, ULM_1K, ULM_60K, VALID_PAIRS,
    WAVLM_LARGE, WAVTOKENIZER, Release, all_releases, check_codebook_k, check_pair,
)


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
            f"{release.filename} is not cached in {dst.parent} and could not be downloaded ({_short_reason(e)}): "
            f"fetch {release.url} where there is network (`dpslm-stream download --list` lists every file) and copy "
            f"it there, or, to try everything offline, use the tiny RANDOM-weight set ({TINY_HINT})"
        ) from e
    return dst


def _short_reason(e: Exception) -> str:
    reason = getattr(e, "reason", None) or e
    return " ".join(str(reason).split())[:120]


# How to use the tiny set instead; named in every "not available offline" error.
def _tiny_contents() -> str:
    from dpslm_stream.tiny import TINY_CODEBOOK_KS, TINY_PAIRS

    return (f"k:lambda {', '.join(f'{k}:{lm}' for k, lm in TINY_PAIRS)}; codebooks k="
            f"{', '.join(map(str, TINY_CODEBOOK_KS))}")


TINY_HINT = (f"--models tiny on the command line, hub.use_tiny_set_if_offline() or hub.ModelSet('tiny') in Python; "
             f"it holds {_tiny_contents()}")


def read_checkpoint(path: str | os.PathLike) -> dict:
    """torch.load(weights_only=True) onto the CPU, memory-mapped when the file is in torch's zip format (so a 1.2 GB
    checkpoint is not copied before the model takes its tensors), with errors that name the file and say what is
    wrong with it. Moving to a device is the caller's step (`to_device`), so a device problem is never reported as a
    bad file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointUnavailable(f"checkpoint file not found: {path}")
    try:
        mmap = zipfile.is_zipfile(path)  # the legacy (non-zip) format cannot be memory-mapped
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable checkpoint (corrupt or truncated?): {e}") from e
    except Exception as e:  # pickle.UnpicklingError for anything that is not weights-only
        raise CheckpointError(f"{path} could not be loaded with weights_only=True: {e}") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, expected a dict checkpoint")
    return ckpt


def check_device(map_location: str | torch.device, what: str = "map_location") -> torch.device:
    """The torch.device for `map_location`, checked before any file is read: a DeviceError saying what is wrong
    (not a device name, CUDA not available, an ordinal past the device count). `what` names it in the message."""
    if not isinstance(map_location, (str, torch.device)):
        raise DeviceError(f"{what} must be a device such as 'cpu', 'cuda' or 'cuda:1', got {map_location!r}")
    try:
        device = torch.device(map_location)
    except (RuntimeError, ValueError) as e:
        raise DeviceError(f"{what} {map_location!r} is not a torch device ({e}); use 'cpu', 'cuda', 'cuda:1'") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{what} {str(device)!r}: CUDA is not available here "
                              f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use 'cpu'")  # fmt: skip
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceError(f"{what} {str(device)!r}: no such GPU (this machine has {count}: "
                              f"{', '.join(f'cuda:{i}' for i in range(count))})")  # fmt: skip
    return device


def to_device(what: str, load: Callable[[], object], device: torch.device):
    """Run `load` (which builds a model from CPU tensors and moves it to `device`), reporting a failure of the
    move itself (out of device memory, a CUDA error) as a DeviceError that names the model and the device."""
    try:
        return load()
    except DPSLMError:
        raise
    except torch.OutOfMemoryError as e:
        raise DeviceError(f"not enough memory on {device} to load {what}: {e}") from e
    except (RuntimeError, AssertionError) as e:
        if device.type == "cpu":
            raise
        raise DeviceError(f"could not move {what} to {device}: {e}") from e


def _resolve(release: Release | None, path: str | os.PathLike | None, progress: bool) -> Path:
    if path is not None:
        return Path(path)
    assert release is not None
    return fetch(release, progress=progress)


def _report(verbose: bool, message: str) -> None:
    if verbose:  # upstream prints what it loaded; it is the quickest check of which file was loaded
        print(message)


def _num_params(model: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in model.parameters()):,}"


# ---------------------------------------------------------------------------------------------------------------------
# Loaders with the upstream entry-point names, positional parameters and defaults.


def wavlm_large(map_location="cpu", progress=True, *, path=None, verbose=True):
    """WavLM-Large -> (model, extract_features). ``extract_features(model, wav[1, T], sr, layer=None)`` as upstream:
    layer=None is the full depth with the final LayerNorm, layer=11 what DP-SLM uses."""
    from dpslm_stream.models import wavlm

    device = check_device(map_location)
    ckpt = read_checkpoint(_resolve(WAVLM_LARGE, path, progress))
    model = to_device("WavLM-Large", lambda: wavlm.load_checkpoint_dict(ckpt, map_location=device), device)
    _report(verbose, f"Loaded WavLM with {_num_params(model)} parameters.")
    return model, wavlm.extract_features


def codebook(layer: int = 11, k: int = DEFAULT_K, map_location="cpu", progress=True, *, path=None,
             verbose=True) -> torch.Tensor:  # fmt: skip
    """The k-means codebook of WavLM-Large layer 11: the stored Tensor[K, 1024], unchanged (dtype as in the file)."""
    if layer != 11:
        raise UnknownModel(f"only layer-11 codebooks were released (asked for layer {layer}); valid k: {sorted(CODEBOOKS)}")
    release = CODEBOOKS[check_codebook_k(k)] if path is None else None
    device = check_device(map_location)
    ckpt = read_checkpoint(_resolve(release, path, progress))
    if "codebook" not in ckpt or not isinstance(ckpt["codebook"], torch.Tensor) or ckpt["codebook"].dim() != 2:
        raise CheckpointError(f"{path or release.filename}: expected {{'codebook': Tensor[K, D]}}, got keys {list(ckpt)}")
    cb = ckpt["codebook"]
    if path is None and cb.shape[0] != k:
        raise CheckpointError(f"{release.filename} holds {cb.shape[0]} centroids, expected k={k}")
    cb = to_device(f"the k={cb.shape[0]} codebook", lambda: cb.to(device), device)
    _report(verbose, f"WavLM codebook loaded with shape: {cb.shape}")
    return cb


def dpdp_quantizer_from_codebook(codebook: torch.Tensor, lmbda: float, num_neighbors: int | None = None):
    """Upstream nicolvisser/dpdp's entry point: a DPDPQuantizer holding a copy of `codebook` (its dtype and device),
    exact O(T·N) Viterbi here."""
    from dpslm_stream.dpdp import DPDPQuantizer

    return DPDPQuantizer.from_codebook(codebook, lmbda, num_neighbors)


def dpdp_quantizer(codebook_size: int, codebook_dim: int, lmbda: float, num_neighbors: int | None = None):
    """Upstream nicolvisser/dpdp's other entry point: a DPDPQuantizer with a random (randn) codebook to train or
    to fill with `load_state_dict({"codebook": ...})`."""
    from dpslm_stream.dpdp import DPDPQuantizer

    return DPDPQuantizer(codebook_size, codebook_dim, lmbda, num_neighbors)


def _lm(what: str, release: Release | None, path, map_location, progress, verbose):
    from dpslm_stream.models import ulm

    device = check_device(map_location)
    ckpt = read_checkpoint(_resolve(release, path, progress))
    model = to_device(what, lambda: ulm.load_checkpoint_dict(ckpt, map_location=device), device)
    _report(verbose, f"Loaded {what} model with {_num_params(model)} parameters.")
    return model


def ulm_wavlm_layer_11_dpdp_hours_1k_steps_10k(k=DEFAULT_K, lmbda=DEFAULT_LMBDA, map_location="cpu", progress=True,
                                               *, path=None, verbose=True):  # fmt: skip
    """The unit LM trained on 1k hours for 10k steps -> (ulm, tokenizer)."""
    from dpslm_stream.models.ulm import UnitTokenizer

    release = ULM_1K[check_pair(k, lmbda, ULM_1K)] if path is None else None
    model = _lm("ULM", release, path, map_location, progress, verbose)
    return model, UnitTokenizer(num_units=model.config.vocab_size - 1)


def ulm_wavlm_layer_11_dpdp_hours_60k_steps_200k(k=DEFAULT_K, lmbda=DEFAULT_LMBDA, map_location="cpu", progress=True,
                                                 *, path=None, verbose=True):  # fmt: skip
    """The unit LM trained on 60k hours for 200k steps (only k=500, lambda=4500) -> (ulm, tokenizer)."""
    from dpslm_stream.models.ulm import UnitTokenizer

    release = ULM_60K[check_pair(k, lmbda, ULM_60K)] if path is None else None
    model = _lm("ULM", release, path, map_location, progress, verbose)
    return model, UnitTokenizer(num_units=model.config.vocab_size - 1)


def plm_us_arpa_hours_1k_steps_10k(k=None, lmbda=None, map_location="cpu", progress=True, *, path=None,
                                   tokenizer_path=None, verbose=True):  # fmt: skip
    """The phone LM (US ARPAbet phones, 1k hours, 10k steps) -> (model, PhonemeTokenizer). Upstream's signature
    takes k and lmbda and ignores them (one phone LM serves every setting); so does this one. ``path`` /
    ``tokenizer_path``: local copies of the checkpoint and of us_arpa_tokenizer.json."""
    import json

    from dpslm_stream.models.ulm import PhonemeTokenizer

    model = _lm("ULM", PLM if path is None else None, path, map_location, progress, verbose)
    tok_file = _resolve(PHONE_TOKENIZER if tokenizer_path is None else None, tokenizer_path, progress)
    try:
        tokenizer = PhonemeTokenizer.from_dict(json.loads(Path(tok_file).read_text()))
    except FileNotFoundError as e:
        raise CheckpointUnavailable(f"phone tokenizer file not found: {tok_file}") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{tok_file} is not a phone tokenizer JSON file: {e}") from e
    if tokenizer.vocab_size != model.config.vocab_size:
        raise CheckpointError(f"{tok_file} has {tokenizer.vocab_size} phones but the phone LM's vocabulary is "
                              f"{model.config.vocab_size}: the two files do not belong together")  # fmt: skip
    return model, tokenizer


def _ellav(release: Release | None, path, map_location, progress, verbose):
    from dpslm_stream.models import ellav

    device = check_device(map_location)
    ckpt = read_checkpoint(_resolve(release, path, progress))
    model = to_device("ELLA-V", lambda: ellav.load_checkpoint_dict(ckpt, map_location=device), device)
    _report(verbose, f"Loaded ELLA-V GAR model with {_num_params(model)} parameters.")
    return model


def ellav_units_to_wavtokenizer(k=DEFAULT_K, lmbda=DEFAULT_LMBDA, map_location="cpu", progress=True, *, path=None,
                                verbose=True):  # fmt: skip
    """ELLA-V acoustic model (DP-SLM units -> WavTokenizer codec ids) with ``generate(...)`` as upstream."""
    return _ellav(ELLAV[check_pair(k, lmbda, ELLAV)] if path is None else None, path, map_location, progress, verbose)


def ellav_phones_to_wavtokenizer(map_location="cpu", progress=True, *, path=None, verbose=True):
    """ELLA-V acoustic model (US ARPAbet phones -> WavTokenizer codec ids): the paper's phone topline. It loads
    strictly with its phone vocabulary; ``generate`` takes phone-string prompts (``[["HH", "AH0", "L", "OW1"]]``);
    SIL and UNK are dropped from prompts as upstream does, and a phone outside the vocabulary is an error."""
    return _ellav(ELLAV_PHONES if path is None else None, path, map_location, progress, verbose)


def _wavtokenizer_encode(model, wav, sr):
    raise NotImplementedError(
        "WavTokenizer encode (audio -> codec ids) is not part of dpslm-stream: only the decoder is implemented, "
        "which is what DP-SLM resynthesis uses. For encoding use upstream: "
        "torch.hub.load('nicolvisser/WavTokenizer', 'small_600_24k_4096', trust_repo=True)."
    )


def _wavtokenizer(hop: int, pretrained: bool, progress: bool, path, map_location, verbose):
    from dpslm_stream.models import wavtokenizer

    release_cfg = wavtokenizer.FULL if hop == 600 else wavtokenizer.FULL_320
    device = check_device(map_location)
    if pretrained:
        ckpt = read_checkpoint(_resolve(WAVTOKENIZER[hop] if path is None else None, path, progress))
        model = to_device("WavTokenizer", lambda: wavtokenizer.load_checkpoint_dict(ckpt, map_location=device), device)
        wavtokenizer.check_release_structure(model.config, release_cfg)
    else:  # upstream: the architecture with its initial (random) weights
        model = to_device("WavTokenizer", lambda: wavtokenizer.WavTokenizer(release_cfg).to(device).eval(), device)
    _report(verbose, f"Loaded WavTokenizer small_{hop}_24k_4096 with {_num_params(model)} parameters")
    return model, _wavtokenizer_encode, wavtokenizer.vocode


def small_600_24k_4096(pretrained: bool = True, progress: bool = True, *, path=None, map_location="cpu",
                       verbose=True):  # fmt: skip
    """WavTokenizer small, hop 600 (40 Hz), 24 kHz, 4096 codes -> (model, encode, decode); encode raises
    NotImplementedError (decoder only); decode(model, codes[1, B, L]) -> (audio[B, 600 L], 24000) as upstream."""
    return _wavtokenizer(600, pretrained, progress, path, map_location, verbose)


def small_320_24k_4096(pretrained: bool = True, progress: bool = True, *, path=None, map_location="cpu",
                       verbose=True):  # fmt: skip
    """WavTokenizer small, hop 320 (75 Hz), 24 kHz, 4096 codes -> (model, encode, decode); see small_600_24k_4096."""
    return _wavtokenizer(320, pretrained, progress, path, map_location, verbose)


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
        hashed = re.match(r"(.*)[-_][a-f0-9]{8}(\.\w+)$", release.filename)
        stem, ext = hashed.groups() if hashed else (Path(release.filename).stem, Path(release.filename).suffix)
        matches = sorted(folder.glob(f"{stem}[-_]*{ext}"))
        if not matches:
            if self.source == "tiny":
                raise CheckpointUnavailable(f"the tiny set has no {stem}; it holds {_tiny_contents()}")
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

    # The loaders, by what they load (quiet: commands print their own one-line summary).
    def wavlm(self, map_location="cpu"):
        return wavlm_large(map_location, path=self.path(WAVLM_LARGE), verbose=False)

    def codebook(self, k: int, map_location="cpu") -> torch.Tensor:
        return codebook(11, k, map_location, path=self.path(CODEBOOKS[check_codebook_k(k)]), verbose=False)

    def ulm(self, k: int, lmbda: int, map_location="cpu"):
        return ulm_wavlm_layer_11_dpdp_hours_1k_steps_10k(k, lmbda, map_location, path=self.path(ULM_1K[self._pair(k, lmbda)]),
                                                          verbose=False)  # fmt: skip

    def ellav(self, k: int, lmbda: int, map_location="cpu"):
        return ellav_units_to_wavtokenizer(k, lmbda, map_location, path=self.path(ELLAV[self._pair(k, lmbda, ELLAV)]),
                                           verbose=False)  # fmt: skip

    def wavtokenizer(self, map_location="cpu"):
        return small_600_24k_4096(path=self.path(WAVTOKENIZER[600]), map_location=map_location, verbose=False)

    def _pair(self, k, lmbda, table=None) -> tuple[int, int]:
        """check_pair, and for a local set (tiny or a folder) an error that lists the pairs it holds."""
        pair = check_pair(k, lmbda, table)
        if self.source != "release":
            have = self.pairs()
            if pair not in have:
                what = "the tiny set" if self.is_random and self.source == "tiny" else f"folder {self.source}"
                raise CheckpointUnavailable(
                    f"(k, lambda) = {pair} is not in {what}, which holds {', '.join(f'{a}:{b}' for a, b in have)}; "
                    f"pick one of those (--k K --lmbda L), or use the released models "
                    f"(`dpslm-stream download --k {pair[0]} --lmbda {pair[1]}`, then --models release)"
                )
        return pair


def release_cached(k: int = DEFAULT_K, lmbda: int = DEFAULT_LMBDA, encoder_only: bool = False) -> bool:
    """Whether the release files of one (k, lambda) setting are all in the torch.hub cache (no download needed)."""
    wanted = [WAVLM_LARGE, CODEBOOKS[k], ULM_1K[(k, lmbda)]] + ([] if encoder_only else [ELLAV[(k, lmbda)], WAVTOKENIZER[600]])
    return all((checkpoint_dir() / r.filename).is_file() for r in wanted)


def use_tiny_set_if_offline(k: int = DEFAULT_K, lmbda: int = DEFAULT_LMBDA) -> bool:
    """For trying the upstream calls on a machine without the released checkpoints: when the files of (k, lambda)
    are not all cached, point torch.hub's cache at a folder holding the tiny RANDOM-weight set under the release file
    names (built on first use, see dpslm_stream.tiny), say so, and return True; otherwise change nothing and return
    False. It sets torch.hub's directory for this process (torch.hub.set_dir), so torch.hub.load calls follow it."""
    if release_cached(k, lmbda):
        return False
    from dpslm_stream.tiny import TINY_CODEBOOK_KS, ensure_tiny_set

    tiny = ModelSet(str(ensure_tiny_set()))
    root = Path(tiny.source) / "torch_hub"
    folder = root / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    releases = [WAVLM_LARGE, *(CODEBOOKS[c] for c in TINY_CODEBOOK_KS), PLM, PHONE_TOKENIZER, ELLAV_PHONES,
                WAVTOKENIZER[600]]  # fmt: skip
    releases += [table[p] for p in tiny.pairs() for table in (ULM_1K, ELLAV)]
    for release in releases:
        link = folder / release.filename
        if not link.exists():
            try:
                link.symlink_to(tiny.path(release))
            except FileExistsError:  # another process made it
                pass
    torch.hub.set_dir(str(root))
    print(f"note: the released checkpoints are not cached: using the tiny RANDOM-weight set ({_tiny_contents()}); "
          f"outputs are plumbing checks, not speech. `dpslm-stream download --k {k} --lmbda {lmbda}` fetches the real ones.")
    return True


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
