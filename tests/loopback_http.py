"""A loopback web server for image-URL tests: started and stopped by the test itself."""

from __future__ import annotations

import contextlib
import http.server
import threading
import time


@contextlib.contextmanager
def image_site(files: dict[str, bytes], delay_s: float = 0.0):
    """An HTTP server on 127.0.0.1: GET of a path in ``files`` answers its bytes as image/png after
    ``delay_s``; any other path is 404. Yields the base URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            time.sleep(delay_s)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
