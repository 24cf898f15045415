"""The browser page end to end: headless Chromium (Debian's `chromium` package) opens the page the server serves,
captures a fake microphone (a WAV file, at Chromium's own device rate) through the AudioWorklet, streams PCM16 over
the WebSocket, and units appear on the page; Stop sends end and the page shows the server's end message.

Driven over the Chrome DevTools Protocol with the `websockets` package (no Selenium/Playwright needed)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import soundfile as sf
import websockets

from dpslm_stream.server.app import ServerConfig, ServerThread
from dpslm_stream.tiny import speech_like

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary (Debian: apt-get install chromium)")


class Page:
    """One page target of a running Chromium, evaluated through the DevTools Protocol."""

    def __init__(self, ws_url: str):
        self.ws_url = ws_url
        self._id = 0

    def call(self, method: str, params: dict) -> dict:
        """One DevTools Protocol command; its result."""

        async def run():
            async with websockets.connect(self.ws_url, max_size=2**26) as ws:
                self._id += 1
                await ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
                while True:
                    msg = json.loads(await ws.recv())
                    if msg.get("id") == self._id:
                        return msg["result"]

        return asyncio.run(run())

    def eval(self, expression: str):
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise AssertionError(f"page error: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path) -> None:
        """A PNG of the page as rendered."""
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"})["data"]))

    def wait_for(self, expression: str, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.eval(expression)
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {expression}; state: {self.eval('JSON.stringify(window.dpslmState)')}")


def open_page(url: str, profile: str, capture_wav: str) -> tuple[subprocess.Popen, Page]:
    proc = subprocess.Popen(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
         "--window-size=1000,760", "--hide-scrollbars",
         "--remote-debugging-port=0", f"--user-data-dir={profile}",
         "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
         f"--use-file-for-fake-audio-capture={capture_wav}", "--autoplay-policy=no-user-gesture-required", url],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    port_file = os.path.join(profile, "DevToolsActivePort")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if os.path.exists(port_file) and open(port_file).read().strip():
            port = open(port_file).read().split()[0]
            targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list").read())
            pages = [t for t in targets if t["type"] == "page" and t["url"].startswith(url.split("?")[0])]
            if pages:
                return proc, Page(pages[0]["webSocketDebuggerUrl"])
        if proc.poll() is not None:
            raise AssertionError(f"chromium exited with {proc.returncode}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("chromium did not open the page")


def close_browser(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def speech_capture(tmp_path) -> str:
    capture = str(tmp_path / "speech.wav")
    sf.write(capture, speech_like(6.0, 48000, seed=21), 48000, subtype="PCM_16")
    return capture


def test_browser_page_streams_the_microphone_and_shows_units(tmp_path):
    capture = speech_capture(tmp_path)
    with ServerThread(ServerConfig(port=0, models="tiny")) as srv:
        # resynth=0: units only (the "audio back" box unticked): the start carries no resynth, no audio comes back.
        proc, page = open_page(f"{srv.http_url}/?autostart=1&mode=cached&resynth=0", str(tmp_path / "profile"), capture)
        try:
            page.wait_for("window.dpslmState && window.dpslmState.units >= 5")
            state = page.eval("window.dpslmState")
            assert state["errors"] == [] and state["session"]
            # The page captured at the device's own rate and declared it; the server resamples.
            conn = next(c for c in srv.server.connections if c.id == state["session"])
            assert conn.core.start.sample_rate == state["sampleRate"] and conn.core.start.format == "pcm16"
            assert conn.core.start.version == 2 and conn.core.start.resynth is None
            assert page.eval("document.querySelectorAll('#strip .unit').length") >= 5
            assert page.eval("document.getElementById('m-units').textContent") != "0"
            page.wait_for("document.getElementById('m-bitrate').textContent !== '\\u2013'")  # a stats message arrived
            # The page shows what a listener needs to subscribe: the session id and the listen token from ready.
            share = page.eval("document.getElementById('share').textContent")
            assert state["listenToken"] and state["session"] in share and state["listenToken"] in share
            page.eval("document.getElementById('stop').click()")
            ended = page.wait_for("window.dpslmState.ended")
            final = page.eval("window.dpslmState")
            assert ended["reason"] == "end" and ended["units"] == final["units"] >= 5
            assert final["errors"] == [] and "ended" in page.eval("document.getElementById('status').textContent")
            assert ended.get("resynth") is None and final["audioChunks"] == 0
            assert page.eval("document.getElementById('audio').textContent") == "audio back: off"
        finally:
            close_browser(proc)


def test_browser_page_plays_the_resynthesized_audio_back(tmp_path):
    """The "audio back (resynthesis)" box (ticked by default): start carries resynth {}, the server streams 24 kHz
    PCM16 chunks as binary frames, the page counts them on arrival (whether or not headless Chromium's AudioContext
    plays) and schedules them gaplessly; the end message comes after the last chunk."""
    capture = speech_capture(tmp_path)
    with ServerThread(ServerConfig(port=0, models="tiny")) as srv:
        proc, page = open_page(f"{srv.http_url}/?autostart=1&mode=cached", str(tmp_path / "profile"), capture)
        try:
            page.wait_for("window.dpslmState && window.dpslmState.units >= 5 && window.dpslmState.audioChunks >= 2")
            assert page.eval("document.getElementById('resynth').checked") is True
            state = page.eval("window.dpslmState")
            assert state["errors"] == [] and state["resynth"] is True
            conn = next(c for c in srv.server.connections if c.id == state["session"])
            assert conn.core.start.version == 2 and conn.core.start.resynth == {}
            page.wait_for("document.getElementById('m-rlag').textContent !== '\\u2013'")  # stats.resynth_lag_s shown
            page.eval("document.getElementById('stop').click()")
            ended = page.wait_for("window.dpslmState.ended")
            final = page.eval("window.dpslmState")
            assert final["errors"] == [], final["errors"]
            assert ended["reason"] == "end" and ended["units"] == final["units"] >= 5
            totals = ended["resynth"]
            assert totals is not None and totals["error"] is None
            # Every chunk arrived before the end message, none after it, and they add up to the server's totals.
            assert final["audioChunksAtEnd"] == final["audioChunks"] == totals["chunks"] > 0
            assert final["audioAfterEnd"] == 0
            assert final["audioSeconds"] == pytest.approx(totals["audio_seconds"], abs=1e-3)
            assert final["audioSeconds"] == pytest.approx(ended["stats"]["resynth_audio_s"], abs=1e-3)
            text = page.eval("document.getElementById('audio').textContent")
            match = re.match(r"audio (\d+\.\d+) s in (\d+) chunks", text)
            assert match, text
            assert float(match.group(1)) > 0 and int(match.group(2)) == final["audioChunks"]
            # --autoplay-policy=no-user-gesture-required lets headless Chromium's AudioContext run (no sound device
            # needed): the chunks were scheduled on a running clock. Gaps (playbackGaps) depend on the machine's speed.
            assert final["playback"] == "running", final["playback"]
            status = page.eval("document.getElementById('status').textContent")
            assert "ended" in status and "audio back" in status
        finally:
            close_browser(proc)


# The README's screenshot: written by the test below when DPSLM_UPDATE_SCREENSHOT=1 (else into the test's tmp dir).
SCREENSHOT = Path(__file__).parents[1] / "docs" / "page.png"


def test_idle_page_guides_first_use_without_meaningless_figures(tmp_path):
    capture = speech_capture(tmp_path)
    with ServerThread(ServerConfig(port=0, models="tiny", warmup=False)) as srv:
        proc, page = open_page(f"{srv.http_url}/", str(tmp_path / "profile"), capture)
        try:
            page.wait_for("document.getElementById('pair') && document.getElementById('pair').options.length > 0")
            guide = page.eval("document.getElementById('guide').innerText")
            assert page.eval("document.getElementById('guide').offsetParent !== null")  # visible
            assert "Start" in guide and "microphone" in guide and "headphones" in guide
            audio = page.eval("document.getElementById('audio').textContent")
            assert audio == "audio back: on (use headphones)"
            for meter in ("m-units", "m-audio", "m-lag", "m-bitrate", "m-rtf"):
                assert page.eval(f"document.getElementById('{meter}').textContent") == "\u2013", meter
            placeholder = page.eval("getComputedStyle(document.getElementById('strip'), '::before').content")
            assert "Units appear here" in placeholder
            # Audio back off: the headphone advice goes, and the audio line says off.
            page.eval("const r = document.getElementById('resynth'); r.checked = false; r.onchange()")
            assert page.eval("document.getElementById('guide-audio').offsetParent") is None
            assert page.eval("document.getElementById('audio').textContent") == "audio back: off"
        finally:
            close_browser(proc)


def test_unit_tiles_are_readable_and_the_readme_screenshot(tmp_path):
    """While streaming: every tile shows its whole number (nothing cut off, however short the unit), then a
    screenshot of the page is taken (the README's, with DPSLM_UPDATE_SCREENSHOT=1)."""
    capture = speech_capture(tmp_path)
    with ServerThread(ServerConfig(port=0, models="tiny")) as srv:
        proc, page = open_page(f"{srv.http_url}/?autostart=1&mode=cached", str(tmp_path / "profile"), capture)
        try:
            page.wait_for("window.dpslmState && window.dpslmState.units >= 40 && window.dpslmState.audioChunks >= 2",
                          timeout=90)  # fmt: skip
            assert page.eval("document.getElementById('guide').offsetParent") is None  # guidance gone once started
            cut = page.eval("[...document.querySelectorAll('#strip .unit')]"
                            ".filter(e => e.scrollWidth > e.clientWidth).map(e => e.textContent)")
            assert cut == [], cut
            assert page.eval("document.getElementById('audio').textContent").startswith("audio ")
            target = SCREENSHOT if os.environ.get("DPSLM_UPDATE_SCREENSHOT") == "1" else tmp_path / "page.png"
            page.screenshot(target)
            assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and target.stat().st_size > 10_000
        finally:
            close_browser(proc)


def test_browser_page_shows_the_bitstream_payload_next_to_the_authors_bitrate(tmp_path):
    """transmit=ulm: the start carries transmit {coder: "ulm"}, bitstream frames arrive (counted, not errors) and the
    meters show the measured payload bit/s beside the authors' bitrate."""
    capture = speech_capture(tmp_path)
    with ServerThread(ServerConfig(port=0, models="tiny")) as srv:
        url = f"{srv.http_url}/?autostart=1&mode=cached&resynth=0&transmit=ulm"
        proc, page = open_page(url, str(tmp_path / "profile"), capture)
        try:
            page.wait_for("window.dpslmState && window.dpslmState.bitstreamFrames >= 3")
            page.wait_for("document.getElementById('m-payload').textContent !== '\\u2013'")  # stats with transmit
            # The first stats may come before the first packet's bits are counted (payload 0): wait for a positive one.
            page.wait_for("window.dpslmState.transmit && window.dpslmState.transmit.payload_bps > 0")
            state = page.eval("window.dpslmState")
            assert state["errors"] == [] and state["transmit"]["payload_bps"] > 0
            conn = next(c for c in srv.server.connections if c.id == state["session"])
            assert conn.core.transmit["coder"] == "ulm"
            assert page.eval("document.getElementById('m-bitrate').textContent") != "\u2013"
            page.eval("document.getElementById('stop').click()")
            page.wait_for("window.dpslmState.ended")
            assert page.eval("window.dpslmState")["errors"] == []
        finally:
            close_browser(proc)


def test_mediarecorder_webm_opus_decodes_like_pyav_does(tmp_path):
    """What Chromium's MediaRecorder (audio/webm;codecs=opus at 24 kbit/s, 100 ms timeslices) writes for the fake
    microphone: the server's streaming decoder, fed the blobs as they came and split at random points, returns what
    PyAV's own demuxer and decoder give for the whole file, bit for bit. (The page's own Opus session, end to end, is
    tests/test_browser_client.py's.)"""
    av = pytest.importorskip("av", reason="the Opus uplink needs PyAV")
    import random

    import numpy as np

    from dpslm_stream.opus import OpusUplinkDecoder, decode_opus_file

    capture = speech_capture(tmp_path)
    with ServerThread(ServerConfig(port=0, models="tiny", warmup=False)) as srv:
        proc, page = open_page(f"{srv.http_url}/", str(tmp_path / "profile"), capture)
        try:
            page.wait_for("document.getElementById('pair') && document.getElementById('pair').options.length > 0")
            assert page.eval("window.isSecureContext")
            blobs = page.eval("""(async () => {
                const stream = await navigator.mediaDevices.getUserMedia({audio: true});
                const rec = new MediaRecorder(stream, {mimeType: 'audio/webm;codecs=opus', audioBitsPerSecond: 24000});
                const parts = [];
                rec.ondataavailable = (e) => parts.push(e.data);
                rec.start(100);
                await new Promise((r) => setTimeout(r, 3000));
                const stopped = new Promise((r) => rec.onstop = r);
                rec.stop();
                await stopped;
                const out = [];
                for (const p of parts) {
                    const bytes = new Uint8Array(await p.arrayBuffer());
                    let s = '';
                    for (const b of bytes) s += String.fromCharCode(b);
                    out.push(btoa(s));
                }
                return out;
            })()""")
        finally:
            close_browser(proc)
    parts = [base64.b64decode(b) for b in blobs]
    data = b"".join(parts)
    assert len(parts) > 10 and data[:4] == b"\x1a\x45\xdf\xa3"
    reference = decode_opus_file(data)
    assert 2.0 * 48000 < len(reference) < 4.0 * 48000 and np.abs(reference).max() > 0.01  # the capture, not silence
    decoder = OpusUplinkDecoder("auto")
    got = np.concatenate([decoder.push(p) for p in parts])
    assert decoder.container == "webm" and decoder.take_dropped() == []
    assert np.array_equal(got, reference)
    rng = random.Random(0)
    decoder = OpusUplinkDecoder("webm")
    cuts = sorted(rng.sample(range(1, len(data)), 40))
    got = np.concatenate([decoder.push(data[a:b]) for a, b in zip([0, *cuts], [*cuts, len(data)])])
    assert np.array_equal(got, reference)
    del av
