"""The browser page on the TypeScript client package (clients/typescript, copied into client/web): what it adds to
tests/test_browser.py's checks. The uplink bytes it shows (#uplink-bytes, a plain integer) are the bytes the server
received; with ?format=opus&opus_bitrate=24000 it records Opus with MediaRecorder and starts an "opus" session
(skipped while the server does not offer that format). Headless Chromium with a fake microphone, as there."""

from __future__ import annotations

import pytest

from dpslm_stream import protocol as P
from dpslm_stream.server.app import ServerConfig, ServerThread
from tests.test_browser import CHROMIUM, close_browser, open_page, speech_capture

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary (Debian: apt-get install chromium)")


def test_page_shows_the_uplink_bytes_the_server_received(tmp_path):
    capture = speech_capture(tmp_path)
    with ServerThread(ServerConfig(port=0, models="tiny")) as srv:
        proc, page = open_page(f"{srv.http_url}/?autostart=1&mode=cached&resynth=0", str(tmp_path / "profile"), capture)
        try:
            page.wait_for("window.dpslmState && window.dpslmState.units >= 3")
            page.eval("document.getElementById('stop').click()")
            ended = page.wait_for("window.dpslmState.ended")
            state = page.eval("window.dpslmState")
            assert state["errors"] == [] and state["format"] == "pcm16"
            shown = page.eval("document.getElementById('uplink-bytes').textContent")
            assert shown.isdigit() and int(shown) == state["uplinkBytes"] > 0
            # PCM16: 2 bytes per sample at the capture rate, every one of them received by the server.
            assert int(shown) == pytest.approx(2 * ended["audio_s"] * state["sampleRate"], abs=2)
        finally:
            close_browser(proc)


@pytest.mark.skipif("opus" not in P.SAMPLE_FORMATS, reason="this server does not offer start.format \"opus\" yet")
def test_page_streams_opus_at_24_kbits_with_units_and_audio_back(tmp_path):
    capture = speech_capture(tmp_path)
    with ServerThread(ServerConfig(port=0, models="tiny")) as srv:
        url = f"{srv.http_url}/?autostart=1&mode=cached&format=opus&opus_bitrate=24000"
        proc, page = open_page(url, str(tmp_path / "profile"), capture)
        try:
            page.wait_for("window.dpslmState && window.dpslmState.units >= 5 && window.dpslmState.audioChunks >= 1",
                          timeout=120)  # fmt: skip
            state = page.eval("window.dpslmState")
            assert state["errors"] == [] and state["format"] == "opus"
            conn = next(c for c in srv.server.connections if c.id == state["session"])
            assert conn.core.start.format == "opus"
            page.eval("document.getElementById('stop').click()")
            ended = page.wait_for("window.dpslmState.ended", timeout=120)
            final = page.eval("window.dpslmState")
            assert ended["reason"] == "end" and ended["units"] == final["units"] >= 5 and final["errors"] == []
            shown = int(page.eval("document.getElementById('uplink-bytes').textContent"))
            assert shown == final["uplinkBytes"] > 0
            # About 24 kbit/s of Opus plus the WebM framing: far below PCM16 at 48 kHz (768 kbit/s).
            assert shown * 8 / ended["audio_s"] < 48000
        finally:
            close_browser(proc)
