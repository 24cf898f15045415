"""The offline CLI (encode, score, resynth, download) end to end on the tiny set, as a user runs it."""

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from dpslm_stream import hub
from dpslm_stream.cli import main
from dpslm_stream.dpdp import dpdp
from dpslm_stream.pipeline import Pipeline

SAMPLE = Path(__file__).parents[1] / "dpslm_stream" / "data" / "sample.wav"


def _bitrate_by_hand(units, seconds):
    counts = Counter(units)
    n = len(units)
    h = -sum(c / n * math.log2(c / n) for c in counts.values())
    return n * h / seconds


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """2.5 s of the bundled sample, resampled to 44.1 kHz on disk (the CLI resamples back to 16 kHz)."""
    from dpslm_stream.audio import load_audio, resample

    wav, sr = load_audio(SAMPLE)
    wav = resample(torch.from_numpy(wav[: int(2.5 * sr)]), sr, 44100).numpy()
    path = tmp_path_factory.mktemp("clip") / "clip.flac"
    sf.write(path, wav, 44100)
    return path


def test_encode_json_matches_the_offline_flow(tiny_dir, clip, tmp_path, capsys):
    out = tmp_path / "u.json"
    assert main(["encode", str(clip), "--models", str(tiny_dir), "--k", "100", "--lmbda", "600", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["random_weights"] is True and doc["k"] == 100 and doc["lmbda"] == 600 and doc["num_neighbors"] == 5
    r = doc["files"][str(clip)]
    # Independent recomputation: features through the loader, DPDP, run-length by hand.
    pipe = Pipeline(hub.ModelSet(str(tiny_dir)), 100, 600)
    import soundfile

    wav, sr = soundfile.read(clip, dtype="float32")
    frame_units = dpdp(pipe.features(wav, sr), pipe.codebook, 600, 5).tolist()
    runs = [(u, sum(1 for _ in g)) for u, g in __import__("itertools").groupby(frame_units)]
    assert r["units"] == [u for u, _ in runs] and r["durations"] == [d for _, d in runs]
    assert sum(r["durations"]) == r["num_frames"] == len(wav) * 16000 // 44100 // 320
    assert r["starts"] == np.concatenate([[0], np.cumsum(r["durations"])[:-1]]).tolist()
    assert r["bitrate"] == pytest.approx(_bitrate_by_hand(r["units"], r["seconds"]))
    ulm, tok = pipe.ulm
    assert r["loglikelihood"] == pytest.approx(ulm.loglikelihood(tok.encode(r["units"])), rel=1e-5)
    assert "RANDOM" in capsys.readouterr().err


def test_score_equals_upstream_loglikelihood(tiny_dir, capsys):
    units = [3, 17, 99, 0, 42]
    assert main(["score", "--units", " ".join(map(str, units)), "--models", str(tiny_dir), "--k", "100", "--lmbda", "0"]) == 0
    printed = float(capsys.readouterr().out.split()[-1])
    ulm, tok = hub.ModelSet(str(tiny_dir)).ulm(100, 0)
    assert printed == pytest.approx(ulm.loglikelihood(tok.encode(units)), abs=1e-3)


def test_resynth_writes_24k_audio_and_a_report(tiny_dir, clip, tmp_path):
    out = tmp_path / "r.wav"
    argv = ["resynth", str(clip), "-o", str(out), "--models", str(tiny_dir), "--k", "100", "--lmbda", "600",
            "--greedy", "--max-codec-tokens-per-phone", "3"]
    assert main(argv) == 0
    audio, sr = sf.read(out)
    report = json.loads(out.with_suffix(".json").read_text())
    assert sr == 24000 and len(audio) == 600 * len(report["samples"][0]["codec_ids"]) > 0
    assert report["random_weights"] and report["units"] and report["greedy"]
    first = report["samples"][0]["codec_ids"]
    assert main(argv) == 0  # greedy is deterministic
    assert json.loads(out.with_suffix(".json").read_text())["samples"][0]["codec_ids"] == first
    # from a units file too
    units_json = tmp_path / "u.json"
    units_json.write_text(json.dumps({"units": report["units"], "durations": report["durations"]}))
    assert main(argv[:1] + [str(units_json), "--from-units"] + argv[2:]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["samples"][0]["codec_ids"] == first


@pytest.mark.parametrize(
    "argv,message",
    [
        (["encode", "missing.wav", "--models", "TINY_DIR"], "missing.wav"),
        (["encode", "SAMPLE", "--models", "TINY_DIR", "--k", "500", "--lmbda", "4400"], "valid pairs"),
        (["encode", "SAMPLE", "--models", "/nonexistent"], "model folder not found"),
        (["score", "--units", "1 2 500", "--models", "TINY_DIR", "--k", "500", "--lmbda", "0"], "0..499"),
        (["encode", "SAMPLE", "--models", "TINY_DIR", "--k", "200", "--lmbda", "700"], "codebook-layer-11-k-200"),
    ],
)
def test_bad_input_is_a_clear_error_not_a_traceback(tiny_dir, argv, message, capsys):
    argv = [str(tiny_dir) if a == "TINY_DIR" else str(SAMPLE) if a == "SAMPLE" else a for a in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "dpslm_stream", "download", "--list"], capture_output=True, text=True)
    assert out.returncode == 0 and "wavlm-large-6fb4b3c3.pt" in out.stdout and len(out.stdout.splitlines()) == 1 + 5 + 24 + 1 + 2 + 24 + 1 + 2


def test_encode_stream_full_equals_offline_and_compare_reports_exact(tiny_dir, clip, tmp_path, capsys):
    """`encode --stream full` is the offline computation fed in chunks: same units, durations, starts; its
    comparison reports exact agreement, while the dither noise floor is measured separately."""
    offline, streamed = tmp_path / "off.json", tmp_path / "str.json"
    base = [str(clip), "--models", str(tiny_dir), "--k", "100", "--lmbda", "600", "--quiet"]
    assert main(["encode", *base, "--json", str(offline)]) == 0
    assert main(["encode", *base, "--json", str(streamed), "--stream", "full", "--chunk-ms", "37", "--compare"]) == 0
    off = json.loads(offline.read_text())["files"][str(clip)]
    doc = json.loads(streamed.read_text())
    got = doc["files"][str(clip)]
    assert doc["stream"]["mode"] == "full" and doc["random_weights"] is True
    for key in ("units", "durations", "starts", "num_frames"):
        assert got[key] == off[key], key
    assert got["loglikelihood"] == pytest.approx(off["loglikelihood"], rel=1e-5)
    exact = got["compare"]["streaming"]
    assert exact["frame_agreement"] == 1.0 and exact["unit_error_rate"] == 0.0
    assert exact["feature_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert 0.0 <= got["compare"]["noise_floor"]["frame_agreement"] <= 1.0
    assert "plumbing check only" in capsys.readouterr().out


def test_encode_stream_cached_with_whole_input_lookahead_equals_offline(tiny_dir, clip, tmp_path):
    """The cached window reduces to offline when the lookahead covers the whole input (one window)."""
    offline, streamed = tmp_path / "off.json", tmp_path / "str.json"
    base = [str(clip), "--models", str(tiny_dir), "--k", "100", "--lmbda", "600", "--quiet", "--no-score"]
    assert main(["encode", *base, "--json", str(offline)]) == 0
    assert main(["encode", *base, "--json", str(streamed), "--stream", "cached", "--left", "0", "--hop", "1000",
                 "--lookahead", "1000"]) == 0  # fmt: skip
    off = json.loads(offline.read_text())["files"][str(clip)]
    got = json.loads(streamed.read_text())["files"][str(clip)]
    assert got["units"] == off["units"] and got["durations"] == off["durations"]


def test_encode_window_options_need_stream(tiny_dir, clip, capsys):
    assert main(["encode", str(clip), "--models", str(tiny_dir), "--compare"]) == 1
    assert "--compare needs --stream" in capsys.readouterr().err


def test_edit_distance_matches_the_textbook_table():
    from dpslm_stream.stream.compare import edit_distance

    def textbook(a, b):
        d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
        for i in range(1, len(a) + 1):
            for j in range(1, len(b) + 1):
                d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
        return d[-1][-1]

    rng = np.random.default_rng(0)
    for _ in range(200):
        a = rng.integers(0, 4, rng.integers(0, 12)).tolist()
        b = rng.integers(0, 4, rng.integers(0, 12)).tolist()
        assert edit_distance(a, b) == textbook(a, b), (a, b)


def test_live_server_and_client_subcommands_are_wired():
    from dpslm_stream.cli import build_parser

    parser = build_parser()
    for argv in (["live", "--port", "0"], ["serve", "--port", "0"], ["stream", "x.wav"], ["mic", "--seconds", "1"]):
        assert parser.parse_args(argv).command == argv[0]


def test_encode_reports_a_bad_file_and_still_encodes_the_others(tiny_dir, clip, tmp_path, capsys):
    short, missing, out = tmp_path / "short.wav", tmp_path / "missing.wav", tmp_path / "u.json"
    sf.write(short, np.zeros(100, np.float32), 16000)
    code = main(["encode", str(short), str(clip), str(missing), "--models", str(tiny_dir), "--quiet", "--no-score",
                 "--json", str(out)])  # fmt: skip
    assert code == 1
    doc = json.loads(out.read_text())
    assert list(doc["files"]) == [str(clip)] and doc["files"][str(clip)]["units"]
    assert set(doc["errors"]) == {str(short), str(missing)} and "too short" in doc["errors"][str(short)]
    assert "2 of 3 file(s) failed" in capsys.readouterr().err


def test_a_command_imports_no_other_commands_module():
    """`dpslm-stream encode` parses without importing the server, the clients, the corpus or the codec CLI (a fresh
    interpreter: this process has imported them all already)."""
    import subprocess
    import sys

    code = ("import sys\nfrom dpslm_stream import cli\nargv = ['encode', 'x.wav', '--no-score']\n"
            "assert cli.build_parser(cli._command_in(argv)).parse_args(argv).command == 'encode'\n"
            "print(sorted(m for m in sys.modules if m.startswith(('dpslm_stream.server', 'dpslm_stream.client', "
            "'dpslm_stream.corpus', 'dpslm_stream.codec', 'websockets'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
