"""The unit bitstream on real pipeline units (tiny RANDOM-weight set: plumbing): every coder, the ULM coder's
decodability across thread counts and batch compositions, and the `codec` CLI."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from dpslm_stream.cli import main
from dpslm_stream.codec import BitstreamError, Header, PacketDecoder, PacketEncoder, decode_stream, encode_stream, fit_table
from dpslm_stream.codec.cli import ModelCache, commits_offline, commits_streamed
from dpslm_stream.codec.models import ULMModel
from dpslm_stream.models.ulm import IncrementalScorer, ScoringPool, score_blocks
from dpslm_stream.pipeline import Pipeline
from dpslm_stream.tiny import speech_like

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SAMPLE = Path(__file__).parents[1] / "dpslm_stream" / "data" / "sample.wav"
PAIR = (500, 4500)


@pytest.fixture(scope="module")
def audios():
    from dpslm_stream.audio import load_audio

    wav, sr = load_audio(SAMPLE)
    return [(wav[: int(3.0 * sr)], sr), (speech_like(2.5, seed=3).astype(np.float32), 16000)]


@pytest.fixture(scope="module")
def cache(tiny_models):
    return ModelCache(tiny_models)


@pytest.fixture(scope="module")
def offline(tiny_models, audios):
    pipe = Pipeline(tiny_models, *PAIR)
    return [pipe.encode(wav, sr, score=False) for wav, sr in audios]


def _models(cache, units):
    table = fit_table(units, PAIR[0], order=2)
    return [cache.model("uniform", *PAIR), cache.model("table", *PAIR, table), cache.model("ulm", *PAIR)]


def _header(model, packet_ms=100, resync_ms=1000, durations=True, termination="segment"):
    return Header(k=PAIR[0], lmbda=PAIR[1], coder=model.coder, packet_ms=packet_ms, resync_ms=resync_ms,
                  model_hash=model.model_hash, durations=durations, termination=termination)  # fmt: skip


def test_every_coder_round_trips_the_encode_units_at_several_chunkings(tiny_models, cache, audios, offline):
    from dpslm_stream.stream.compare import stream_encode
    from dpslm_stream.stream.worker import EncoderWorker

    worker = EncoderWorker(tiny_models, pairs=[PAIR])
    models = _models(cache, [r.units for r in offline])
    for (wav, sr), ref in zip(audios, offline):
        for chunk_s in (0.04, 0.13, 0.5):
            res = stream_encode(worker, wav, sr, k=PAIR[0], lmbda=PAIR[1], mode="full", chunk_s=chunk_s)
            assert res.units == ref.units and res.durations == ref.durations  # the exact streaming path
            for model, packet_ms in zip(models, (20, 100, 200)):
                for termination in ("segment", "packet"):
                    header = _header(model, packet_ms, termination=termination)
                    data, stats = encode_stream(header, model, commits_streamed(res))
                    out = decode_stream(data, lambda h: model)
                    assert out.units == ref.units and out.durations == ref.durations, (model.coder, chunk_s)
                    slack = 32 * stats.resyncs if termination == "segment" else 9 * stats.packets
                    assert stats.payload_bits <= stats.quantized_bits * 1.01 + slack


@pytest.mark.parametrize("packet_ms", [20, 100])
def test_ulm_coding_is_within_one_percent_and_32_bits_per_resync_segment(cache, offline, packet_ms):
    model = cache.model("ulm", *PAIR)
    units = [u for r in offline for u in r.units] * 3
    commits = [([u], None, 60 * i) for i, u in enumerate(units)]
    for resync_ms in (0, 2000):
        header = _header(model, packet_ms=packet_ms, resync_ms=resync_ms, durations=False)
        _, stats = encode_stream(header, model, commits)
        assert stats.terminations == stats.resyncs
        assert stats.quantized_bits - 8 * stats.resyncs <= stats.payload_bits
        assert stats.payload_bits <= stats.quantized_bits * 1.01 + 32 * stats.resyncs


def test_ulm_probabilities_are_bit_identical_across_thread_counts(cache, offline):
    model = cache.model("ulm", *PAIR)
    units = offline[0].units[:80]

    def freqs(threads):
        torch.set_num_threads(threads)
        model.reset()
        out = []
        for u in units:
            out.append((model.frequencies(), model._logits.copy()))
            model.advance(u)
        return out

    try:
        a, b = freqs(1), freqs(2)
    finally:
        torch.set_num_threads(1)
    # The logits themselves are bit-identical (float64 output layer), not just their quantized frequencies.
    assert all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, b))
    # And a stream encoded with 2 threads decodes with 1.
    torch.set_num_threads(2)
    try:
        data, _ = encode_stream(_header(model), model, commits_offline(offline[0].units, offline[0].durations))
    finally:
        torch.set_num_threads(1)
    assert decode_stream(data, lambda h: cache.model("ulm", *PAIR)).units == offline[0].units


def test_streams_coded_among_batched_sessions_decode_on_the_batch1_path(cache, offline):
    """Three senders share the ULM; between their packets the server-style batched scorer runs a right-padded
    forward over all of them (score_blocks). Each stream still decodes exactly on its own."""
    ulm, digest = cache.ulm(*PAIR)
    sources = [offline[0].units, offline[1].units, offline[0].units[::-1]]
    encoders = [PacketEncoder(_header(ULMModel(ulm, digest)), ULMModel(ulm, digest)) for _ in sources]
    pool = ScoringPool(ulm)  # one batched cache, as the encoder worker's sessions share
    scorers = [IncrementalScorer(ulm, pool=pool) for _ in sources]
    packets = [[e.header_bytes()] for e in encoders]
    for i in range(max(map(len, sources))):
        blocks = [s[i : i + 1] for s in sources]
        score_blocks(scorers, blocks)
        for e, s, out in zip(encoders, sources, packets):
            if i < len(s):
                out += e.push([s[i]], [1], 40 * i)
    for e, out in zip(encoders, packets):
        out += e.finish()
    for s, out in zip(sources, packets):
        dec = decode_stream(b"".join(out), lambda h: ULMModel(ulm, digest))
        assert dec.units == [int(u) for u in s]


def test_a_ulm_of_another_pair_is_refused(cache, tiny_models, offline):
    model = cache.model("ulm", *PAIR)
    data, _ = encode_stream(_header(model), model, commits_offline(offline[1].units, offline[1].durations))
    other = cache.model("ulm", 500, 0)  # same K, other weights
    with pytest.raises(BitstreamError, match="wrong model"):
        decode_stream(data, lambda h: other)


@pytest.mark.parametrize("termination", ["segment", "packet"])
def test_lossy_ulm_stream_decodes_its_undamaged_segments(cache, offline, termination):
    model = cache.model("ulm", *PAIR)
    units = offline[0].units
    enc = PacketEncoder(_header(model, packet_ms=60, resync_ms=600, termination=termination), model)
    sent = [p for c in commits_offline(units, offline[0].durations) for p in enc.push(*c)] + enc.finish()
    dec = PacketDecoder(enc.header, cache.model("ulm", *PAIR))
    kept = [p for i, p in enumerate(sent) if i % 7 != 3 or i == len(sent) - 1]  # drop every 7th but the END one
    got = [dec.push(p) for p in kept]
    ok = [u for r in got if r.status == "ok" for u in r.units]
    assert dec.report.packets_lost == len(sent) - len(kept) and dec.report.recoveries >= 1 and dec.report.ended
    assert 0 < len(ok) < len(units)
    clean = PacketDecoder(enc.header, cache.model("ulm", *PAIR))
    per_seq = {r.seq: r.units for r in (clean.push(p) for p in sent)}
    assert sum(per_seq.values(), []) == units
    for r in got:
        if r.status == "ok":
            assert r.units == per_seq[r.seq]


# --- CLI --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip(tmp_path_factory, audios):
    path = tmp_path_factory.mktemp("codec") / "clip.wav"
    sf.write(path, audios[0][0], audios[0][1])
    return path


def test_cli_encode_decode_fit_eval(tiny_dir, clip, tmp_path, offline, capsys):
    models = ["--models", str(tiny_dir)]
    units_json = tmp_path / "u.json"
    assert main(["encode", str(clip), *models, "--json", str(units_json), "--no-score", "--quiet"]) == 0
    table = tmp_path / "t.dpst"
    assert main(["codec", "fit", str(units_json), "-o", str(table)]) == 0
    for coder in ("uniform", "table", "ulm"):
        out = tmp_path / f"{coder}.dpsu"
        extra = ["--table", str(table)] if coder == "table" else []
        assert main(["codec", "encode", str(clip), "-o", str(out), "--coder", coder, *extra, *models,
                     "--packet-ms", "40", "--durations", "--chunk-ms", "100"]) == 0  # fmt: skip
        dec_json = tmp_path / f"{coder}.json"
        assert main(["codec", "decode", str(out), "--json", str(dec_json), "--quiet", *models]) == 0
        doc = json.loads(dec_json.read_text())
        assert doc["units"] == offline[0].units and doc["durations"] == offline[0].durations
    # Damaged file: one line, exit 1; --lossy reports what it lost.
    data = bytearray((tmp_path / "ulm.dpsu").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "bad.dpsu").write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["codec", "decode", str(tmp_path / "bad.dpsu"), *models, "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0] and "Traceback" not in err[0]
    assert main(["codec", "decode", str(tmp_path / "bad.dpsu"), *models, "--quiet", "--lossy"]) == 0
    assert "damaged" in capsys.readouterr().out
    # A table stream without its table, decoded with another table: refused.
    assert main(["codec", "encode", str(clip), "-o", str(tmp_path / "ref.dpsu"), "--coder", "table", "--table",
                 str(table), "--no-inline-table", *models]) == 0  # fmt: skip
    (tmp_path / "o.txt").write_text("1 2 3 4\n")
    assert main(["codec", "fit", str(tmp_path / "o.txt"), "-o", str(tmp_path / "o.dpst")]) == 0
    assert main(["codec", "decode", str(tmp_path / "ref.dpsu"), *models, "--table", str(tmp_path / "o.dpst")]) == 1
    assert "wrong model" in capsys.readouterr().err
    # eval: every coder, side by side with the authors' bitrate.
    ev = tmp_path / "eval.json"
    assert main(["codec", "eval", str(clip), *models, "--pairs", "500:4500,100:600", "--json", str(ev)]) == 0
    doc = json.loads(ev.read_text())
    assert doc["random_weights"] and [(r["k"], r["lmbda"]) for r in doc["pairs"]] == [(500, 4500), (100, 600)]
    for row in doc["pairs"]:
        assert set(row["coders"]) == {"uniform", "table-unigram", "table-bigram", "ulm"}
        assert row["coders"]["uniform"]["ideal_bps"] == pytest.approx(row["units_per_s"] * np.log2(row["k"]))
        assert row["coders"]["table-unigram"]["ideal_bps"] >= row["authors_bitrate"] * 0.99
        for c in row["coders"].values():
            seg, pkt = c["segment"], c["packet"]
            assert seg["terminations"] == c["resyncs"] and pkt["terminations"] == pkt["packets"]
            assert seg["payload_bps"] <= pkt["payload_bps"] and seg["lag_ms_mean"] >= pkt["lag_ms_mean"]
            assert pkt["lag_ms_max"] <= 100  # packet termination: decodable when its packet leaves
    assert "authors' bitrate" in capsys.readouterr().out


def test_cli_dtx_drops_units_in_silence_and_decodes_the_rest_with_pauses(tiny_dir, tiny_models, tmp_path, capsys):
    pytest.importorskip("webrtcvad")
    from dpslm_stream.audio import load_audio

    wav, sr = load_audio(SAMPLE)
    clip = np.concatenate([wav[: 2 * sr], np.zeros(sr, dtype=np.float32), wav[2 * sr : 3 * sr]])  # 1 s of silence
    path = tmp_path / "pause.wav"
    sf.write(path, clip, sr)
    models = ["--models", str(tiny_dir)]
    out = tmp_path / "p.dpsu"
    assert main(["codec", "encode", str(path), "-o", str(out), "--coder", "uniform", "--dtx", *models]) == 0
    said = capsys.readouterr().out
    assert "DTX:" in said and " 0 of " not in said
    assert main(["codec", "decode", str(out), "--json", str(tmp_path / "p.json"), "--quiet", *models]) == 0
    doc = json.loads((tmp_path / "p.json").read_text())
    ref = Pipeline(tiny_models, *PAIR).encode(clip, sr, score=False)
    assert 0 < len(doc["units"]) < len(ref.units)
    assert " ".join(map(str, doc["units"][:5])) in " ".join(map(str, ref.units))
    assert doc["silences_ms"] and max(ms for _, ms in doc["silences_ms"]) >= 500
