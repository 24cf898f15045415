"""torch.hub entry points: a drop-in for the upstream DP-SLM calls.

    torch.hub.load("<owner>/dpslm-stream", "wavlm_large")                        # or source="local" on a checkout
    torch.hub.load(..., "codebook", layer=11, k=500)
    torch.hub.load(..., "dpdp_quantizer_from_codebook", codebook=cb, lmbda=4500, num_neighbors=25)
    torch.hub.load(..., "ulm_wavlm_layer_11_dpdp_hours_1k_steps_10k", k=500, lmbda=4500)
    torch.hub.load(..., "ellav_units_to_wavtokenizer", k=500, lmbda=4500)
    torch.hub.load(..., "small_600_24k_4096")
Each also takes path= a local checkpoint file in the upstream format.
"""

dependencies = ["torch", "numpy", "numba"]

from dpslm_stream.hub import (  # noqa: E402,F401
    codebook,
    dpdp_quantizer_from_codebook,
    ellav_units_to_wavtokenizer,
    small_320_24k_4096,
    small_600_24k_4096,
    ulm_wavlm_layer_11_dpdp_hours_1k_steps_10k,
    ulm_wavlm_layer_11_dpdp_hours_60k_steps_200k,
    wavlm_large,
)
