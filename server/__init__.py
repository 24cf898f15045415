"""The live units server (installed as dpslm_stream.server): `dpslm-stream serve`.

- app.py: the asyncio ``websockets`` app (sessions, limits, auth, /healthz, /metrics, the page) and ServerThread;
- worker.py: the one model-worker thread that batches every session's encoder steps;
- meters.py: per-session lag and bitrate measurements; metrics.py: Prometheus metrics.
The wire protocol is dpslm_stream.protocol.
"""

from .cli import add_parser, run

__all__ = ["add_parser", "run"]
