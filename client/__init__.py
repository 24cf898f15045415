"""Python, file, microphone and browser clients (installed as dpslm_stream.client)."""
