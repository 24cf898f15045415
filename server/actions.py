"""What the session core (server/session.py) asks its I/O layer (server/app.py) to do: plain values, no behaviour.

The core never touches a socket, a thread or a timer: every event method returns a list of these, and the asyncio
``Connection`` carries them out in order. New outgoing kinds (e.g. another binary frame type) are one more ``Send``
of other bytes; new backend requests are one more dataclass here and one more branch in ``Connection.execute``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np

from dpslm_stream.stream.resynth_options import ResynthOptions


@dataclass(frozen=True)
class Send:
    """Queue one frame for the client (text: a JSON message; bytes: a binary frame). ``nbytes`` counts against the
    connection's outgoing limit until the I/O layer reports it written (``Session.sent``)."""

    data: str | bytes
    nbytes: int


@dataclass(frozen=True)
class Close:
    """Close the WebSocket with ``code`` once every frame queued before this one has been written."""

    code: int
    reason: str


@dataclass(frozen=True)
class Abort:
    """Close now with ``code``, dropping the frames not yet written (a client that does not read)."""

    code: int
    reason: str


@dataclass(frozen=True)
class OpenSession:
    """Open the backends of a sender: the resynthesis stream first (when ``resynth`` is set), then the encoder slot
    (``EncoderBackend.open_slot(session_id, sample_rate, settings, ...)``). Report ``Session.opened`` or
    ``Session.open_failed``; undo a half-open pair yourself."""

    sample_rate: int
    settings: dict[str, Any]  # EncoderWorker.open_session keyword arguments (k, lmbda, mode, preset, window sizes...)
    resynth: ResynthOptions | None


@dataclass(frozen=True)
class Subscribe:
    """Attach this connection as a listener of sender ``session`` (checking ``token`` and the sender's capacity) and
    open its resynthesis stream; report ``Session.subscribed`` or ``Session.subscribe_failed``."""

    session: str
    token: str
    resynth: ResynthOptions | None
    bitstream: bool = False  # the listener takes the sender's bitstream frames (its start.transmit) instead of units


@dataclass(frozen=True)
class FeedAudio:
    """Queue samples (float32 at the session's rate) for the encoder and wake it."""

    samples: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class RequestEnd:
    """No more audio: the encoder finishes the queued audio and sends its end event."""


@dataclass(frozen=True)
class CancelSlot:
    """Stop serving the encoder session now (its results are no longer wanted)."""


@dataclass(frozen=True)
class PushUnits:
    """Hand committed units (and the input time each ends at) to this connection's resynthesis stream."""

    units: tuple[int, ...]
    end_s: tuple[float, ...]


@dataclass(frozen=True)
class EndResynth:
    """No more units for the resynthesis stream: it finishes their audio and sends its end event."""


@dataclass(frozen=True)
class CloseResynth:
    """Stop serving the resynthesis stream now."""


@dataclass(frozen=True)
class Relay:
    """Sender: hand this unit message to every listener (``Session.relay_unit`` on theirs)."""

    unit: Any  # protocol.Unit


@dataclass(frozen=True)
class ListenersDone:
    """Sender: the stream is over for its listeners (``gone``: before its last unit); ``Session.sender_done``."""

    gone: bool


@dataclass(frozen=True)
class Unsubscribe:
    """Listener: detach from the sender (it keeps streaming)."""


@dataclass(frozen=True)
class Register:
    """Sender: make this session findable by listeners (``listen_token``) and, with a ``resume_token``, by a
    reconnecting client (``Resume``) from now on."""

    listen_token: str
    resume_token: str | None = None


@dataclass(frozen=True)
class Resume:
    """A new connection asks to take over the session with ``msg.token``: find it, check ``Session.resume_refusal``,
    then ``Session.resume`` on it with this transport (and ``Session.handed_over`` here), or ``Session.resume_failed``
    here."""

    msg: Any  # protocol.Resume


@dataclass(frozen=True)
class Transmit:
    """start.transmit: hand committed units to the session's transmitter (codec thread, in order); its packets come
    back as ``Session.transmitted``."""

    units: tuple[int, ...]
    durations: tuple[int, ...] | None
    at: float


@dataclass(frozen=True)
class TransmitTick:
    """The open packet is due: advance the transmitter's clock to ``at``."""

    at: float


@dataclass(frozen=True)
class TransmitEnd:
    """Every unit is out: the transmitter sends its last packet (END flag); ``Session.transmitted(done=True)``."""

    at: float


@dataclass(frozen=True)
class RelayBits:
    """Give one bitstream frame's bytes (part "header" or "packet") to this sender's bitstream listeners."""

    part: str
    data: bytes


Action = Union[Send, Close, Abort, OpenSession, Subscribe, FeedAudio, RequestEnd, CancelSlot, PushUnits, EndResynth,
               CloseResynth, Relay, ListenersDone, Unsubscribe, Register, Transmit, TransmitTick, TransmitEnd,
               RelayBits, Resume]  # fmt: skip
