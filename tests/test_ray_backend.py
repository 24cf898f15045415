"""The live server with its encoder on Ray Serve (--backend ray), on a local Ray bound to 127.0.0.1 with the tiny set:
the same protocol and clients give the same units as the in-process server, sessions share batched steps, a full
server answers busy, and a session whose replica goes away ends with internal_error (close 1011). Every test deploys
through server/ray_backend.py ``deploy``, the path `serve --backend ray` takes (two of them with its Gateway).
Needs the optional extra (pip install -e '.[ray]' in the dpslm-stream checkout); skipped without it."""

from __future__ import annotations

import asyncio
import os

import pytest

pytest.importorskip("ray.serve")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local cluster: no token file in $HOME

from dpslm_stream import protocol as P  # noqa: E402
from dpslm_stream.client import SessionError, UnitsClient, chunked  # noqa: E402
from dpslm_stream.server.app import ServerConfig, ServerThread  # noqa: E402
from dpslm_stream.tiny import speech_like  # noqa: E402

pytestmark = pytest.mark.ray
SR = 16000
WAV = speech_like(2.0, SR, seed=21)


def with_held_steps(body: type) -> type:
    """A replica body whose steps can be held (test-only hooks; a local class, so Ray ships it by value).

    Hold and release are async: they run on the replica's event loop, as `step` does. While held, calls wait and are
    counted; on release they all join the batch queue in one loop iteration, so they form one batch: the tests prove
    batching with this, independently of how fast the machine delivers the calls."""

    class HeldSteps(body):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._steps_open = asyncio.Event()  # cleared by hold_steps: calls wait before they join a batch
            self._steps_open.set()
            self._steps_waiting = 0

        async def step(self, item):
            if not self._steps_open.is_set():
                self._steps_waiting += 1
                try:
                    await self._steps_open.wait()
                finally:
                    self._steps_waiting -= 1
            return await super().step(item)

        async def hold_steps(self) -> None:
            self._steps_open.clear()

        async def release_steps(self) -> None:
            self._steps_open.set()

        async def steps_waiting(self) -> int:
            return self._steps_waiting

    return HeldSteps


@pytest.fixture(scope="module")
def ray_encoder():
    import ray
    from ray import serve

    from dpslm_stream.server.ray_backend import deploy
    from dpslm_stream.server.ray_replicas import EncoderReplica

    cfg = ServerConfig(port=0, models="tiny", max_sessions=3, warmup=False, resynth=False, idle_timeout_s=30)
    service = deploy(cfg, name="dpslm-test-shards", gateway=False, num_cpus=2, shard_cpus=0.4, encoder_shards=2,
                     encoder_replica=with_held_steps(EncoderReplica))  # fmt: skip
    yield cfg, service.encoder
    serve.shutdown()
    ray.shutdown()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


async def units_of(url, mode, realtime=False):
    async with UnitsClient(url, sample_rate=SR, format="float32", options={"mode": mode}) as c:
        msgs = [m async for m in c.stream(chunked(WAV, SR, 100), realtime=realtime)]
    assert isinstance(msgs[-1], P.EndMessage) and msgs[-1].reason == "end"
    return [(m.seq, m.unit, m.start_frame, m.end_frame) for m in msgs if isinstance(m, P.Unit)]


def test_same_units_through_ray_as_in_process(ray_encoder):
    cfg, encoder = ray_encoder
    with ServerThread(cfg, encoder=encoder) as srv:
        ray_units = {mode: run(units_of(srv.url, mode)) for mode in ("full", "cached")}
    with ServerThread(cfg) as srv:
        local_units = {mode: run(units_of(srv.url, mode)) for mode in ("full", "cached")}
    assert ray_units["full"] and ray_units == local_units


