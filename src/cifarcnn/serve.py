"""`cifarcnn serve`: a loaded classifier behind HTTP, with the standard library's server.

    POST /predict   body: one image file's bytes (any size and format PIL reads, as
                    `predict` takes) -> {"top": [{"class", "probability"}, ...],
                    "probabilities": {class: p, ...}}
                    or a multipart/form-data upload of one or more files (what
                    `curl -F file=@photo.jpg` and browsers' forms send) ->
                    {"predictions": [{"file", "top", "probabilities"}, ...]}
                    in the form's order; `?top=K` overrides the server's --top
    GET  /health    the model, its weights, TTA, precision, and the requests answered,
                    images classified and batches run so far
    GET  /          a page to classify images from a browser (through /predict)

Requests are handled on threads, but the model runs on one worker that takes
every image waiting (up to `max_batch`) as one batch: a forward pass of 32
images costs little more than one of a single image, so under concurrent load
the server answers many requests for the price of one
(`benchmarks/serve_throughput.py` measures it). While other requests are
still arriving (their bodies being read or decoded) the worker waits up to
`max_wait` seconds for them to join the batch; when none is, it runs at once,
so a lone client pays no wait.
A bad request gets a JSON {"error": ...} with a 4xx status and changes nothing.
"""

from __future__ import annotations

import email.message
import email.parser
import email.policy
import html
import json
import queue
import socket
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

from .datasets import decode_image
from .errors import CifarError
from .inference import check_top, top_classes

MAX_BODY = 32 * 1024 * 1024  # bytes: far above any photo, far below what hurts the server
MAX_FILES = 1024  # per form: a body of tiny images could otherwise queue ~10^5 of them
FORM_HINT = "send images as file fields: curl -F file=@photo.jpg [-F file=@other.png]"


class BadRequest(CifarError):
    """What the client sent is wrong: a 400 with this message, and the server goes on."""


def too_many(fields: int) -> BadRequest:
    return BadRequest(f"a form of {fields:,} fields; at most {MAX_FILES:,} images per "
                      "request, please (send the rest in further requests)")


