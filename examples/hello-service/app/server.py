"""A small HTTP service used as the example application: it answers its version and a health check."""

import http.server
import json
import os
import sys
from pathlib import Path

from packaging.version import Version

HERE = Path(__file__).resolve().parent
VERSION = (HERE / "version.txt").read_text().strip()


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/health":
            self._send(200, {"status": "ok"})
        elif self.path == "/":
            self._send(200, {"service": "hello-service", "version": str(Version(VERSION))})
        else:
            self._send(404, {"error": "not found"})

    def _send(self, status, body):
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format, *args):
        sys.stderr.write("hello-service: " + (format % args) + "\n")


def main():
    port = int(os.environ.get("HELLO_PORT", "8000"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.serve_forever()


if __name__ == "__main__":
    main()
