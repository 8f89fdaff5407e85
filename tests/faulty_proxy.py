"""A fault-injecting HTTP proxy for storage tests, run as its own process:

    python tests/faulty_proxy.py --target http://127.0.0.1:9000 --port 9100 --fail-every 4

Requests are forwarded to the target, except that every n-th one fails *before* it reaches
the target, alternating between a 503 SlowDown answer, a dropped connection and a slow
(1 s) 500: the faults a busy object store shows, in a form that is always safe to retry.
Counts of forwarded and failed requests are printed on SIGTERM/exit as one JSON line.
"""
from __future__ import annotations

import argparse
import http.client
import json
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message></Error>")


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.seen = self.forwarded = 0
        self.faults = {"slowdown": 0, "reset": 0, "slow_error": 0}


def make_handler(target: str, fail_every: int, stats: Stats):
    host = urlparse(target)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return out
                    out += self.rfile.read(size)
                    self.rfile.readline()
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _handle(self):
            body = self._body()
            with stats.lock:
                stats.seen += 1
                k = stats.seen
            if fail_every and k % fail_every == 0:
                kind = ("slowdown", "reset", "slow_error")[(k // fail_every) % 3]
                with stats.lock:
                    stats.faults[kind] += 1
                if kind == "reset":
                    self.close_connection = True
                    self.connection.close()
                    return
                if kind == "slow_error":
                    time.sleep(1.0)
                self._reply(503 if kind == "slowdown" else 500, SLOWDOWN, {"Content-Type": "application/xml"})
                return
            conn = http.client.HTTPConnection(host.hostname, host.port, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
            headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            with stats.lock:
                stats.forwarded += 1
            self._reply(resp.status, data, {k: v for k, v in resp.getheaders()
                                             if k.lower() not in HOP and k.lower() != "content-length"},
                        head=self.command == "HEAD", length=resp.getheader("Content-Length"))
            conn.close()

        def _reply(self, status, data, headers, head=False, length=None):
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", length if head and length is not None else str(len(data)))
            self.end_headers()
            if not head:
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    return Handler


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--fail-every", type=int, default=4)
    args = ap.parse_args()
    stats = Stats()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(args.target, args.fail_every, stats))
    server.daemon_threads = True

    def stop(*_):
        print(json.dumps({"seen": stats.seen, "forwarded": stats.forwarded, "faults": stats.faults}), flush=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    finally:
        stop()


if __name__ == "__main__":
    main()
