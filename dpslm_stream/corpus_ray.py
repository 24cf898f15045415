"""`encode-corpus --ray`: the Ray Data pipeline over the utterances not yet written (decode and resample on CPU
tasks, WavLM + DPDP (+ ULM) on an actor pool); the driver writes the rows exactly as without Ray
(dpslm_stream/corpus.py describes the job)."""

from __future__ import annotations

import math
import time
from typing import Iterator

from dpslm_stream import raycluster
from dpslm_stream.corpus_listing import Utterance
from dpslm_stream.corpus_output import FIELDS, have_pyarrow, per_file_errors
from dpslm_stream.errors import DPSLMError


class RayUnavailable(DPSLMError, ImportError):
    """--ray asked for but Ray (or pyarrow) is not installed."""


def import_ray_data():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise RayUnavailable(f"--ray needs Ray Data ({e}): {raycluster.INSTALL_HINT}") from e
    if not have_pyarrow():
        raise RayUnavailable(f"--ray needs pyarrow: {raycluster.INSTALL_HINT}")
    return ray


def _decode_batch(batch):
    """Ray stage 1 (CPU tasks): read each file and resample it to 16 kHz with the exact kernel the model applies
    itself (audio.resample), so the encoder actor computes the same features as Pipeline.encode on the file."""
    import numpy as np
    import pyarrow as pa
    import torch

    from dpslm_stream.audio import load_audio, resample

    errors = per_file_errors()
    ids, paths = batch.column("id").to_pylist(), batch.column("path").to_pylist()
    audio, seconds, messages = [], [], []
    for path in paths:
        try:
            wav, sr = load_audio(path)
            seconds.append(len(wav) / sr)
            if sr != 16000:
                wav = resample(torch.from_numpy(wav)[None], sr, 16000)[0].numpy()
            audio.append(np.ascontiguousarray(wav, dtype=np.float32))
            messages.append("")
        except errors as e:
            audio.append(np.zeros(0, dtype=np.float32))
            seconds.append(0.0)
            messages.append(f"{type(e).__name__}: {e}")
    return pa.table({
        "id": pa.array(ids, pa.string()), "path": pa.array(paths, pa.string()),
        "audio": pa.array(audio, pa.list_(pa.float32())), "seconds": pa.array(seconds, pa.float64()),
        "error": pa.array(messages, pa.string()),
    })  # fmt: skip


class _EncodeActor:
    """Ray stage 2 (an actor pool): holds one pipeline (models on its GPU with --device cuda) and encodes a batch of
    16 kHz utterances one by one (no padding across utterances, so the units equal the per-file path's)."""

    def __init__(self, make_pipeline, score: bool, threads: int | None = None):
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.pipe = make_pipeline()
        self.score = score
        self.errors = per_file_errors()
        self.ready_at = time.time()  # models loaded: the driver's encoding clock starts at the first actor's

    def __call__(self, batch):
        import pyarrow as pa

        cols = {k: [] for k in ("id", "path", "units", "durations", "num_frames", "seconds", "loglikelihood", "error")}
        audio = batch.column("audio")
        for i, (uid, path, secs, err) in enumerate(zip(batch.column("id").to_pylist(), batch.column("path").to_pylist(),
                                                       batch.column("seconds").to_pylist(),
                                                       batch.column("error").to_pylist())):  # fmt: skip
            units, durations, frames, ll = [], [], 0, None
            if not err:
                try:
                    wav = audio[i].values.to_numpy(zero_copy_only=False).copy()  # writable, for torch
                    res = self.pipe.encode(wav, 16000, score=self.score)
                    units, durations, frames, ll = res.units, res.durations, res.num_frames, res.loglikelihood
                except self.errors as e:
                    err = f"{type(e).__name__}: {e}"
            for key, value in (("id", uid), ("path", path), ("units", units), ("durations", durations),
                               ("num_frames", frames), ("seconds", secs), ("loglikelihood", ll), ("error", err)):
                cols[key].append(value)
        return pa.table({
            "id": pa.array(cols["id"], pa.string()), "path": pa.array(cols["path"], pa.string()),
            "units": pa.array(cols["units"], pa.list_(pa.int64())),
            "durations": pa.array(cols["durations"], pa.list_(pa.int64())),
            "num_frames": pa.array(cols["num_frames"], pa.int64()), "seconds": pa.array(cols["seconds"], pa.float64()),
            "loglikelihood": pa.array(cols["loglikelihood"], pa.float64()), "error": pa.array(cols["error"], pa.string()),
            "ready_at": pa.array([self.ready_at] * len(cols["id"]), pa.float64()),
        })  # fmt: skip


def init_ray(address: str | None = None) -> None:
    """Join $RAY_ADDRESS / `address` if given, else start a local Ray on 127.0.0.1 (no dashboard)."""
    import_ray_data()
    raycluster.init_ray(address, log_to_driver=True)


def _ray_rows(todo: list[Utterance], make_pipeline, score: bool, *, workers: int, batch_size: int, device: str,
              cpus_per_worker: float | None, decode_cpus: float = 0.25) -> Iterator[dict]:  # fmt: skip
    ray = import_ray_data()
    init_ray()
    ctx = ray.data.DataContext.get_current()
    bars, ctx.enable_progress_bars = ctx.enable_progress_bars, False  # ours counts utterances
    gpu = str(device).startswith("cuda")
    if cpus_per_worker is None:  # fit the pool and a decode task in the cluster (an actor pool waits forever if not)
        total = float(ray.cluster_resources().get("CPU", 1))
        cpus_per_worker = max(0.1, min(1.0, (total - decode_cpus) / max(1, workers)))
    threads = None if gpu else max(1, round(cpus_per_worker))  # torch threads per CPU actor
    n_blocks = max(1, min(math.ceil(len(todo) / batch_size), 1000))
    ds = ray.data.from_items([{"id": u.id, "path": u.path} for u in todo], override_num_blocks=n_blocks)
    ds = ds.map_batches(_decode_batch, batch_size=batch_size, batch_format="pyarrow", num_cpus=decode_cpus)
    ds = ds.map_batches(_EncodeActor, fn_constructor_args=(make_pipeline, score, threads), batch_size=batch_size,
                        batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=workers),
                        num_cpus=cpus_per_worker, num_gpus=1 if gpu else 0)  # fmt: skip
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            yield from batch.to_pylist()
    finally:
        ctx.enable_progress_bars = bars


def encode_on_ray(todo, make_pipeline, score, writer, output, bar, pair, **ray_kwargs) -> tuple[int, int, float, float]:
    encoded = failed = 0
    audio = 0.0
    ready = math.inf  # wall-clock time the first actor had its models loaded
    by_id = {u.id: u for u in todo}
    for r in _ray_rows(todo, make_pipeline, score, **ray_kwargs):
        ready = min(ready, r["ready_at"])
        utt = by_id.pop(r["id"], None)
        if utt is None:  # a batch Ray retried after a worker died may come back twice: keep its first copy
            continue
        if r["error"]:
            output.record_error(utt, r["error"])
            failed += 1
        else:
            row = {f: r.get(f) for f in FIELDS}
            row["path"], row["k"], row["lmbda"] = utt.path, pair[0], pair[1]
            writer.add(row)
            encoded += 1
            audio += row["seconds"]
        bar.update(1)
        bar.set_postfix(audio_h=f"{audio / 3600:.3f}", failed=failed, refresh=False)
    return encoded, failed, audio, max(0.0, time.time() - ready) if ready < math.inf else 0.0
