"""The browser page on the TypeScript client package (clients/typescript, copied into client/web): what it adds to
tests/test_browser.py's checks. The uplink bytes it shows (#uplink-bytes, a plain integer) are the bytes the server
received; with ?format=opus&opus_bitrate=24000 it records Opus with MediaRecorder and starts an "opus" session; when
the network drops (a TCP proxy resets every connection) the page reconnects and resumes the session, its units
contiguous (skipped while the server offers no resume). Headless Chromium with a fake microphone, as there."""

from __future__ import annotations

import dataclasses
import socket
import struct
import threading

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


class ResettingProxy:
    """A TCP proxy on 127.0.0.1 in front of ``port``; ``cut()`` resets every connection through it (no close frame,
    no FIN), as a network failure does."""

    def __init__(self, port: int):
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target), timeout=10)
            upstream.settimeout(None)
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> int:
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
                s.close()
            except OSError:
                pass
        return len(conns) // 2

    def close(self) -> None:
        self.listener.close()
        self.cut()


@pytest.mark.skipif("resume_token" not in {f.name for f in dataclasses.fields(P.Ready)},
                    reason="this server offers no resume yet (ready.resume_token)")
def test_page_resumes_its_session_when_the_network_drops(tmp_path):
    capture = speech_capture(tmp_path)
    with ServerThread(ServerConfig(port=0, models="tiny")) as srv:
        proxy = ResettingProxy(srv.port)
        url = f"http://127.0.0.1:{proxy.port}/?autostart=1&mode=cached&resynth=0"
        proc, page = open_page(url, str(tmp_path / "profile"), capture)
        try:
            for cut in range(1, 4):
                page.wait_for(f"window.dpslmState && window.dpslmState.units >= {5 * cut}", timeout=90)
                assert proxy.cut() >= 1
                page.wait_for(f"window.dpslmState.resumes >= {cut}", timeout=60)
            page.wait_for("window.dpslmState.units >= 20", timeout=90)  # units go on after the last resume
            page.eval("document.getElementById('stop').click()")
            ended = page.wait_for("window.dpslmState.ended", timeout=90)
            state = page.eval("window.dpslmState")
            # The client checked every unit's seq (a gap or a repeat would be an error here): contiguous, and every
            # unit the server sent arrived once.
            assert state["errors"] == [], state["errors"]
            assert ended["reason"] == "end" and ended["units"] == state["units"] and state["resumes"] == 3
        finally:
            close_browser(proc)
            proxy.close()