def form_files(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    """The (filename, bytes) of each file in a multipart/form-data body, in order.

    The standard library's email parser reads the MIME structure (the `cgi`
    module that once did is gone from Python 3.13). A field that is not a file
    is refused rather than ignored: a client that sent `-F file=photo.jpg`
    (the name, without the @) should hear that no image came.
    """
    header = email.message.Message()
    header["Content-Type"] = content_type
    boundary = header.get_boundary()
    # Counted before parsing, too: the parser took 16.5 s for a 6.6 MB body of 10^5 empty
    # parts, time a hostile client could hold the server for. A boundary cannot occur
    # inside the parts, so each occurrence opens one, and the last closes the form.
    fields = body.count(b"--" + boundary.encode("latin-1")) - 1 if boundary else 0
    if fields > MAX_FILES:
        raise too_many(fields)
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not msg.is_multipart():
        why = type(msg.defects[0]).__name__ if msg.defects else "no parts"
        raise BadRequest(f"a multipart/form-data body with no parts to read ({why}); "
                         + FORM_HINT)
    parts = list(msg.iter_parts())
    if len(parts) > MAX_FILES:  # a form without its closing boundary counts one short
        raise too_many(len(parts))
    files = []
    for i, part in enumerate(parts):
        name = part.get_param("name", header="content-disposition") or f"#{i + 1}"
        filename = part.get_filename()
        if filename is None:
            raise BadRequest(f"form field {name!r} is not a file; {FORM_HINT}")
        # a form whose file input was left empty sends filename="" and no bytes
        files.append((filename or name, part.get_payload(decode=True) or b""))
    return files


# GET / in a browser: choose or drop images, see each one's top classes. Plain HTML and a
# few lines of script that post the files as a form, as curl -F does; nothing is fetched
# from elsewhere, so it works on a machine with no internet.
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cifarcnn: {model}</title>
<style>
body {{ font: 15px system-ui, sans-serif; max-width: 46em; margin: 2em auto; padding: 0 1em; }}
#drop {{ border: 2px dashed #999; border-radius: 8px; padding: 2em; text-align: center; }}
#drop.over {{ background: #eef; }}
.row {{ display: flex; gap: 1em; align-items: center; margin: .8em 0; }}
.row img {{ width: 64px; height: 64px; object-fit: cover; image-rendering: pixelated; }}
.bar {{ background: #4a7; height: .6em; display: inline-block; vertical-align: middle; }}
.err {{ color: #b00; }}
</style></head><body>
<h1>cifarcnn</h1>
<p>{model} ({weights}), TTA {tta}. Classes: {classes}.</p>
<div id="drop"><p>Drop images here, or</p>
<input type="file" id="files" accept="image/*" multiple></div>
<div id="out"></div>
<script>
const out = document.getElementById("out"), drop = document.getElementById("drop");
function fail(message) {{
  const p = document.createElement("p"); p.className = "err"; p.textContent = message;
  out.replaceChildren(p);
}}
function classify(files) {{
  if (!files.length) return;
  const form = new FormData();
  for (const f of files) form.append("file", f, f.name);
  out.textContent = "classifying " + files.length + " image(s)...";
  fetch("predict?top={top}", {{method: "POST", body: form}})
    .then(r => r.json()).then(r => {{
      out.textContent = "";
      if (r.error) return fail(r.error);
      r.predictions.forEach((p, i) => {{
        const row = document.createElement("div"); row.className = "row";
        const img = document.createElement("img"); img.src = URL.createObjectURL(files[i]);
        const text = document.createElement("div"), name = document.createElement("b");
        name.textContent = p.file;  // text, never markup: names come from the client
        text.append(name);
        for (const t of p.top) {{
          const line = document.createElement("div"), bar = document.createElement("span");
          const label = document.createElement("span");
          bar.className = "bar"; bar.style.width = (8 * t.probability) + "em";
          label.textContent = " " + t.class + " " + (100 * t.probability).toFixed(1) + "%";
          line.append(bar, label); text.append(line);
        }}
        row.append(img, text); out.append(row);
      }});
    }}).catch(e => fail(String(e)));
}}
document.getElementById("files").onchange = e => classify([...e.target.files]);
drop.ondragover = e => {{ e.preventDefault(); drop.classList.add("over"); }};
drop.ondragleave = () => drop.classList.remove("over");
drop.ondrop = e => {{ e.preventDefault(); drop.classList.remove("over");
                      classify([...e.dataTransfer.files]); }};
</script></body></html>
"""


def query_top(query: str, default: int, classes: int) -> int:
    """`top` from a request's query string (?top=5), else the server's own."""
    params = parse_qs(query, keep_blank_values=True)
    unknown = sorted(set(params) - {"top"})
    if unknown:
        raise BadRequest(f"unknown query parameter {unknown[0]!r}; the one there is: ?top=K")
    if "top" not in params:
        return default
    value = params["top"][-1]
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= classes:
        raise BadRequest(f"?top={value}: give a whole number from 1 to {classes}")
    return int(value)


class Batcher:
    """Collects images from many threads and classifies them in batches on one thread."""

    def __init__(self, classifier: Any, max_batch: int = 64, max_wait: float = 0.002,
                 start: bool = True) -> None:
        if max_batch < 1 or max_wait < 0:
            raise CifarError(f"--max-batch {max_batch} / --max-wait-ms {max_wait * 1000:g}: "
                             "give a batch of at least 1 and a wait of at least 0 ms")
        self.classifier = classifier
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.images = 0  # classified so far; a form's files count one each
        self.batches = 0
        self._arriving = 0  # requests being read or decoded: worth waiting for
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[np.ndarray, Future] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="cifarcnn-batcher", daemon=True)
        if start:
            self.start()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join()

    @contextmanager
    def arriving(self) -> Iterator[None]:
        """Around reading and decoding a request: tells the worker one more image is on
        its way, so a batch about to run waits for it (up to max_wait)."""
        with self._lock:
            self._arriving += 1
        try:
            yield
        finally:
            with self._lock:
                self._arriving -= 1

    def submit(self, image: np.ndarray) -> Future:
        """Queue one (32, 32, 3) uint8 image; the future gets its probabilities (C,)."""
        fut: Future = Future()
        self._queue.put((image, fut))
        return fut

    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    left = deadline - time.monotonic()
                    if self._arriving == 0 or left <= 0:
                        break
                    try:
                        item = self._queue.get(timeout=min(left, 0.0005))
                    except queue.Empty:
                        continue
                if item is None:  # stop after answering what was already asked
                    self._queue.put(None)
                    break
                batch.append(item)
            self._run(batch)

    def _run(self, batch: list[tuple[np.ndarray, Future]]) -> None:
        try:
            probs = self.classifier.predict(np.stack([image for image, _ in batch]))
            if len(probs) != len(batch):
                raise RuntimeError(f"{len(probs)} answers for {len(batch)} images")
        except Exception as e:  # every waiting request must hear of it; the worker goes on
            for _, fut in batch:
                fut.set_exception(e)
            return
        self.images += len(batch)
        self.batches += 1
        for (_, fut), p in zip(batch, probs, strict=True):
            fut.set_result(p)


def make_server(classifier: Any, host: str = "127.0.0.1", port: int = 8000, top: int = 3,
                max_batch: int = 64, max_wait: float = 0.002,
                timeout: float = 30.0) -> ThreadingHTTPServer:
    """An HTTP server for `classifier` (not yet serving: call serve_forever()).

    port 0 picks a free one (server.server_address says which). Connections are
    HTTP/1.1 keep-alive; one silent for `timeout` seconds, mid-request or idle, is
    closed, so stalled clients cannot hold threads for ever. server_close() also
    stops the batcher.
    """
    classes = list(classifier.classes)
    check_top(top)  # before the batcher starts
    batcher = Batcher(classifier, max_batch, max_wait)
    info = {"model": classifier.meta.get("model"), "weights": str(classifier.path),
            "classes": classes, "tta": classifier.tta,
            "tta_gate": getattr(classifier, "tta_gate", None),
            "temperature": getattr(classifier, "temperature", 1.0),  # cifarcnn calibrate's
            "precision": getattr(classifier, "precision", None),
            "device": getattr(classifier, "device", "cpu")}
    answered, lock = [0], threading.Lock()  # /predict requests answered with a 200
    page = PAGE.format(**{k: html.escape(str(v)) for k, v in (
        ("model", info["model"]), ("weights", Path(info["weights"]).name), ("tta", info["tta"]),
        ("classes", ", ".join(classes)))}, top=top)

    class Handler(BaseHTTPRequestHandler):
        server_version = "cifarcnn"
        protocol_version = "HTTP/1.1"  # keep-alive: a client's next request skips a handshake

        def setup(self) -> None:
            self.timeout = timeout  # StreamRequestHandler applies it to the socket
            super().setup()

        def _reply(self, status: int, obj: dict[str, Any], close: bool = False) -> None:
            """`close`: the request's body was not read, so the connection cannot carry
            another request."""
            body = (json.dumps(obj) + "\n").encode()
            if close:
                self.close_connection = True
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # the name http.server calls
            path = urlsplit(self.path).path
            if path == "/health":
                self._reply(200, {**info, "requests": answered[0], "images": batcher.images,
                                  "batches": batcher.batches})
            elif path == "/":
                body = page.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self._reply(404, {"error": f"{self.path}: no such endpoint; POST an image "
                                           "to /predict, GET /health, or open / in a browser"})

        def do_POST(self) -> None:
            url = urlsplit(self.path)
            if url.path != "/predict":
                self._reply(404, {"error": f"{self.path}: no such endpoint; POST an image "
                                           "to /predict"}, close=True)
                return
            try:
                size = int(self.headers.get("Content-Length", ""))
            except ValueError:
                size = -1
            if size < 0:
                self._reply(411, {"error": "no Content-Length: send the image file as the "
                                           "body (curl --data-binary @photo.jpg)"}, close=True)
                return
            if size > MAX_BODY:
                self._reply(413, {"error": f"a body of {size:,} bytes; an image file of at "
                                           f"most {MAX_BODY:,} bytes, please"}, close=True)
                return
            with batcher.arriving():  # submitted inside: never counted out before queued
                data = self.rfile.read(size)  # a client silent for `timeout` s: TimeoutError
                if len(data) < size:  # the client closed the connection mid-body
                    self.close_connection = True
                    return
                form = self.headers.get_content_type() == "multipart/form-data"
                try:
                    k = query_top(url.query, top, len(classes))
                    if form:
                        named = form_files(self.headers["Content-Type"], data)
                        images = [decode_image(blob, f"form file {name!r}", hint="send "
                                               "image files only (PNG, JPEG, ...)")
                                  for name, blob in named]
                    else:
                        images = [decode_image(data, "the request body", hint="send one "
                                               "image file's bytes as the body (PNG, JPEG, "
                                               "...), or a form: curl -F file=@photo.jpg")]
                except CifarError as e:
                    self._reply(400, {"error": str(e)})
                    return
                futures = [batcher.submit(image) for image in images]
            try:
                probs = [future.result() for future in futures]
            except Exception as e:  # the model failed, not the request
                self._reply(500, {"error": f"the classifier failed: {e}"})
                return
            answers = [{"top": top_classes(p, classes, k),
                        "probabilities": {c: float(q) for c, q in zip(classes, p, strict=True)}}
                       for p in probs]
            with lock:
                answered[0] += 1
            if form:
                self._reply(200, {"predictions": [{"file": name, **a} for (name, _), a
                                                  in zip(named, answers, strict=True)]})
            else:
                self._reply(200, answers[0])

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per request would drown the terminal under load

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        # the listen backlog: at the default 5, a burst of clients had connections dropped
        # and retried by TCP a second later (a p95 latency of ~1.1 s at 16 clients)
        request_queue_size = 128

        def handle_error(self, request: Any, client_address: Any) -> None:
            """A client that stalls or hangs up is its own problem: no traceback for it."""
            err = sys.exc_info()[1]
            if not isinstance(err, (TimeoutError, ConnectionError)):
                print(f"cifarcnn serve: error: a request from {client_address[0]} failed: "
                      f"{type(err).__name__}: {err}", file=sys.stderr)

        def server_close(self) -> None:
            super().server_close()
            batcher.stop()

    if ":" in host:  # an IPv6 address such as ::1 or ::
        Server.address_family = socket.AF_INET6
    try:
        server = Server((host, port), Handler)
    except OSError as e:
        batcher.stop()
        raise CifarError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose "
                         "another --port or --host") from None
    server.batcher = batcher  # type: ignore[attr-defined]
    return server
