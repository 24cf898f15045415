"""A newcomer's error paths: every command fails with one line that says what to do, never a traceback, and fails
before loading models where it can (a busy port, no microphone, a typo in --units)."""

from __future__ import annotations

import json
import socket
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from dpslm_stream import hub
from dpslm_stream.cli import main

SAMPLE = Path(__file__).parents[1] / "dpslm_stream" / "data" / "sample.wav"


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty torch.hub cache and no network."""
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))

    def no_network(url, *a, **kw):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    yield
    torch.hub.set_dir(old)


@pytest.mark.parametrize("argv", [["encode", str(SAMPLE)], ["score", "--units", "1 2"],
                                  ["resynth", str(SAMPLE), "-o", "x.wav"], ["download"]])  # fmt: skip
def test_offline_without_checkpoints_says_how_in_one_line(offline, argv, capsys):
    assert main(argv) == 1
    line = _one_line_error(capsys, "--models tiny", "download --list")
    assert "100:0, 100:600, 500:0, 500:4500" in line  # the tiny set's pairs


def test_a_pair_the_tiny_set_lacks_lists_what_it_holds(capsys):
    assert main(["score", "--units", "1 2", "--models", "tiny", "--k", "1000", "--lmbda", "600"]) == 1
    _one_line_error(capsys, "not in the tiny set", "500:4500", "dpslm-stream download --k 1000 --lmbda 600")


@pytest.mark.parametrize("units", ["abc 1", "1 2.5"])
def test_score_rejects_non_integer_units_before_loading(units, capsys, monkeypatch):
    monkeypatch.setattr(hub.ModelSet, "ulm", lambda *a: pytest.fail("models loaded before the input was checked"))
    assert main(["score", "--units", units, "--models", "tiny"]) == 1
    _one_line_error(capsys, "--units: unit ids must be integers")


def test_bench_help_lists_the_benchmarks(capsys):
    assert main(["bench", "--help"]) == 0
    assert "dpslm" in capsys.readouterr().out


@pytest.fixture
def busy_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize("command", ["serve", "live"])
def test_a_busy_port_fails_at_once_before_the_models_load(command, busy_port, capsys, monkeypatch):
    monkeypatch.setattr(hub.ModelSet, "wavlm", lambda *a: pytest.fail("models loaded before the port was checked"))
    assert main([command, "--port", str(busy_port), "--models", "tiny"]) == 1
    _one_line_error(capsys, f"127.0.0.1:{busy_port}", "--port")


def test_live_mic_without_portaudio_fails_before_the_server_starts(capsys, monkeypatch):
    from dpslm_stream.client import mic
    from dpslm_stream.server import app

    def no_portaudio():
        raise mic.MicUnavailable(f"{mic.INSTALL_HINT} (PortAudio library not found)")

    monkeypatch.setattr(mic, "import_sounddevice", no_portaudio)
    monkeypatch.setattr(app, "ServerThread", lambda *a, **k: pytest.fail("server started before the mic check"))
    assert main(["live", "--mic", "--models", "tiny"]) == 1
    _one_line_error(capsys, "apt-get install libportaudio2", "brew install portaudio")


def test_encode_of_only_bad_files_prints_no_figures(tiny_dir, tmp_path, capsys):
    assert main(["encode", str(tmp_path / "missing.wav"), "--models", str(tiny_dir), "--no-score"]) == 1
    captured = capsys.readouterr()
    assert "bitrate" not in captured.out and "real-time factor" not in captured.out
    assert "missing.wav" in captured.err and "Traceback" not in captured.err


def test_resynth_says_when_it_creates_the_output_folder(tiny_dir, tmp_path, capsys):
    clip = tmp_path / "clip.wav"
    sf.write(clip, np.stack([np.zeros(8000), np.ones(8000) * 0.1], 1).astype(np.float32)
             + np.random.default_rng(0).normal(0, 0.05, (8000, 2)).astype(np.float32), 16000)  # stereo
    out = tmp_path / "new" / "dir" / "r.wav"
    assert main(["resynth", str(clip), "-o", str(out), "--models", str(tiny_dir), "--greedy"]) == 0
    err = capsys.readouterr().err
    assert out.is_file() and f"created folder {out.parent}" in err
    assert "2 channels: averaged to mono" in err


def test_stream_client_goes_on_after_a_bad_file_and_says_random_weights(tiny_dir, tmp_path, capsys):
    from dpslm_stream.server.app import ServerConfig, ServerThread

    stereo = tmp_path / "stereo.wav"
    wav, sr = sf.read(SAMPLE, dtype="float32")
    sf.write(stereo, np.stack([wav[: 2 * sr], wav[: 2 * sr]], 1), sr)
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(400, np.float32), 16000)  # too short for a unit: no units line at all
    out = tmp_path / "s.json"
    with ServerThread(ServerConfig(port=0, models=str(tiny_dir), warmup=False, resynth=False)) as srv:
        code = main(["stream", str(tmp_path / "missing.wav"), str(silent), str(stereo), "--url", srv.url,
                     "--json", str(out)])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 1 and "1 of 3 file(s) failed" in captured.err and "Traceback" not in captured.err
    assert "RANDOM weights" in captured.err and "2 channels: averaged to mono" in captured.err
    assert not any(line.strip().endswith(":") for line in captured.out.splitlines()), captured.out
    assert f"{stereo}: units " in captured.out
    doc = json.loads(out.read_text())
    assert set(doc["files"]) == {str(silent), str(stereo)} and set(doc["errors"]) == {str(tmp_path / "missing.wav")}


def test_stream_reports_what_the_server_took_when_it_ended_early():
    from dpslm_stream import protocol as P
    from dpslm_stream.client.stream import StreamResult

    import dataclasses

    ready = P.Ready(**{f.name: {} if f.name == "settings" else None for f in dataclasses.fields(P.Ready)})
    end = P.EndMessage(reason="shutting_down", units=0, num_frames=50, audio_s=1.0, stats={})
    res = StreamResult(ready=ready, end=end, seconds=5.0)
    assert res.processed_seconds == 1.0 and res.to_encode_json()["seconds"] == 1.0


@pytest.mark.parametrize("argv,needle", [
    (["stream", str(SAMPLE), "--url", "http://127.0.0.1:1/"], "--url must be a WebSocket URL"),
    (["encode", str(SAMPLE), "--models", "tiny", "--device", "gpu0"], "--device 'gpu0' is not a torch device"),
    (["bench", "wavlm", "--device", "nonsense"], "--device 'nonsense' is not a torch device"),
    (["encode", str(SAMPLE), "--models", "tiny", "--json", "/proc/no/such/u.json"], "cannot create the output folder"),
    (["resynth", str(SAMPLE), "--models", "tiny", "-o", "/proc/no/such/r.wav"], "cannot create the output folder"),
])  # fmt: skip
def test_bad_options_fail_before_any_work(argv, needle, capsys, monkeypatch):
    monkeypatch.setattr(hub.ModelSet, "wavlm", lambda *a: pytest.fail("models loaded before the options were checked"))
    assert main(argv) == 1
    _one_line_error(capsys, needle)


def test_demo_runs_encode_then_resynth(tiny_dir, tmp_path, monkeypatch, capsys):
    """`dpslm-stream demo` (on a 1 s cut of the sample, to keep it short): both steps parsed by the real parser."""
    import dpslm_stream

    wav, sr = sf.read(SAMPLE, dtype="float32")
    short = tmp_path / "sample.wav"
    sf.write(short, wav[:sr], sr)
    monkeypatch.setattr(dpslm_stream, "SAMPLE_WAV", short)
    assert main(["demo", "--models", str(tiny_dir), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "units.json").is_file() and (tmp_path / "out" / "resynth.wav").is_file()
    assert "Traceback" not in capsys.readouterr().err
