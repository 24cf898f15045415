"""Models of other (k, lambda) pairs: loaded off the model threads, and at most `max_loaded_pairs` at once.

A session of a pair not loaded yet loads that pair's unit LM / ELLA-V on a loading thread, so the other sessions'
units keep coming meanwhile (with the load on the model thread they stopped for the whole load). The server keeps
at most `max_loaded_pairs` pairs loaded: a new one unloads the least recently used free pair, and is refused with
a non-fatal busy (retry_after_s) while all are in use. Tiny set (RANDOM weights): the pairs are (100, 0),
(100, 600), (500, 0) and the default (500, 4500).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field

import pytest
import websockets

from dpslm_stream import protocol as P
from dpslm_stream.errors import CheckpointError
from dpslm_stream.hub import ModelSet
from dpslm_stream.server.app import ServerConfig, ServerThread, build_encoder
from dpslm_stream.server.pair_budget import PairBudget, PairsInUse
from dpslm_stream.stream.resynth_worker import ResynthWorker
from dpslm_stream.stream.worker import EncoderWorker
from dpslm_stream.tiny import speech_like

SR = 16000
DEFAULT = (500, 4500)


# --- the policy --------------------------------------------------------------------------------------------------


def test_budget_evicts_the_least_recently_used_free_pair_and_never_a_pinned_one():
    b = PairBudget(3, pinned=[DEFAULT])
    assert b.acquire((100, 0), 0.0) == [] and b.acquire((100, 600), 0.0) == []
    assert b.loaded == [DEFAULT, (100, 0), (100, 600)]
    b.release((100, 0), 0.0)
    b.release((100, 600), 0.0)
    assert b.acquire((100, 0), 0.0) == []  # loaded: no eviction, and now the most recently used
    b.release((100, 0), 0.0)
    assert b.acquire((500, 0), 0.0) == [(100, 600)]  # the least recently used free pair, not the pinned default
    assert b.loaded == [DEFAULT, (100, 0), (500, 0)]
    assert b.acquire(DEFAULT, 0.0) == [] and b.acquire(DEFAULT, 0.0) == []  # pinned: held by any number, never evicted
    assert b.held(DEFAULT) == 2


def test_budget_refuses_when_every_loaded_pair_is_held_and_holds_nothing_then():
    b = PairBudget(2, pinned=[DEFAULT])
    b.acquire((100, 0), 0.0)
    with pytest.raises(PairsInUse, match=r"in use by other sessions, or were within 0 s: \(500, 4500\), \(100, 0\) \(serve --max-loaded-pairs"):
        b.acquire((100, 600), 0.0)
    assert b.loaded == [DEFAULT, (100, 0)] and b.held((100, 600)) == 0
    b.acquire((100, 0), 0.0)  # a second session of a loaded pair always fits
    b.release((100, 0), 0.0)
    with pytest.raises(PairsInUse):
        b.acquire((100, 600), 0.0)  # still held once
    b.release((100, 0), 0.0)
    assert b.acquire((100, 600), 0.0) == [(100, 0)]
    with pytest.raises(ValueError, match="not held"):
        b.release((100, 0), 0.0)  # not held: a double release is a bug


def test_budget_unloads_a_pair_only_once_nobody_held_it_for_min_idle_s():
    """The load-rate rule: a client that opens short sessions of ever other pairs cannot keep the server loading."""
    b = PairBudget(2, pinned=[DEFAULT], min_idle_s=30.0)
    b.acquire((100, 0), 0.0)
    with pytest.raises(PairsInUse) as held:
        b.acquire((100, 600), 5.0)
    assert held.value.retry_after_s is None  # held: nobody knows when it comes free
    b.release((100, 0), 10.0)
    with pytest.raises(PairsInUse, match="within 30 s") as idle:
        b.acquire((100, 600), 39.9)
    assert idle.value.retry_after_s == pytest.approx(0.1)  # free at 40.0 if nobody holds it again
    three = PairBudget(3, pinned=[DEFAULT], min_idle_s=30.0)
    for pair, released in (((100, 0), 20.0), ((100, 600), 10.0)):
        three.acquire(pair, 0.0)
        three.release(pair, released)
    with pytest.raises(PairsInUse) as first:
        three.acquire((500, 0), 25.0)
    assert first.value.retry_after_s == pytest.approx(15.0)  # the first to come free, (100, 600) at 40.0
    b.acquire((100, 0), 20.0)  # held again: the idle time starts over at its next release
    b.release((100, 0), 50.0)
    with pytest.raises(PairsInUse):
        b.acquire((100, 600), 79.9)
    assert b.acquire((100, 600), 80.0) == [(100, 0)]
    b.release((100, 600), 80.5)
    with pytest.raises(PairsInUse):
        b.acquire((100, 0), 100.0)  # and the pair loaded for it stays its 30 s too


def test_budget_with_more_pinned_pairs_than_the_limit_loads_no_other():
    b = PairBudget(1, pinned=[DEFAULT, (100, 0)])
    assert b.acquire((100, 0), 0.0) == []
    with pytest.raises(PairsInUse):
        b.acquire((100, 600), 0.0)
    with pytest.raises(ValueError, match="at least 1"):
        PairBudget(0)


# --- the workers ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordingSet(ModelSet):
    """The tiny set; records each unit LM / ELLA-V load (pair, thread name, start and end) and makes the loads of
    `slow` pairs take `delay_s`."""

    slow: tuple = ()
    delay_s: float = 0.0
    broken: tuple = ()  # pairs whose files fail to load
    loads: list = field(default_factory=list)

    def _record(self, kind, pair, load):
        started = time.monotonic()
        if pair in self.slow:
            time.sleep(self.delay_s)
        if pair in self.broken:
            raise CheckpointError(f"{kind} {pair}: a corrupt file (injected)")
        model = load()
        self.loads.append((kind, pair, threading.current_thread().name, started, time.monotonic()))
        return model

    def ulm(self, k, lmbda, map_location="cpu"):
        return self._record("ulm", (k, lmbda), lambda: super(RecordingSet, self).ulm(k, lmbda, map_location))

    def ellav(self, k, lmbda, map_location="cpu"):
        return self._record("ellav", (k, lmbda), lambda: super(RecordingSet, self).ellav(k, lmbda, map_location))


def test_encoder_worker_load_pair_leaves_nothing_to_load_and_unload_pair_drops_the_unit_lm():
    models = RecordingSet("tiny")
    w = EncoderWorker(models)
    w.load_pair(100, 0)  # no scores: codebook only
    assert w.loaded_pairs() == [] and not models.loads
    w.load_pair(100, 0, score=True)
    assert w.loaded_pairs() == [(100, 0)] and len(models.loads) == 1
    s = w.open_session(SR, 100, 0, score=True)
    assert len(models.loads) == 1  # open_session loaded nothing
    assert w.unload_pair(100, 0) and w.loaded_pairs() == []
    assert not w.unload_pair(100, 0)  # nothing left to drop
    s.push(speech_like(1.0, SR, seed=3))
    s.end()
    w.run_until_idle([s])
    assert [e for e in s.poll() if type(e).__name__ == "UnitEvent"]  # the open session scored on with what it held
    w.open_session(SR, 100, 0, score=True)
    assert len(models.loads) == 2  # loaded again


def test_encoder_worker_keeps_a_unit_lm_it_cannot_load_again():
    given = EncoderWorker("tiny")._ulm(100, 0)
    w = EncoderWorker("tiny", ulms={(200, 0): given})  # a pair the tiny set does not hold
    assert not w.unload_pair(200, 0) and (200, 0) in w.loaded_pairs()


def test_resynth_worker_does_not_unload_an_ellav_a_stream_is_decoding_with():
    models = RecordingSet("tiny")
    w = ResynthWorker(models, max_decode_steps=1)
    w.load_pair(100, 0)
    assert w.loaded_pairs() == [(100, 0)] and len(models.loads) == 1
    s = w.open_session(100, 0, left_context=None, holdback=None)
    assert len(models.loads) == 1
    s.push_units([1, 2, 3, 4, 5])
    s.end()
    w.step([s])  # the pass is in flight: the stream holds a row of the ELLA-V's decode cache
    assert not w.unload_pair(100, 0)
    w.run_until_idle([s])
    s.poll()
    s.close()
    assert w.unload_pair(100, 0) and w.loaded_pairs() == []


# --- through the server ----------------------------------------------------------------------------------------------


async def start(url: str, **fields) -> tuple:
    """Connect and send start; (the connection, the first ready or error message)."""
    ws = await websockets.connect(url)
    await ws.send(json.dumps({"type": "start", "sample_rate": SR, "format": "pcm16", **fields}))
    return ws, await reply(ws)


async def reply(ws) -> dict:
    while True:
        msg = json.loads(await asyncio.wait_for(ws.recv(), 30))
        if msg["type"] in ("ready", "error"):
            return msg


async def finish(ws) -> list[dict]:
    """Send end; every message up to the end message."""
    await ws.send(json.dumps({"type": "end"}))
    out = []
    async for raw in ws:
        if isinstance(raw, str):
            out.append(json.loads(raw))
            if out[-1]["type"] == "end":
                break
    await ws.close()
    return out


NEEDS = {"ulm": {"score": True}, "ellav": {"resynth": {}}, "codec": {"transmit": {"coder": "ulm"}}}


@pytest.mark.parametrize("needs", list(NEEDS))
def test_a_pair_loads_off_the_encoder_thread_while_the_other_sessions_units_go_on(needs):
    """A session of another pair that scores (its unit LM), resynthesises (its ELLA-V; on a CPU the resynthesis
    runs on the encoder's thread) or transmits with the ulm coder (the codec thread's unit LM, whose jobs carry every
    session's packets) while a session of the default pair streams in real time."""
    models = RecordingSet("tiny", slow=((100, 600),), delay_s=3.0)
    cfg = ServerConfig(port=0, models="tiny", warmup=False, resynth=needs == "ellav")
    resynth = ResynthWorker(models) if needs == "ellav" else None
    wav = speech_like(5.0, SR, seed=5)
    pcm = P.encode_audio(wav, "pcm16")
    unit_times: list[float] = []

    async def streaming():
        ws, ready = await start(srv.url)
        assert ready["type"] == "ready"

        async def read():
            async for raw in ws:
                if isinstance(raw, str) and json.loads(raw)["type"] == "unit":
                    unit_times.append(time.monotonic())
                if isinstance(raw, str) and json.loads(raw)["type"] == "end":
                    return

        reader = asyncio.ensure_future(read())
        step = SR // 10 * 2  # 100 ms of pcm16
        for i in range(0, len(pcm), step):
            await ws.send(pcm[i : i + step])
            await asyncio.sleep(0.1)
        await ws.send(json.dumps({"type": "end"}))
        await asyncio.wait_for(reader, 30)
        await ws.close()

    async def other_pair():
        await asyncio.sleep(1.0)
        ws, ready = await start(srv.url, k=100, lmbda=600, **NEEDS[needs])
        assert ready["type"] == "ready", ready
        await finish(ws)

    async def both():
        await asyncio.gather(streaming(), other_pair())

    with ServerThread(cfg, encoder=EncoderWorker(models), resynth=resynth) as srv:
        assert srv.server.resynth_shares_thread == (needs == "ellav")
        asyncio.run(asyncio.wait_for(both(), 60))
    kind = "ellav" if needs == "ellav" else "ulm"
    [(_, _, thread, load_start, load_end)] = [r for r in models.loads if r[:2] == (kind, (100, 600))]
    assert "loader" in thread, thread  # not the encoder's thread, nor the codec's
    # The units of the first session kept coming during the 3 s load (its audio went on arriving in real time). With
    # the load on the encoder's thread none can: the thread is busy loading from start to end.
    assert any(load_start + 0.2 < t < load_end for t in unit_times), (load_start, load_end, unit_times)


def test_the_server_keeps_at_most_max_loaded_pairs_and_answers_busy_while_all_are_in_use():
    cfg = ServerConfig(port=0, models="tiny", warmup=False, max_loaded_pairs=2, pair_min_idle_s=0.0)
    worker = build_encoder(cfg)
    wav = P.encode_audio(speech_like(0.5, SR, seed=6), "pcm16")

    async def main(srv):
        a, ready = await start(srv.url, k=100, lmbda=0, score=True)
        assert ready["type"] == "ready"
        await a.send(wav)
        b, refused = await start(srv.url, k=100, lmbda=600, score=True)  # the default pair + (100, 0) are loaded
        assert refused["code"] == P.ErrorCode.BUSY.value and not refused["fatal"], refused
        assert refused["retry_after_s"] == cfg.busy_retry_after_s and "max-loaded-pairs" in refused["message"]  # held
        for needs in ({"resynth": {}}, {"transmit": {"coder": "ulm"}}):  # the pair's ELLA-V, the codec's unit LM
            await b.send(json.dumps({"type": "start", "sample_rate": SR, "format": "pcm16", "k": 100, "lmbda": 600,
                                     **needs}))  # fmt: skip
            assert (await reply(b))["code"] == P.ErrorCode.BUSY.value
        await b.send(json.dumps({"type": "start", "sample_rate": SR, "format": "pcm16", "k": 100, "lmbda": 600}))
        assert (await reply(b))["type"] == "ready"  # units alone need only the codebook
        await finish(b)
        b, ready = await start(srv.url, score=True)
        assert ready["type"] == "ready"  # the default pair is always there
        assert [m["type"] for m in await finish(b)][-1] == "end"
        assert worker.loaded_pairs() == [(100, 0), DEFAULT]
        end = await finish(a)
        assert end[-1]["reason"] == "end" and any(m["type"] == "unit" for m in end)
        for _ in range(100):  # the server releases a's hold once its connection is over
            if srv.call(lambda: srv.server.pair_budget.held((100, 0))) == 0:
                break
            await asyncio.sleep(0.05)
        c, ready = await start(srv.url, k=100, lmbda=600, score=True)
        assert ready["type"] == "ready", ready
        assert worker.loaded_pairs() == [(100, 600), DEFAULT]  # (100, 0) was unloaded for it
        await c.send(wav)
        end = await finish(c)
        assert end[-1]["reason"] == "end" and all(m["logprob"] is not None for m in end if m["type"] == "unit")

    with ServerThread(cfg, encoder=worker) as srv:
        assert srv.server.pair_budget.min_idle_s == 0.0 and ServerConfig().pair_min_idle_s == 30.0
        asyncio.run(asyncio.wait_for(main(srv), 60))


def test_a_start_that_fails_to_open_frees_its_pair_for_the_next_start():
    """A start that held a pair and then failed to open (its unit LM's file is corrupt) holds nothing after: the same
    connection's next start of another pair fits the budget of 2 (the default pair + one)."""
    cfg = ServerConfig(port=0, models="tiny", warmup=False, resynth=False, max_loaded_pairs=2, pair_min_idle_s=0.0)

    async def main(srv):
        ws, refused = await start(srv.url, k=100, lmbda=0, score=True)
        assert refused["code"] == P.ErrorCode.INTERNAL_ERROR.value and not refused["fatal"], refused
        assert "corrupt" in refused["message"]
        assert srv.call(lambda: srv.server.pair_budget.held((100, 0))) == 0
        await ws.send(json.dumps({"type": "start", "sample_rate": SR, "format": "pcm16", "k": 100, "lmbda": 600,
                                  "score": True}))  # fmt: skip
        assert (await reply(ws))["type"] == "ready"
        assert srv.call(lambda: srv.server.pair_budget.held((100, 600))) == 1
        await finish(ws)

    with ServerThread(cfg, encoder=EncoderWorker(RecordingSet("tiny", broken=((100, 0),)))) as srv:
        asyncio.run(asyncio.wait_for(main(srv), 60))


def test_a_load_that_outlives_its_session_is_unloaded_when_its_pair_is_evicted():
    """The open deadline ends a session while its pair's unit LM still loads; another pair then evicts that pair.
    The unload waits for the load to land (the loading thread runs in order), so no model stays loaded that the
    budget counts as unloaded (before, the unload found nothing and the load landed after it)."""
    models = RecordingSet("tiny", slow=((100, 600),), delay_s=2.0)
    cfg = ServerConfig(port=0, models="tiny", warmup=False, resynth=False, max_loaded_pairs=2, pair_min_idle_s=0.0,
                       open_timeout_s=0.5)  # fmt: skip
    worker = EncoderWorker(models)

    async def main(srv):
        a, refused = await start(srv.url, k=100, lmbda=600, score=True)
        assert refused["code"] == P.ErrorCode.INTERNAL_ERROR.value, refused  # the open deadline
        for _ in range(100):
            if srv.call(lambda: srv.server.pair_budget.held((100, 600))) == 0:
                break
            await asyncio.sleep(0.05)
        b, _ = await start(srv.url, k=100, lmbda=0, score=True)  # evicts (100, 600), whose load still runs
        await asyncio.sleep(3.0)  # every load has landed
        budget = srv.call(lambda: srv.server.pair_budget.loaded)
        assert (100, 600) not in budget and set(worker.loaded_pairs()) <= set(budget), (worker.loaded_pairs(), budget)
        for ws in (a, b):
            await ws.close()

    with ServerThread(cfg, encoder=worker) as srv:
        asyncio.run(asyncio.wait_for(main(srv), 60))
    assert [r[1] for r in models.loads].count((100, 600)) == 1


def test_busy_for_a_pair_says_when_to_retry():
    """While the loaded pair is free but within --pair-min-idle-s, the busy answer's retry_after_s is the time left
    until it may be unloaded (not the server's generic busy_retry_after_s)."""
    cfg = ServerConfig(port=0, models="tiny", warmup=False, resynth=False, max_loaded_pairs=2, pair_min_idle_s=20.0)

    async def main(srv):
        a, ready = await start(srv.url, k=100, lmbda=0, score=True)
        assert ready["type"] == "ready"
        await finish(a)
        for _ in range(100):
            if srv.call(lambda: srv.server.pair_budget.held((100, 0))) == 0:
                break
            await asyncio.sleep(0.05)
        b, refused = await start(srv.url, k=100, lmbda=600, score=True)
        assert refused["code"] == P.ErrorCode.BUSY.value and not refused["fatal"]
        assert 15.0 < refused["retry_after_s"] <= 20.0 != cfg.busy_retry_after_s, refused
        await b.close()

    with ServerThread(cfg) as srv:
        asyncio.run(asyncio.wait_for(main(srv), 60))
