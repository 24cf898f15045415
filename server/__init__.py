"""WebSocket server (installed as dpslm_stream.server)."""
