"""The server's codec thread: every session's `Transmitter` (start.transmit) runs here, off the event loop.

The `ulm` coder steps the unit LM once per unit (batch 1, its own KV cache, see dpslm_stream.codec.models): model
code, so it must not run on the event loop, and it must not be batched with other sessions (decodability needs the
receiver's batch-1 step shape). One thread for all sessions keeps each session's jobs in order (a single-worker
executor runs them first in, first out) and shares one ULM per (k, lambda) between the sessions (loaded on a
loading thread of its own, so the other sessions' packets do not wait for a load); it is separate from
the scorer's ULM, whose batched floats are never used for coding. Each job frees the OpenMP team its ULM step started
(dpslm_stream/device.py release_cpu_threads): an idle team on this thread made the encoder's 8-stream steps 1.4-1.5x
slower on 2 cores, while starting the team again costs a job nothing measurable (a full-size step: 51-52 ms with
the release, 54-59 ms without).

The `table` coder codes with the table given to `serve --transmit-table` for the session's K; the table travels
inside the stream header, so a receiver needs no file (its hash in the header is checked against it).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from dpslm_stream import hub
from dpslm_stream.codec.link import TransmitOptions, Transmitter
from dpslm_stream.codec.models import ModelCache
from dpslm_stream.codec.tables import UnitTable
from dpslm_stream.device import releasing_cpu_threads
from dpslm_stream.errors import InvalidInput


def load_transmit_tables(paths, pairs) -> dict[int, UnitTable]:
    """`serve --transmit-table` files by K, checked at startup: readable tables, one per K, each for a served K."""
    served = sorted({k for k, _ in pairs})
    tables: dict[int, UnitTable] = {}
    for path in paths:
        try:
            table = UnitTable.load(path)
        except ValueError as e:  # InvalidInput (unreadable) or BitstreamError (not a table)
            raise InvalidInput(f"--transmit-table {path}: {e}") from None
        if table.k not in served:
            raise InvalidInput(f"--transmit-table {path} is a table for k={table.k}, but this server serves "
                               f"k={', '.join(map(str, served))}: fit one with `codec fit --k K`")  # fmt: skip
        if table.k in tables:
            raise InvalidInput(f"--transmit-table {path}: a second table for k={table.k} (give one per k)")
        tables[table.k] = table
    return tables


class CodecService:
    def __init__(self, models: hub.ModelSet | str, tables: dict[int, UnitTable] | None = None):
        self.models = ModelCache(hub.ModelSet(models) if isinstance(models, str) else models)
        self.tables = dict(tables or {})
        self._inline = {k: t.to_bytes() for k, t in self.tables.items()}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dpslm-codec")
        # A pair's ULM loads (and is hashed) here, not on the codec thread, whose jobs carry every session's packets.
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dpslm-codec-loader")

    def _open(self, options: dict, k: int, lmbda: int, t0: float) -> Transmitter:
        opts = TransmitOptions.from_json(options)
        if opts.coder == "table" and k not in self.tables:
            raise InvalidInput(f"this server has no unit table for k={k} (serve --transmit-table FILE)")
        model = self.models.model(opts.coder, k, lmbda, self.tables.get(k))
        inline = self._inline[k] if opts.coder == "table" else None
        return Transmitter(opts.header(k, lmbda, model, inline), model, t0)

    async def open(self, options: dict, k: int, lmbda: int, t0: float) -> Transmitter:
        if options.get("coder") == "ulm":
            await self._run(lambda: self.models.ulm(k, lmbda), self._loader)
        return await self._run(lambda: self._open(options, k, lmbda, t0))

    async def unload_pair(self, k: int, lmbda: int) -> None:
        """Drop the pair's ULM (server/pair_budget.py) once the loads queued before have landed (one for a session
        that is gone would land after): its coders are gone."""
        await self._run(lambda: None, self._loader)
        await self._run(lambda: self.models.unload(k, lmbda))

    def _run(self, job: Callable[[], Any], pool: ThreadPoolExecutor | None = None) -> "asyncio.Future":
        """`job()` on the codec thread (or `pool`'s), which frees its OpenMP team afterwards (the module docstring
        says why)."""

        return asyncio.get_running_loop().run_in_executor(pool or self._pool, releasing_cpu_threads(job))

    def submit(self, tx: Transmitter, job: Callable[[], list[bytes]], at: float,
               done: Callable[[Any], None]) -> None:  # fmt: skip
        """Run `job` (a call on `tx`) on the codec thread; `done(future)` is called on the loop with
        (packets, next deadline, stats) or the exception."""

        def run() -> tuple[list[bytes], float, dict]:
            packets = job()
            return packets, tx.next_deadline(), tx.stats(at)

        self._run(run).add_done_callback(done)

    def stop(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._loader.shutdown(wait=False, cancel_futures=True)
