"""`codec eval`: what the unit bitstream costs, per (k, lambda) and coder, next to the authors' estimate.

For each pair the files go through the offline `encode` path once; every coder then codes the same units (unit
committed when its last frame ends) with the given packet interval and resync period, once with each termination
("segment": one range code per resync segment; "packet": every packet its own code). Per coder:
  ideal     -sum log2 p(unit) / seconds under the coder's unquantized model (for `ulm`, the ULM's cross-entropy)
  quantized -sum log2 f(unit)/2^24: the code length of the integer frequencies actually coded
  payload   range-coded unit bytes / seconds (quantization, terminations, resync resets included), per termination
  on wire   payload + packet framing (sequence number, flags, lengths, CRC-16) / seconds; the header is extra
  lag       decode lag: from a unit's commit to the due time of the packet that makes it decodable (no loss, no
            network delay), mean and max in ms, and the mean number of units committed after it by then
  resync    extra payload bits per resync point (segment termination), against the same coder with no resync
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
    tot: dict = {}
    for commits in streams:
        _, stats = encode_stream(header, model, commits)
        for key, value in stats.to_json().items():
            tot[key] = max(tot.get(key, 0), value) if key.endswith("_max") else tot.get(key, 0) + value
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
            for label, resync_ms, termination in (("segment", int(resync_s * 1000), "segment"),
                                                  ("no_resync", 0, "segment"),
                                                  ("packet", int(resync_s * 1000), "packet")):  # fmt: skip
                header = Header(k=k, lmbda=lmbda, coder=model.coder, packet_ms=packet_ms, resync_ms=resync_ms,
                                model_hash=model.model_hash, termination=termination)  # fmt: skip
                res[label] = _run(header, model, streams)
            seg, nr, pkt = res["segment"], res["no_resync"], res["packet"]
            extra = seg["resyncs"] - nr["resyncs"]
            row["coders"][name] = {
                "ideal_bps": seg["ideal_bits"] / seconds,
                "quantized_bps": seg["quantized_bits"] / seconds,
                "packets": seg["packets"], "resyncs": seg["resyncs"],
                "resync_cost_bits": (seg["payload_bits"] - nr["payload_bits"]) / extra if extra else None,
            }  # fmt: skip
            for label, r in (("segment", seg), ("packet", pkt)):
                row["coders"][name][label] = {
                    "payload_bps": r["payload_bits"] / seconds,
                    "on_wire_bps": (r["payload_bits"] + r["overhead_bits"]) / seconds,
                    "packets": r["packets"], "terminations": r["terminations"],
                    "payload_over_quantized": r["payload_bits"] / r["quantized_bits"] - 1 if r["quantized_bits"] else None,
                    "lag_ms_mean": r["lag_ms_sum"] / max(r["units"], 1), "lag_ms_max": r["lag_ms_max"],
                    "lag_units_mean": r["lag_units_sum"] / max(r["units"], 1), "lag_units_max": r["lag_units_max"],
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
    lines.append(f"packets every {doc['packet_ms']} ms, resync every {doc['resync_s']:g} s; bit/s per coder; payload "
                 f"and on wire with segment / packet termination; over: payload over the quantized code length; lag: "
                 f"decode lag, mean ms (max ms; mean units)")  # fmt: skip
    lines.append("| k | λ | units/s | authors' bitrate | coder | ideal | quantized | payload seg / pkt | over seg / pkt "
                 "| on wire seg / pkt | lag seg | lag pkt | resync cost (bits) |")  # fmt: skip
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in doc["pairs"]:
        for name, c in row["coders"].items():
            seg, pkt = c["segment"], c["packet"]
            cost = "-" if c["resync_cost_bits"] is None else f"{c['resync_cost_bits']:.1f}"
            over = " / ".join("-" if r["payload_over_quantized"] is None else f"{100 * r['payload_over_quantized']:.1f} %"
                               for r in (seg, pkt))  # fmt: skip
            lines.append(f"| {row['k']} | {row['lmbda']} | {row['units_per_s']:.1f} | {row['authors_bitrate']:.1f} | "
                         f"{name} | {c['ideal_bps']:.1f} | {c['quantized_bps']:.1f} | {seg['payload_bps']:.1f} / "
                         f"{pkt['payload_bps']:.1f} | {over} | {seg['on_wire_bps']:.1f} / {pkt['on_wire_bps']:.1f} | "
                         f"{seg['lag_ms_mean']:.0f} ({seg['lag_ms_max']}; {seg['lag_units_mean']:.1f}) | "
                         f"{pkt['lag_ms_mean']:.0f} ({pkt['lag_ms_max']}; {pkt['lag_units_mean']:.1f}) | {cost} |")  # fmt: skip
        if "durations_bps" in row:
            lines.append(f"| {row['k']} | {row['lmbda']} | | | durations (separate) | | | {row['durations_bps']:.1f} | | | "
                         f"| | |")  # fmt: skip
    return "\n".join(lines)