def test_sessions_are_batched_together_and_a_full_server_is_busy(ray_encoder):
    cfg, encoder = ray_encoder

    async def main(url):
        # Each shard holds its steps until the first call of each of the three sessions waits there (one call in
        # flight per session): released together, the calls of the shard that serves two sessions form one batch,
        # however slowly a loaded machine delivers them.
        for h in encoder.handles:
            await h.hold_steps.remote()
        sessions = [asyncio.create_task(units_of(url, "cached")) for _ in range(3)]
        for _ in range(600):  # bounded: 60 s
            waiting = [await h.steps_waiting.remote() for h in encoder.handles]
            if sum(waiting) == 3 or any(t.done() for t in sessions):
                break
            await asyncio.sleep(0.1)
        assert sorted(waiting) == [1, 2], waiting  # three sessions on two shards
        for h in encoder.handles:
            await h.release_steps.remote()
        return await asyncio.gather(*sessions)

    with ServerThread(cfg, encoder=encoder) as srv:
        results = run(main(srv.url))

        async def crowd(url):
            clients = [UnitsClient(url, sample_rate=SR) for _ in range(3)]
            for c in clients:
                await c.connect()
            try:
                with pytest.raises(SessionError) as busy:
                    await UnitsClient(url, sample_rate=SR).connect()
                return busy.value.code
            finally:
                for c in clients:
                    await c.close()

        assert run(crowd(srv.url)) == P.ErrorCode.BUSY.value
    for units in results:  # complete and ordered (batch shapes may differ between sessions: not compared bitwise)
        assert [u[0] for u in units] == list(range(len(units))) and units[0][2] == 0
        assert all(a[3] == b[2] for a, b in zip(units, units[1:])) and units[-1][3] == len(WAV) // 320
    # Three sessions on two shards: one shard served two of them, and batched their held calls into one step.
    assert max(h.describe.remote().result()["max_batch"] for h in encoder.handles) >= 2


def test_a_session_whose_replica_goes_away_ends_with_internal_error(ray_encoder):
    """Runs on the module's local Ray (the fixture starts it, so the test also runs alone) with a service of its own
    as `serve --backend ray` deploys it (Gateway and encoder shard), whose shard it deletes mid-session."""
    from ray import serve

    from dpslm_stream.server.ray_backend import deploy

    cfg = ServerConfig(port=0, models="tiny", max_sessions=2, warmup=False, resynth=False)
    service = deploy(cfg, name="dpslm-test-loss", shard_cpus=0.3, gateway_cpus=0.1, call_timeout_s=10)

    async def main(url):
        async with UnitsClient(url, sample_rate=SR) as c:
            await c.send(WAV[:SR])
            for handle in service.encoder.handles:  # this service's shards only (the fixture's stay up)
                serve.delete(handle.app_name)
            await c.send(WAV[SR:])
            await c.end()
            with pytest.raises(SessionError) as err:
                async for _ in c:
                    pass
            return err.value.code

    try:
        assert service.address is not None
        assert run(main(service.address["url"])) == P.ErrorCode.INTERNAL_ERROR.value
    finally:
        service.delete()


