"""Ray, an optional extra, imported and started the same way by everything that uses it: the server's Ray backend
(server/ray_backend.py) and the corpus job (dpslm_stream.corpus, Ray Data).

Nothing here imports Ray at import time; ``import_ray`` does, with an error that says how to install it.
"""

from __future__ import annotations

import os

from dpslm_stream.errors import DPSLMError

INSTALL_HINT = "pip install -e '.[ray]' in the dpslm-stream checkout"


def import_ray():
    """(ray, ray.serve), or DPSLMError saying how to install the extra."""
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise DPSLMError(f"the Ray backend needs Ray Serve: {INSTALL_HINT} ({e})") from None
    return ray, serve


def init_ray(address: str | None = None, *, num_cpus: float | None = None, log_to_driver: bool = False):
    """Join the Ray cluster at ``address`` (or $RAY_ADDRESS), else start a local one bound to 127.0.0.1 without a
    dashboard (``num_cpus``: its size, None = this machine's). Does nothing when Ray is already initialized (a
    caller, e.g. a test, started it as it wanted). Returns the ``ray`` module."""
    ray, _ = import_ray()
    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=log_to_driver)
    return ray
