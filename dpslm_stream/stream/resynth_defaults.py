"""The resynthesis knobs' defaults, each defined once (no torch: the wire protocol's options read them too).

IncrementalELLAV, IncrementalVocoder, ResynthWorker.open_session, ResynthOptions (the server's start.resynth) and
`bench resynth` / `bench wavtokenizer` all take their defaults from here. Units are deduplicated units (DP-SLM k=500,
lambda=4500 gives ~10-25 units/s) and 25 ms codec frames.
"""

DEFAULT_LEFT_CONTEXT = 32  # C: committed units kept in each ELLA-V prompt (about 1.5-3 s of speech: the voice)
DEFAULT_HOLDBACK = 3  # L: units of lookahead the last committed unit sees (spec §5 expects 2-4 to be close)
DEFAULT_MAX_PASS_UNITS = 32  # units after the committed ones that one prompt holds (bounds a backlog's prompt)
DEFAULT_MAX_CODEC_TOKENS_PER_PHONE = 10  # M, as dp-slm's example
DEFAULT_TEMPERATURE = 1.0  # sampling only (greedy is the default)
DEFAULT_TOP_P = 0.8
# The vocoder window: 48 frames (1.2 s) of left context and 4 (100 ms) of lookahead, the backbone run once 4 new
# frames (100 ms) can be committed. Earlier the bare IncrementalVocoder defaulted to 120/8/1 (3 s, the training
# crop; 200 ms; every frame) while live resynthesis used 48/4/4; one set now, the live one: its latency is what a
# listener hears, and `bench wavtokenizer --left-context 120 --lookahead 8 --min-step 1` still measures the other.
DEFAULT_VOCODER_LEFT_CONTEXT = 48
DEFAULT_VOCODER_LOOKAHEAD = 4
DEFAULT_VOCODER_MIN_STEP = 4
# The first window commits as soon as it can commit 2 frames (lookahead + 2 frames received) instead of min_step: 2 is
# the fewest that give audio (the iSTFT's 900-sample delay is 1.5 hops), so the stream's first audio waits for 6
# decoded frames instead of 8 (at ~40 ms per full-size decode step on a CPU, 0.08 s sooner), at the price of one more,
# short, backbone forward per stream. With a lookahead past the stream's end (the exact setting) nothing commits
# before the end either way.
DEFAULT_VOCODER_FIRST_STEP = 2
