"""torch.hub entry points: a drop-in for the upstream DP-SLM calls (same names, positional parameters, defaults and
return values as the upstream hubconf files; see dpslm_stream/hub.py for the list).

    torch.hub.load("<owner>/dpslm-stream", "wavlm_large")          # or ("/path/to/checkout", ..., source="local")
    torch.hub.load(..., "codebook", layer=11, k=500)
    torch.hub.load(..., "dpdp_quantizer_from_codebook", codebook=cb, lmbda=4500, num_neighbors=25)
    torch.hub.load(..., "ulm_wavlm_layer_11_dpdp_hours_1k_steps_10k", k=500, lmbda=4500)
    torch.hub.load(..., "ellav_units_to_wavtokenizer", k=500, lmbda=4500)
    torch.hub.load(..., "small_600_24k_4096")
Keyword-only extras: path= a local checkpoint file in the upstream format. Each entry prints what it loaded, as
upstream does; torch.hub.load(..., verbose=False) silences that too (torch.hub keeps `verbose` for itself, so the
entries below read it from the torch.hub.load call that runs them).
"""

dependencies = ["torch", "numpy", "numba"]

import functools  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402

from dpslm_stream import hub as _hub  # noqa: E402
from dpslm_stream.hub import dpdp_quantizer, dpdp_quantizer_from_codebook  # noqa: E402,F401


def _torch_hub_verbose() -> bool | None:
    """The `verbose` argument of the torch.hub.load call on the stack, if this entry is being run by one."""
    frame = sys._getframe(2)
    for _ in range(16):  # torch.hub.load -> _load_local -> entry: a few frames up
        if frame is None:
            return None
        if frame.f_code is torch.hub.load.__code__:
            return bool(frame.f_locals.get("verbose", True))
        frame = frame.f_back
    return None


def _entry(fn):
    @functools.wraps(fn)
    def entry(*args, **kwargs):
        if "verbose" not in kwargs:
            verbose = _torch_hub_verbose()
            if verbose is not None:
                kwargs["verbose"] = verbose
        return fn(*args, **kwargs)

    return entry


wavlm_large = _entry(_hub.wavlm_large)
codebook = _entry(_hub.codebook)
ulm_wavlm_layer_11_dpdp_hours_1k_steps_10k = _entry(_hub.ulm_wavlm_layer_11_dpdp_hours_1k_steps_10k)
ulm_wavlm_layer_11_dpdp_hours_60k_steps_200k = _entry(_hub.ulm_wavlm_layer_11_dpdp_hours_60k_steps_200k)
plm_us_arpa_hours_1k_steps_10k = _entry(_hub.plm_us_arpa_hours_1k_steps_10k)
ellav_units_to_wavtokenizer = _entry(_hub.ellav_units_to_wavtokenizer)
ellav_phones_to_wavtokenizer = _entry(_hub.ellav_phones_to_wavtokenizer)
small_600_24k_4096 = _entry(_hub.small_600_24k_4096)
small_320_24k_4096 = _entry(_hub.small_320_24k_4096)
