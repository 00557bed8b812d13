"""Image loading from URLs: http(s) with a timeout and a byte cap, data: URLs, refused schemes."""

import base64
import http.server
import io
import threading

import pytest
from PIL import Image

from mm1_mlx.images import ImageError, fetch_image_bytes, load_image


def _png(w=8, h=6, color=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server():
    """A local HTTP server: /ok.png, /big (over any small cap), /redirect-file, /missing."""
    png = _png()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/ok.png":
                body = png
            elif self.path == "/big":
                body = b"\0" * 200_000
            elif self.path == "/redirect-file":
                self.send_response(302)
                self.send_header("Location", "file:///etc/passwd")
                self.end_headers()
                return
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_http_image_is_fetched_and_decoded(server):
    img = load_image(f"{server}/ok.png")
    assert img.size == (8, 6) and img.getpixel((3, 3)) == (200, 10, 10)


def test_data_url_equals_the_file():
    url = "data:image/png;base64," + base64.b64encode(_png(color=(1, 2, 3))).decode()
    assert load_image(url).getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.parametrize("url, message", [
    ("{s}/big", "over the limit"),
    ("{s}/missing", "HTTP 404"),
    ("{s}/redirect-file", "HTTP 302"),  # urllib refuses the file: target
    ("ftp://example.invalid/x.png", "only http(s)"),
    ("data:image/png;base64,@@@@", "not valid base64"),
    ("data:text/html;base64,AAAA", "data:image/"),
])
def test_bad_urls_are_one_clear_error(server, url, message):
    with pytest.raises(ImageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fetch_image_bytes(url.format(s=server), max_bytes=100_000)


def test_unreachable_host_times_out_quickly():
    # a port nothing listens on: refused at once, never a hang
    with pytest.raises(ImageError, match="could not fetch"):
        fetch_image_bytes("http://127.0.0.1:9/x.png", timeout=2)
