"""dpslm-stream: streaming, real-time DP-SLM.

WavLM-Large layer 11 (50 Hz) -> DPDP quantisation (codebook of size k, duration penalty lambda) -> deduplicated
units -> unit LM scores; units -> ELLA-V codec tokens -> WavTokenizer 24 kHz audio.
"""

from pathlib import Path as _Path

__version__ = "0.1.0"

# The bundled speech sample (espeak-ng synthesis, 16 kHz mono): the demo's input and the README's example audio.
SAMPLE_WAV = _Path(__file__).resolve().parent / "data" / "sample.wav"