def test_resynthesis_and_a_listener_through_ray_equal_the_in_process_server(ray_encoder):
    from dpslm_stream.client import ListenerClient
    from dpslm_stream.server.ray_backend import deploy

    cfg = ServerConfig(port=0, models="tiny", max_sessions=4, warmup=False, idle_timeout_s=30)
    # One pass per decode step on both sides: batch shapes then match, so greedy decoding is bitwise reproducible
    service = deploy(cfg, name="dpslm-test-resynth", gateway=False, shard_cpus=0.4, resynth_options={"max_batch": 1})
    encoder, resynth = service.encoder, service.resynth

    async def main(url):
        # The exact settings: one pass and one vocoder window at the end, so the audio does not depend on timing
        exact = {"left_context": None, "holdback": None, "vocoder_left_context": None, "vocoder_lookahead": 100000}
        async with UnitsClient(url, sample_rate=SR, format="float32", resynth=exact) as sender:
            async with ListenerClient(url, session=sender.ready.session, listen_token=sender.ready.listen_token,
                                      resynth=exact) as listener:  # fmt: skip
                heard = asyncio.create_task(_collect(listener))
                sent = [m async for m in sender.stream(chunked(WAV, SR, 100))]
                return sent, await heard

    def summary(msgs):
        import numpy as np

        units = [(m.seq, m.unit) for m in msgs if isinstance(m, P.Unit)]
        audio = np.concatenate([m.samples for m in msgs if isinstance(m, P.AudioChunk)])
        return units, audio, msgs[-1]

    try:
        with ServerThread(cfg, encoder=encoder, resynth=resynth) as srv:
            ray_sent, ray_heard = run(main(srv.url))
    finally:
        service.delete()
    from dpslm_stream.hub import ModelSet
    from dpslm_stream.stream.resynth_worker import ResynthWorker

    with ServerThread(cfg, resynth=ResynthWorker(ModelSet("tiny"), max_batch=1)) as srv:
        local_sent, _ = run(main(srv.url))
    (ru, ra, rend), (hu, ha, hend), (lu, la, lend) = summary(ray_sent), summary(ray_heard), summary(local_sent)
    assert ru == lu == hu and len(ru) > 0
    assert rend.reason == hend.reason == "end" and rend.resynth["error"] is None
    assert (ra == la).all() and (ha == la).all()  # greedy, same options: the same audio on Ray and in-process


async def _collect(client):
    return [m async for m in client]


def test_the_whole_service_as_one_serve_application(ray_encoder):
    """`serve --backend ray`: Gateway deployment (the live server) bound to Encoder and Resynth shards; a client of
    the gateway gets the offline units in full mode and audio back."""
    from dpslm_stream.hub import ModelSet
    from dpslm_stream.pipeline import Pipeline
    from dpslm_stream.server.ray_backend import deploy

    cfg = ServerConfig(port=0, models="tiny", max_sessions=2, warmup=False, idle_timeout_s=30)
    service = deploy(cfg, name="dpslm-test-service", shard_cpus=0.3, gateway_cpus=0.1)
    address = service.address
    assert address is not None
    try:

        async def main(url):
            async with UnitsClient(url, sample_rate=SR, format="float32", options={"mode": "full"},
                                   resynth={}) as c:  # fmt: skip
                return [m async for m in c.stream(chunked(WAV, SR, 100))]

        msgs = run(main(address["url"]))
    finally:
        service.delete()
    units = [m.unit for m in msgs if isinstance(m, P.Unit)]
    assert units == Pipeline(ModelSet("tiny"), 500, 4500).encode(WAV, SR, score=False).units
    assert any(isinstance(m, P.AudioChunk) for m in msgs) and msgs[-1].resynth["error"] is None


def test_precisions_reach_the_ray_replicas_and_are_reported(ray_encoder):
    """`serve --backend ray --precision fast --encoder-precision fast`: the replicas build their models in those
    precisions and ready/stats report them as in-process (tests/test_ray_gateway.py checks the same without Ray,
    and that the units equal the in-process server's)."""
    from dpslm_stream.server.ray_backend import deploy

    cfg = ServerConfig(port=0, models="tiny", max_sessions=2, warmup=False, idle_timeout_s=30, precision="fast",
                       encoder_precision="fast")  # fmt: skip
    service = deploy(cfg, name="dpslm-test-precision", gateway=False, shard_cpus=0.3)

    async def main(url):
        async with UnitsClient(url, sample_rate=SR, format="float32", resynth={}) as c:
            msgs = [m async for m in c.stream(chunked(WAV, SR, 100))]
            return c.ready.settings, msgs

    try:
        with ServerThread(cfg, encoder=service.encoder, resynth=service.resynth) as srv:
            settings, msgs = run(main(srv.url))
    finally:
        service.delete()
    end = msgs[-1]
    assert end.reason == "end" and end.resynth["error"] is None and any(isinstance(m, P.Unit) for m in msgs)
    assert (settings["precision"], settings["resynth"]["precision"]) == ("fast", "fast")
    assert (end.stats["precision"], end.stats["resynth_precision"]) == ("fast", "fast")
