"""Python, file, microphone and browser clients of the live units server (installed as dpslm_stream.client).

- ``UnitsClient`` (client/api.py): the embeddable async client, an async iterator of protocol messages;
- ``dpslm-stream stream FILE`` (client/stream.py): stream files, write the ``encode --json`` format;
- ``dpslm-stream mic`` (client/mic.py): live microphone (needs the optional sounddevice);
- client/web/: the browser page the server serves at ``/``.
"""

from .api import ListenerClient, SessionError, UnitsClient, chunked

__all__ = ["ListenerClient", "SessionError", "UnitsClient", "chunked"]
