"""The Ray backend's gateway side (server/ray_gateway.py) and replica bodies (server/ray_replicas.py) without Ray:
fake handles call the replica bodies in this process, one call per ``step`` as Serve would batch them one by one.
The live server through them gives the offline units (the oracle of tests/server_oracle.py), with resynthesis
audio; a replica that forgot a session (it restarted) ends that session with internal_error. The same classes on a
real Ray: tests/test_ray_backend.py (needs the optional extra)."""

from __future__ import annotations

import asyncio

from dpslm_stream import protocol
from dpslm_stream.client import SessionError, UnitsClient, chunked
from dpslm_stream.server.app import ServerConfig, ServerThread
from dpslm_stream.server.ray_gateway import RayEncoder, RayResynth
from dpslm_stream.server.ray_replicas import EncoderReplica, ResynthReplica
from dpslm_stream.signals import speech_like

from server_oracle import offline_units

SR = 16000
WAV = speech_like(2.0, SR, seed=21)


class FakeCall:
    """What ``handle.method.remote(...)`` returns: awaitable once, cancellable."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __await__(self):
        async def run():
            out = self.fn(*self.args)
            return await out if asyncio.iscoroutine(out) else out

        return run().__await__()

    def cancel(self):
        pass


class FakeHandle:
    """A Serve handle of one replica body: ``handle.NAME.remote(*args)``; ``step`` goes through ``step_many`` with a
    batch of one (what ``@serve.batch`` does when calls arrive alone)."""

    def __init__(self, replica):
        self.replica = replica

    def __getattr__(self, name):
        fn = (lambda item: self.replica.step_many([item])[0]) if name == "step" else getattr(self.replica, name)
        return type("Method", (), {"remote": staticmethod(lambda *args: FakeCall(fn, args))})()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def test_the_gateway_through_replica_bodies_gives_the_offline_units_and_audio():
    cfg = ServerConfig(port=0, models="tiny", max_sessions=2, warmup=False, idle_timeout_s=30)
    encoder_handle = FakeHandle(EncoderReplica(cfg))
    resynth_handle = FakeHandle(ResynthReplica(cfg))
    encoder = RayEncoder([encoder_handle], encoder_handle.replica.describe())
    resynth = RayResynth([resynth_handle])

    async def main(url):
        async with UnitsClient(url, sample_rate=SR, format="float32", options={"mode": "full"}, resynth={}) as c:
            return [m async for m in c.stream(chunked(WAV, SR, 100))]

    with ServerThread(cfg, encoder=encoder, resynth=resynth) as srv:
        msgs = run(main(srv.url))
    assert [m.unit for m in msgs if isinstance(m, protocol.Unit)] == offline_units(WAV, SR)
    assert any(isinstance(m, protocol.AudioChunk) for m in msgs)
    assert msgs[-1].reason == "end" and msgs[-1].resynth["error"] is None
    assert not encoder_handle.replica.sessions and not resynth_handle.replica.sessions  # ended sessions are dropped


def test_a_session_its_replica_forgot_ends_with_internal_error():
    cfg = ServerConfig(port=0, models="tiny", max_sessions=2, warmup=False, resynth=False, idle_timeout_s=30)
    handle = FakeHandle(EncoderReplica(cfg))
    encoder = RayEncoder([handle], handle.replica.describe())

    async def main(url):
        async with UnitsClient(url, sample_rate=SR) as c:
            await c.send(WAV[:SR])
            for _ in range(200):  # bounded: the session opens on the replica when start is answered
                if handle.replica.sessions:
                    break
                await asyncio.sleep(0.01)
            handle.replica.sessions.clear()  # as after a restart of the replica
            await c.send(WAV[SR:])
            await c.end()
            try:
                async for _ in c:
                    pass
            except SessionError as e:
                return e.code
            return None

    with ServerThread(cfg, encoder=encoder) as srv:
        assert run(main(srv.url)) == protocol.ErrorCode.INTERNAL_ERROR.value


def test_the_replicas_build_their_models_from_the_config_as_the_in_process_server_does():
    """`serve --backend ray --precision fast` means what it means in-process (server/app.py build_resynth)."""
    cfg = ServerConfig(port=0, models="tiny", warmup=False, precision="fast", dtype="bfloat16")
    assert ResynthReplica(cfg).worker.precision == "fast"
    assert str(EncoderReplica(cfg).worker.dtype) == "torch.bfloat16"
    fast = ServerConfig(port=0, models="tiny", warmup=False, encoder_precision="fast")
    assert EncoderReplica(fast).worker.runner.precision_plan.precision == "fast"
    assert EncoderReplica(cfg).worker.runner.precision_plan.precision == "exact"


async def _precision_session(url, mode):
    """ready.settings' and the final stats' precision fields of one resynthesized session, and its units."""
    async with UnitsClient(url, sample_rate=SR, format="float32", options={"mode": mode}, resynth={}) as c:
        msgs = [m async for m in c.stream(chunked(WAV, SR, 100))]
        ready = c.ready.settings
    end = msgs[-1]
    assert end.reason == "end" and end.resynth["error"] is None
    reported = (ready["precision"], ready["resynth"]["precision"], end.stats["precision"],
                end.stats["resynth_precision"])  # fmt: skip
    return reported, [m.unit for m in msgs if isinstance(m, protocol.Unit)]


def test_precisions_are_reported_in_ready_and_stats_alike_through_ray_and_in_process():
    """--encoder-precision and --precision reach the replicas (their models are built from the config) and are
    reported as the in-process server reports them: ready.settings.precision / .resynth.precision and the stats'
    precision / resynth_precision; mode full is the offline float32 computation whatever the encoder's precision."""
    cfg = ServerConfig(port=0, models="tiny", max_sessions=2, warmup=False, idle_timeout_s=30, precision="fast",
                       encoder_precision="fast")  # fmt: skip
    encoder_handle = FakeHandle(EncoderReplica(cfg))
    encoder = RayEncoder([encoder_handle], encoder_handle.replica.describe())
    resynth = RayResynth([FakeHandle(ResynthReplica(cfg))])
    with ServerThread(cfg, encoder=encoder, resynth=resynth) as srv:
        ray_cached, ray_full = (run(_precision_session(srv.url, mode)) for mode in ("cached", "full"))
    with ServerThread(cfg) as srv:
        local_cached = run(_precision_session(srv.url, "cached"))
    assert ray_cached[0] == local_cached[0] == ("fast", "fast", "fast", "fast")
    assert ray_full[0] == ("exact", "fast", "exact", "fast")
    assert ray_cached[1] == local_cached[1] and ray_cached[1]  # one session alone: the same int8 arithmetic
    assert ray_full[1] == offline_units(WAV, SR)
    with ServerThread(ServerConfig(port=0, models="tiny", warmup=False, resynth=False)) as srv:
        async def units_only(url):
            async with UnitsClient(url, sample_rate=SR, format="float32") as c:
                msgs = [m async for m in c.stream(chunked(WAV, SR, 100))]
                return c.ready.settings, msgs[-1].stats
        settings, stats = run(units_only(srv.url))
    assert (settings["precision"], settings["resynth"], stats["precision"], stats["resynth_precision"]) == \
        ("exact", None, "exact", None)  # fmt: skip
