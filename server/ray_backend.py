"""The server on Ray Serve: the same server, clients and protocol, with the model work in Serve deployments.

    dpslm-stream serve --backend ray [--ray-address auto] [--encoder-shards N] [--resynth-shards N]

Shape (docs/references.md §Serving): the WebSocket sessions and all their protocol state stay in the gateway (the same
asyncio ``Server`` as the in-process backend, so the same clients, page and protocol); each session's encoder state
(resampler tail, window caches, DPDP survivors) lives in an ``Encoder`` shard and its resynthesis state (ELLA-V window
and pass, vocoder window) in a ``Resynth`` shard (server/ray_replicas.py); the gateway reaches them through the
backends of server/ray_gateway.py. A replica that goes away ends its sessions with ``internal_error`` (close 1011);
clients reconnect and get a new session.

Sessions are stateful and a Serve handle routes each call to any replica of a deployment, so the encoder scales by
*shards*: N Serve applications of one replica each (GPU-sized); the gateway pins each session to the shard with the
fewest sessions when it opens and talks to that shard's handle for the rest of the session. More gateways (each with
its shards) scale past one gateway's event loop, behind a WebSocket-aware load balancer.

``deploy`` is the one way the service goes onto Ray: ``serve --backend ray`` deploys the shards and the ``Gateway``
(the live server as a deployment, listening on the config's host and port); the tests and ``bench server --backend
ray`` deploy the same shards with ``gateway=False`` and run the gateway as a ServerThread of their own.
Ray is an optional extra (``pip install -e '.[ray]' in the dpslm-stream checkout``): the modules of the Ray backend
import it only when a deployment is made, and the rest of the package imports them only inside the functions that
ask for Ray (server/cli.py's ``serve_on_ray``, ``bench server --backend ray``), never at import time.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from dpslm_stream.errors import InvalidInput
from dpslm_stream.raycluster import import_ray, init_ray
from dpslm_stream.validate import check_int

from .config import ServerConfig
from .ray_gateway import CALL_TIMEOUT_S, RayEncoder, RayResynth
from .ray_replicas import EncoderReplica, ResynthReplica, serve_deployment


def gpu_fractions(encoder_device: str, resynth_device: str | None, encoder_shards: int, resynth_shards: int,
                  encoder_gpus: float | None = None, resynth_gpus: float | None = None) -> tuple[float, float]:
    """The GPU share each encoder and each resynthesis shard asks Ray for (num_gpus). Shards off CUDA ask for none;
    by default every CUDA shard shares one GPU (1 / the number of CUDA shards: 0.5 each for one encoder and one
    resynthesis shard), so the service schedules on a one-GPU host; ``encoder_gpus`` / ``resynth_gpus`` override."""
    on_cuda = lambda device: device is not None and str(device).startswith("cuda")  # noqa: E731
    n = encoder_shards * on_cuda(encoder_device) + resynth_shards * on_cuda(resynth_device)
    share = 1.0 / n if n else 0.0
    for name, value in (("encoder_gpus", encoder_gpus), ("resynth_gpus", resynth_gpus)):
        if value is not None and not 0.0 <= value <= 1.0 and not (value > 1 and float(value).is_integer()):
            raise InvalidInput(f"{name} must be a fraction in 0..1 or a whole number of GPUs, got {value!r}")
    enc = (share if encoder_gpus is None else encoder_gpus) if on_cuda(encoder_device) else 0.0
    res = (share if resynth_gpus is None else resynth_gpus) if on_cuda(resynth_device) else 0.0
    return enc, res


class GatewayReplica:
    """The body of the ``Gateway`` deployment: the live server (server/app.py, the same code as the in-process
    backend) on its own thread and event loop in this replica, talking to the shards it was given."""

    async def __init__(self, config: ServerConfig, encoder_handles: list, resynth_handles: list,  # type: ignore[misc]
                       call_timeout_s: float = CALL_TIMEOUT_S):  # Serve awaits an async constructor
        from .app import ServerThread

        describe = await encoder_handles[0].describe.remote()  # a replica's constructor runs on its event loop
        encoder = RayEncoder(encoder_handles, describe, call_timeout_s)
        resynth = RayResynth(resynth_handles, call_timeout_s) if resynth_handles else None
        self.server = await asyncio.to_thread(ServerThread(config, encoder=encoder, resynth=resynth).start)

    def address(self) -> dict:
        """Where clients connect (the replica's node; the config's host and port, port 0 = the one it got)."""
        return {"url": self.server.url, "http_url": self.server.http_url, "port": self.server.port}

    def __del__(self):  # Serve's graceful shutdown of the replica: drain the sessions (SIGTERM semantics)
        server = getattr(self, "server", None)
        if server is not None:
            server.stop()


@dataclass(frozen=True)
class RayService:
    """What ``deploy`` put on Ray: the gateway's views of the shards, the Serve applications (the gateway's first),
    and where clients connect when a Gateway was deployed."""

    encoder: RayEncoder
    resynth: RayResynth | None
    apps: tuple[str, ...]
    address: dict | None = None

    def delete(self) -> None:
        """Delete the applications, the gateway first (it drains its sessions while the shards still serve them)."""
        _, serve = import_ray()
        for app in self.apps:
            serve.delete(app)


def deploy(config: ServerConfig, *, name: str = "dpslm-stream", gateway: bool = True, address: str | None = None,
           num_cpus: float | None = None, encoder_shards: int = 1, resynth_shards: int = 1,
           shard_cpus: float | None = None, gateway_cpus: float = 0.5, gateway_resource: str | None = None,
           call_timeout_s: float = CALL_TIMEOUT_S, encoder_gpus: float | None = None, resynth_gpus: float | None = None,
           resynth_options: dict | None = None, encoder_replica: type = EncoderReplica,
           resynth_replica: type = ResynthReplica) -> RayService:  # fmt: skip
    """Start (or join: ``address``, $RAY_ADDRESS) Ray and deploy the service for ``config``: ``encoder_shards``
    Encoder and ``resynth_shards`` Resynth applications of one replica each (``{name}-encoder-{i}``,
    ``{name}-resynth-{i}``; no Resynth when config.resynth is off) and, with ``gateway``, the Gateway application
    ``name`` bound to them, which listens on the config's host and port on its node (``gateway_resource``: a Ray
    custom resource that only the node(s) behind the load balancer have decides which node that is).

    ``shard_cpus``: CPUs each shard asks for (default: share what Ray has, at most 1 per shard); GPU shares:
    ``gpu_fractions`` (by default all CUDA shards share one GPU). ``num_cpus``: the size of a local Ray it starts
    (tests). ``resynth_options``: extra ResynthWorker arguments; ``encoder_replica``/``resynth_replica``: the
    replica bodies (tests pass subclasses with hooks)."""
    check_int("encoder_shards", encoder_shards, minimum=1)
    check_int("resynth_shards", resynth_shards, minimum=1)
    ray = init_ray(address, num_cpus=num_cpus)
    _, serve = import_ray()
    serve.start(proxy_location="Disabled")  # clients speak WebSocket to the gateway itself, not to Serve's proxy
    resynth_shards = resynth_shards if config.resynth else 0
    resynth_device = config.resynth_device or config.device
    enc_gpus, res_gpus = gpu_fractions(config.device, resynth_device if config.resynth else None, encoder_shards,
                                       resynth_shards, encoder_gpus, resynth_gpus)  # fmt: skip
    if shard_cpus is None:  # fit a small machine: share what Ray has, at most 1 CPU per shard
        free = ray.available_resources().get("CPU", 1.0) - (gateway_cpus if gateway else 0.0)
        shard_cpus = max(0.1, min(1.0, free / (encoder_shards + resynth_shards)))

    def shards(body: type, role: str, n: int, gpus: float, *args) -> list:
        deployment = serve_deployment(body, role, num_cpus=shard_cpus, num_gpus=gpus,
                                      max_ongoing_requests=2 * config.max_sessions + 8)  # fmt: skip
        return [serve.run(deployment.bind(*args), name=f"{name}-{role.lower()}-{i}", route_prefix=None)
                for i in range(n)]  # fmt: skip

    encoder_handles = shards(encoder_replica, "Encoder", encoder_shards, enc_gpus, config)
    resynth_handles = shards(resynth_replica, "Resynth", resynth_shards, res_gpus, config, resynth_options)
    apps = tuple(h.app_name for h in encoder_handles + resynth_handles)
    encoder = RayEncoder(encoder_handles, encoder_handles[0].describe.remote().result(), call_timeout_s)
    resynth = RayResynth(resynth_handles, call_timeout_s) if resynth_handles else None
    if not gateway:
        return RayService(encoder, resynth, apps)
    resources = {gateway_resource: 1} if gateway_resource else {}
    gateway_app = serve.deployment(name="Gateway", num_replicas=1, max_ongoing_requests=8,
                                   graceful_shutdown_timeout_s=config.drain_timeout_s + 5,
                                   ray_actor_options={"num_cpus": gateway_cpus, "resources": resources},
                                   )(GatewayReplica).bind(config, encoder_handles, resynth_handles, call_timeout_s)  # fmt: skip
    handle = serve.run(gateway_app, name=name, route_prefix=None)
    return RayService(encoder, resynth, (name, *apps), handle.address.remote().result())
