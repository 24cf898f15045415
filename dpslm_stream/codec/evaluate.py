"""`codec eval`: what the unit bitstream costs, per (k, lambda) and coder, next to the authors' estimate.

For each pair the files go through the offline `encode` path once; every coder then codes the same units (unit
committed when its last frame ends) with the given packet interval and resync period. Per coder:
  ideal     -sum log2 p(unit) / seconds under the coder's unquantized model (for `ulm`, the ULM's cross-entropy)
  payload   range-coded unit bytes / seconds (quantization, one termination per packet, resync resets included)
  on wire   payload + packet framing (sequence number, flags, lengths, CRC-16) / seconds; the header is extra
  resync    extra payload bits per resync point, measured against the same coder with no resync after the start
and once per pair: the authors' bitrate (N_units * H(unigram of these units) / seconds, pipeline.bitrate), units/s,
and the durations' own payload (coded separately, a fixed geometric model).
"""

from __future__ import annotations

from pathlib import Path

from dpslm_stream import hub
from dpslm_stream.codec.format import Header
from dpslm_stream.codec.models import ModelCache
from dpslm_stream.codec.packets import commits_offline, encode_stream
from dpslm_stream.codec.tables import UnitTable, fit_table

CODER_ROWS = ("uniform", "table-unigram", "table-bigram", "ulm")


def _run(header: Header, model, streams) -> dict:
    tot = {"payload_bits": 0, "duration_bits": 0, "overhead_bits": 0, "ideal_bits": 0.0, "packets": 0, "resyncs": 0,
           "header_bits": 0}  # fmt: skip
    for commits in streams:
        _, stats = encode_stream(header, model, commits)
        for key in tot:
            tot[key] += getattr(stats, key)
    return tot


def evaluate(models: hub.ModelSet, files: list[Path], pairs, *, packet_ms: int = 100, resync_s: float = 5.0,
             tables: dict[int, UnitTable] | None = None, device: str = "cpu", durations: bool = True) -> dict:  # fmt: skip
    from dpslm_stream.audio import load_audio
    from dpslm_stream.pipeline import Pipeline, bitrate

    tables = tables or {}
    doc = {"models": models.source, "random_weights": models.is_random, "files": [str(f) for f in files],
           "packet_ms": packet_ms, "resync_s": resync_s, "pairs": []}  # fmt: skip
    audio = [load_audio(f) for f in files]
    for k, lmbda in pairs:
        pipe = Pipeline(models, k, lmbda, device)
        encoded = [pipe.encode(wav, sr, score=False) for wav, sr in audio]
        seconds = sum(r.seconds for r in encoded)
        n_units = sum(len(r.units) for r in encoded)
        streams = [commits_offline(r.units, r.durations) for r in encoded]
        cache = ModelCache(models, device)
        row = {"k": k, "lmbda": lmbda, "seconds": seconds, "units": n_units, "units_per_s": n_units / seconds,
               "authors_bitrate": bitrate([r.units for r in encoded], seconds), "coders": {}}  # fmt: skip
        given = tables.get(k)
        row["table_source"] = "given table file" if given else "fitted on the evaluated units (optimistic oracle)"
        fitted = {
            "table-unigram": given if given and given.order == 1 else fit_table([r.units for r in encoded], k, 1),
            "table-bigram": given if given and given.order == 2 else fit_table([r.units for r in encoded], k, 2),
        }
        for name in CODER_ROWS:
            model = cache.model(name.split("-")[0], k, lmbda, fitted.get(name))
            res = {}
            for label, resync_ms in (("resync", int(resync_s * 1000)), ("no_resync", 0)):
                header = Header(k=k, lmbda=lmbda, coder=model.coder, packet_ms=packet_ms, resync_ms=resync_ms,
                                model_hash=model.model_hash)  # fmt: skip
                res[label] = _run(header, model, streams)
            r, nr = res["resync"], res["no_resync"]
            extra = r["resyncs"] - nr["resyncs"]
            row["coders"][name] = {
                "ideal_bps": r["ideal_bits"] / seconds,
                "payload_bps": r["payload_bits"] / seconds,
                "on_wire_bps": (r["payload_bits"] + r["overhead_bits"]) / seconds,
                "packets": r["packets"], "resyncs": r["resyncs"],
                "resync_cost_bits": (r["payload_bits"] - nr["payload_bits"]) / extra if extra else None,
                "payload_over_ideal": r["payload_bits"] / r["ideal_bits"] if r["ideal_bits"] else None,
            }  # fmt: skip
        if durations:
            uniform = cache.model("uniform", k, lmbda)
            header = Header(k=k, lmbda=lmbda, coder="uniform", packet_ms=packet_ms, resync_ms=int(resync_s * 1000),
                            durations=True)  # fmt: skip
            row["durations_bps"] = _run(header, uniform, streams)["duration_bits"] / seconds
        doc["pairs"].append(row)
    return doc


def format_table(doc: dict) -> str:
    lines = []
    if doc["random_weights"]:
        lines.append(f"model set '{doc['models']}' has RANDOM weights: the figures check the plumbing, not speech")
    lines.append(f"packets every {doc['packet_ms']} ms, resync every {doc['resync_s']:g} s; bit/s per coder")
    lines.append("| k | λ | units/s | authors' bitrate | coder | ideal | payload | on wire | resync cost (bits) |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for row in doc["pairs"]:
        for name, c in row["coders"].items():
            cost = "-" if c["resync_cost_bits"] is None else f"{c['resync_cost_bits']:.1f}"
            lines.append(f"| {row['k']} | {row['lmbda']} | {row['units_per_s']:.1f} | {row['authors_bitrate']:.1f} | "
                         f"{name} | {c['ideal_bps']:.1f} | {c['payload_bps']:.1f} | {c['on_wire_bps']:.1f} | {cost} |")  # fmt: skip
        if "durations_bps" in row:
            lines.append(f"| {row['k']} | {row['lmbda']} | | | durations (separate) | | {row['durations_bps']:.1f} | | |")
    return "\n".join(lines)
