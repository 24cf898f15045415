"""dpslm-stream: streaming, real-time DP-SLM.

WavLM-Large layer 11 (50 Hz) -> DPDP quantisation (codebook of size k, duration penalty lambda) -> deduplicated
units -> unit LM scores; units -> ELLA-V codec tokens -> WavTokenizer 24 kHz audio.
"""

__version__ = "0.1.0"
