"""An hour of audio through one encoder session (tiny random-weight set): the session's state stays flat.

What is measured is the state itself (`state_nbytes`: every tensor and array the session carries between steps),
never wall time. The window is chosen for speed (5 s hops), which changes how much work a step does, not what the
state holds: L frames of keys/values per layer, 64 projected frames, the hop's pending frames, DPDP survivors and
the ULM's bounded context.
"""

import numpy as np
import pytest
import torch

from dpslm_stream import hub
from dpslm_stream.stream.events import UnitEvent
from dpslm_stream.stream.worker import EncoderWorker


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_state_stays_flat_over_an_hour():
    worker = EncoderWorker(hub.ModelSet("tiny"), pairs=[(500, 4500)])
    session = worker.open_session(16000, 500, 4500, mode="cached", left=40, hop=250, lookahead=4, score=True)
    rng = np.random.default_rng(0)
    chunk_s = 60
    t = np.arange(chunk_s * 16000) / 16000
    sizes, last_end, units = [], 0, 0
    for minute in range(60):
        # Noise under a moving envelope plus a tone: new material every minute.
        x = rng.normal(0, 0.05, t.size) * (1.2 + np.sin(2 * np.pi * (0.5 + minute % 7) * t))
        x += 0.1 * np.sin(2 * np.pi * (150 + 10 * (minute % 13)) * t)
        session.push(x.astype(np.float32))
        worker.run_until_idle([session])
        events = session.poll()
        assert all(isinstance(e, UnitEvent) for e in events)
        if events:  # the stream keeps committing, contiguously, all hour long
            assert events[0].start_frame == last_end
            last_end = events[-1].end_frame
        units += len(events)
        sizes.append(session.state_nbytes)
    assert session.audio_seconds == 3600
    assert last_end > 3590 * 50 and units > 3600
    stats = session.stats
    assert stats.backlog_seconds < 5.1  # at most one hop plus the lookahead is waiting
    assert stats.forced_commits == 0
    # The ULM context fills during the first minutes; from then on the state does not grow at all.
    assert max(sizes[10:]) <= max(sizes[:10])
    assert max(sizes) < 4 * 2**20
    session.end()
    worker.step([session])
    *rest, end = session.poll()
    assert end.units == units + len(rest) and end.frames == 3600 * 50
