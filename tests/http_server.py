"""A real HTTP server on 127.0.0.1 for the download tests: it answers like the Hugging Face hub."""

import hashlib
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Hub:
    """
    /<repo>/resolve/main/<name>: a 302 to /cdn/<name> carrying X-Linked-Etag (sha256) and
    X-Linked-Size, as the hub does for large files; small files (`small`) are answered directly.
    /cdn/<name> honours Range. `drop_next` makes the next CDN answer stop half-way and hang up.
    `sha_override` publishes a wrong sha256; `cdn` (another server's URL) sends those redirects there.
    Every request is logged as (method, path, Range, Authorization). `pages` maps other paths
    straight to bodies (200), counting the bytes sent; `redirects` maps paths to a URL (302).
    `headers` replaces or adds headers of the answers to /resolve/ (e.g. a bad X-Linked-Size);
    `ignore_range` answers every request with the whole file, as some servers do.
    `hold[path] = n` sends only the first n bytes of that page, then waits for the client to hang up
    before sending the rest: `hung_up` is set if the client closed the connection there, `sent_all`
    if it kept listening and got the whole body. What happened does not depend on socket buffers.
    """

    def __init__(self):
        self.files, self.small, self.log, self.pages, self.redirects, self.headers = {}, set(), [], {}, {}, {}
        self.cdn = ""
        self.ignore_range = False
        self.drop_next = 0
        self.sha_override = None
        self.bytes_sent = 0
        self.hold = {}
        self.hung_up, self.sent_all = threading.Event(), threading.Event()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.answer(body=False)

            def do_GET(self):
                self.answer(body=True)

            def answer(self, body):
                hub.log.append((self.command, self.path, self.headers.get("Range"), self.headers.get("Authorization")))
                if self.path in hub.pages:
                    return self.send(hub.pages[self.path], body, hub.hold.get(self.path))
                if self.path in hub.redirects:
                    self.send_response(302)
                    self.send_header("Location", hub.redirects[self.path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                m = re.fullmatch(r"/(.+)/resolve/main/([^/]+)", self.path)
                if m and m.group(2) in hub.files and m.group(2) not in hub.small:
                    data = hub.files[m.group(2)]
                    self.send_response(302)
                    self.send_header("Location", f"{hub.cdn}/cdn/{m.group(2)}")
                    headers = {"X-Linked-Etag": f'"{hub.sha_override or hashlib.sha256(data).hexdigest()}"',
                               "X-Linked-Size": str(len(data)), "Content-Length": "0"} | hub.headers
                    for key, value in headers.items():
                        self.send_header(key, value)
                    self.end_headers()
                    return
                name = m.group(2) if m else self.path.removeprefix("/cdn/")
                if name not in hub.files or (not m and not self.path.startswith("/cdn/")):
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send(hub.files[name], body)

            def send(self, data, body, hold=None):
                start = 0
                r = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if r and not hub.ignore_range:
                    start = int(r.group(1))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if not body:
                    return
                part = data[start:]
                if hub.drop_next > 0:
                    hub.drop_next -= 1
                    part = part[: len(part) // 2]
                    self.close_connection = True
                try:
                    if hold is not None:
                        self.write(part[:hold])
                        self.wfile.flush()
                        if not self.connection.recv(1):  # blocks until the client hangs up (or writes)
                            hub.hung_up.set()
                            self.close_connection = True
                            return
                        part = part[hold:]
                    self.write(part)
                    if hold is not None:
                        hub.sent_all.set()
                except (BrokenPipeError, ConnectionResetError):
                    hub.hung_up.set()
                    self.close_connection = True

            def write(self, part):
                for i in range(0, len(part), 1 << 16):
                    self.wfile.write(part[i:i + (1 << 16)])
                    hub.bytes_sent += len(part[i:i + (1 << 16)])

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
