"""A stand-in server that speaks the reconnect/resume contract (COMMON.md; docs/protocol.md once the real server has
it), for the TypeScript client's tests of its side of the contract. It is not the real server: its "units" are one
per 1600 input samples (100 ms at 16 kHz), unit = sum of the block's PCM16 samples mod 1000 (the test computes the
same from the audio), so an uncut session's units are known exactly.

What it does to the client: after each of the ``--drops`` input-sample points (seeded, random), it aborts the TCP
connection at once (no close frame) right after making units it has not sent yet, and it keeps back part of the
audio it received and has not acknowledged (its "accepted" count is cut to a multiple of 1000 samples, never below
its last ack or what its units used), so
the client must resend from a point inside one of its frames. A resume with an unknown token gets the fatal error
resume_failed. Usage: python fake_resume_server.py --drops 5 --seed 1 (prints its ws:// URL, serves until killed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets

import numpy as np
import websockets

BLOCK = 1600


class Session:
    def __init__(self, drops: list[int]):
        self.token = secrets.token_hex(8)
        self.audio = np.zeros(0, dtype=np.int64)  # accepted input samples
        self.used = 0  # samples turned into units
        self.outbox: list[dict] = []  # every unit made (the real server keeps a bounded outbox)
        self.sent = 0  # units sent on the current connection
        self.acked = 0  # the last ack: audio below it is accepted for good
        self.drops = drops  # input-sample points after which the connection is aborted
        self.ws = None

    def make_units(self, final: bool = False) -> None:
        while len(self.audio) - self.used >= BLOCK or (final and len(self.audio) > self.used):
            block = self.audio[self.used : self.used + BLOCK]
            seq = len(self.outbox)
            start = self.used // 320
            self.used += len(block)
            self.outbox.append({"type": "unit", "seq": seq, "unit": int(block.sum()) % 1000, "start_frame": start,
                                "end_frame": -(-self.used // 320), "start_s": start / 50, "end_s": self.used / 16000,
                                "commit_audio_s": len(self.audio) / 16000, "lag_s": 0.0, "logprob": None})


sessions: dict[str, Session] = {}
FORGET = False  # --forget: a dropped session is gone (resume_failed)


async def flush(s: Session, ws) -> None:
    while s.sent < len(s.outbox):
        await ws.send(json.dumps(s.outbox[s.sent]))
        s.sent += 1


async def serve_session(s: Session, ws) -> None:
    if s.ws is not None and s.ws is not ws:  # a newer connection takes the session over
        await s.ws.close(1000, "taken over")
    s.ws = ws
    async for data in ws:
        if isinstance(data, bytes):
            s.audio = np.concatenate([s.audio, np.frombuffer(data, "<i2").astype(np.int64)])
            s.make_units()
            if s.drops and len(s.audio) >= s.drops[0]:
                s.drops.pop(0)
                # Keep back some received audio (the client resends it from inside a frame), then drop abruptly
                # with units made but not sent.
                keep = max(s.used, s.acked, len(s.audio) // 1000 * 1000)
                s.audio = s.audio[:keep]
                if FORGET:  # as if the grace period had run out: the token is no longer known
                    sessions.pop(s.token, None)
                ws.transport.abort()
                return
            await flush(s, ws)
            s.acked = len(s.audio)
            await ws.send(json.dumps({"type": "ack", "samples": s.acked}))
        else:
            msg = json.loads(data)
            if msg["type"] == "end":
                s.make_units(final=True)
                await flush(s, ws)
                await ws.send(json.dumps({"type": "ack", "samples": len(s.audio)}))
                await ws.send(json.dumps({"type": "end", "reason": "end", "units": len(s.outbox),
                                          "num_frames": -(-len(s.audio) // 320), "audio_s": len(s.audio) / 16000,
                                          "stats": {}, "forced_commits": 0, "resynth": None}))
                await ws.close(1000)
                return


async def handler(ws, drops_fn) -> None:
    try:
        first = json.loads(await ws.recv())
        if first["type"] == "start":
            s = Session(drops_fn())
            sessions[s.token] = s
            await ws.send(json.dumps({"type": "ready", "session": s.token[:6], "settings": {"sample_rate": 16000},
                                      "limits": {}, "models": "fake", "random_weights": True, "server": "fake",
                                      "version": 2, "role": "sender", "listen_token": None,
                                      "resume_token": s.token, "resume_grace_s": 20}))
        elif first["type"] == "resume":
            s = sessions.get(first["token"])
            if s is None:
                await ws.send(json.dumps({"type": "error", "code": "resume_failed", "fatal": True,
                                          "message": "unknown or expired resume token", "retry_after_s": None}))
                await ws.close(1008)
                return
            await ws.send(json.dumps({"type": "resumed", "samples": len(s.audio), "next_seq": first["next_seq"]}))
            s.sent = first["next_seq"]  # replay what the client lacks
            await flush(s, ws)
        else:
            await ws.close(1008)
            return
        await serve_session(s, ws)
    except websockets.ConnectionClosed:
        pass


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--drops", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-sample", type=int, default=40000, help="drop points fall below this input sample")
    p.add_argument("--forget", action="store_true", help="forget a session when its connection drops")
    args = p.parse_args()
    global FORGET
    FORGET = args.forget
    rng = random.Random(args.seed)

    def drops() -> list[int]:
        return sorted(rng.sample(range(BLOCK, args.max_sample), args.drops))

    async with websockets.serve(lambda ws: handler(ws, drops), "127.0.0.1", 0, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        print(f"fake resume server at ws://127.0.0.1:{port}/v1/stream", flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(main())
