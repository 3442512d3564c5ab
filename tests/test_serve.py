import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from formats import png_bytes

import cifarcnn
from cifarcnn.cli import main
from cifarcnn.datasets import decode_image
from cifarcnn.errors import CifarError
from cifarcnn.serve import MAX_BODY, MAX_FILES, Batcher, make_server


@pytest.fixture(scope="module")
def clf():
    return cifarcnn.load("paper-cnn", device="cpu")


@pytest.fixture
def server(clf):
    srv = make_server(clf, port=0, top=2)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def request(srv, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def images(n, seed=0):
    """PNG files of assorted sizes, as a client would send photos."""
    rng = np.random.default_rng(seed)
    return [png_bytes(rng.integers(0, 256, (int(rng.integers(20, 80)), 40, 3), dtype=np.uint8))
            for _ in range(n)]


def test_served_answers_equal_the_classifier_alone_and_under_concurrent_load(server, clf):
    files = images(12)
    expect = clf.predict(np.stack([decode_image(f, "x") for f in files]))
    status, one = request(server, "POST", "/predict", files[0])
    assert status == 200
    np.testing.assert_allclose([one["probabilities"][c] for c in clf.classes], expect[0],
                               atol=2e-3)
    assert [t["class"] for t in one["top"]] == [clf.classes[i] for i in
                                                np.argsort(expect[0])[::-1][:2]]
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda f: request(server, "POST", "/predict", f), files))
    for (status, a), p in zip(answers, expect, strict=True):
        assert status == 200
        np.testing.assert_allclose([a["probabilities"][c] for c in clf.classes], p, atol=2e-3)
    status, health = request(server, "GET", "/health")
    assert status == 200 and health["model"] == "paper-cnn" and health["tta"] == "flip"
    assert health["temperature"] == 1.0  # paper-cnn is not calibrated
    assert health["requests"] == health["images"] == 13 and 1 <= health["batches"] <= 13


def test_batcher_runs_every_waiting_image_in_one_batch(clf):
    batcher = Batcher(clf, max_batch=4, max_wait=0.01, start=False)
    x = np.stack([decode_image(f, "x") for f in images(6, seed=1)])
    futures = [batcher.submit(im) for im in x]
    batcher.start()
    got = np.stack([f.result(timeout=60) for f in futures])
    batcher.stop()
    assert (batcher.images, batcher.batches) == (6, 2)  # 4 waiting, then the other 2
    np.testing.assert_allclose(got, clf.predict(x), atol=2e-3)


def test_batcher_waits_only_while_another_request_is_arriving(clf):
    x = np.stack([decode_image(f, "x") for f in images(3, seed=2)])
    batcher = Batcher(clf, max_batch=8, max_wait=60.0)
    with batcher.arriving():  # a second request is being read: the first waits for it
        first = batcher.submit(x[0])
        time.sleep(0.3)
        assert not first.done()
        second = batcher.submit(x[1])
    first.result(timeout=60)
    second.result(timeout=60)
    assert (batcher.images, batcher.batches) == (2, 1)
    # nothing else arriving: a lone request runs at once, not after the 60 s wait
    batcher.submit(x[2]).result(timeout=20)
    assert (batcher.images, batcher.batches) == (3, 2)
    batcher.stop()


def test_bad_requests_get_one_clear_error_and_the_server_goes_on(server):
    status, r = request(server, "POST", "/predict", b"not an image at all")
    assert status == 400 and "not a readable image" in r["error"] and "PNG" in r["error"]
    status, r = request(server, "GET", "/nope")
    assert status == 404 and "/predict" in r["error"]
    status, r = request(server, "POST", "/health", b"x")
    assert status == 404
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    conn.putrequest("POST", "/predict")
    conn.putheader("Content-Length", str(MAX_BODY + 1))
    conn.endheaders()  # the body never comes: the size alone is refused
    r = conn.getresponse()
    assert r.status == 413 and "at most" in json.loads(r.read())["error"]
    conn.close()
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    conn.putrequest("POST", "/predict")
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 411
    conn.close()
    status, _ = request(server, "POST", "/predict", images(1)[0])
    assert status == 200


def form(*fields, boundary="----cifarcnn7MA4YWxk"):
    """A multipart/form-data body as curl -F builds it: (name, filename or None, bytes)."""
    parts = []
    for name, filename, data in fields:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename
                                                      else "")
        parts.append((f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
                      "Content-Type: application/octet-stream\r\n\r\n").encode() + data
                     + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_a_form_upload_answers_each_file_in_order_and_top_is_per_request(server, clf):
    files = images(3, seed=4)
    expect = clf.predict(np.stack([decode_image(f, "x") for f in files]))
    status, r = request(server, "POST", "/predict?top=1",
                        *form(*[("file", f"photo {i}.png", f) for i, f in enumerate(files)]))
    assert status == 200
    assert [a["file"] for a in r["predictions"]] == ["photo 0.png", "photo 1.png", "photo 2.png"]
    for a, p in zip(r["predictions"], expect, strict=True):
        np.testing.assert_allclose([a["probabilities"][c] for c in clf.classes], p, atol=2e-3)
        assert [t["class"] for t in a["top"]] == [clf.classes[int(np.argmax(p))]]
    status, r = request(server, "POST", "/predict?top=5", files[0])  # the server's is 2
    assert status == 200 and len(r["top"]) == 5 and "predictions" not in r
    status, health = request(server, "GET", "/health")
    assert (health["requests"], health["images"]) == (2, 4)


def test_bad_forms_and_queries_get_a_400_that_says_what_to_send(server):
    png = images(1, seed=5)[0]
    for (body, headers), words, hint in [
            (form(("file", None, b"photo.jpg")), "form field 'file' is not a file", "-F file=@"),
            (form(("file", "notes.txt", b"hello")), "form file 'notes.txt': not a readable",
             "image files only"),
            (form(), "no parts to read", "-F file=@"),
            ((png, {"Content-Type": "multipart/form-data"}), "no parts to read", "-F file=@"),
            (form(*[("f", "a.png", png)] * (MAX_FILES + 1)), f"at most {MAX_FILES:,} images",
             "further requests")]:
        status, r = request(server, "POST", "/predict", body, headers)
        assert status == 400 and words in r["error"] and hint in r["error"], r
    for query, words in [("top=0", "?top=0: give a whole number from 1 to 10"),
                         ("top=11", "from 1 to 10"), ("top=x", "?top=x"),
                         ("top=%C2%B2", "?top=\u00b2"),  # a superscript 2: a digit, not a number
                         ("tpo=3", "unknown query parameter 'tpo'")]:
        status, r = request(server, "POST", f"/predict?{query}", png)
        assert status == 400 and words in r["error"], r
    assert request(server, "POST", "/predict", *form(("f", "a.png", png)))[0] == 200


def test_a_form_of_too_many_parts_is_refused_before_it_is_parsed(monkeypatch):
    """Parsing 10^5 empty parts took 16.5 s; counting the boundaries takes milliseconds."""
    import email.parser

    from cifarcnn.serve import BadRequest, form_files

    body, headers = form(*[("f", "a.png", b"")] * 100_000)

    def refuse(*args, **kwargs):
        raise AssertionError("the body was parsed")

    monkeypatch.setattr(email.parser.BytesParser, "parsebytes", refuse)
    with pytest.raises(BadRequest, match="a form of 100,000 fields; at most 1,024"):
        form_files(headers["Content-Type"], body)
    with pytest.raises(AssertionError, match="was parsed"):  # a small form is parsed
        form_files(headers["Content-Type"], form(("f", "a.png", b""))[0])


# runs the page's own script in node against the live server, with just enough of a DOM
HARNESS = """
const [base, script, ...pngs] = process.argv.slice(2);
function node(tag) {
  return {tag, children: [], classList: {add() {}, remove() {}}, style: {}, text: "",
          set textContent(v) { this.text = v; this.children = []; },
          get textContent() { return this.text + this.children.map(c => c.textContent).join(""); },
          append(...c) { this.children.push(...c); }, replaceChildren(...c) { this.children = c; }};
}
const ids = {};
globalThis.document = {getElementById: id => ids[id] ??= node(id), createElement: node};
let pending;
globalThis.fetch = ((real) => (url, opts) => (pending = real(base + url, opts)))(fetch);
eval(require("fs").readFileSync(script, "utf8"));
const File = globalThis.File ?? require("buffer").File;
const files = pngs.map((f, i) => new File([require("fs").readFileSync(f)], `photo ${i}.png`));
ids.files.onchange({target: {files}});
pending.then(() => new Promise(r => setTimeout(r, 50))).then(() => {
  console.log(JSON.stringify(ids.out.children.map(row => ({
    lines: row.children[1].children.map(c => c.textContent), img: row.children[0].src,
    bars: row.children[1].children.slice(1).map(c => c.children[0].style.width)}))));
});
"""


def node_major() -> int:
    """node's major version, 0 without node: the harness needs fetch, FormData and File,
    global from node 18 (File through the buffer module there)."""
    if shutil.which("node") is None:
        return 0
    r = subprocess.run(["node", "--version"], capture_output=True, text=True, timeout=60)
    return int(re.match(r"v(\d+)", r.stdout).group(1)) if r.returncode == 0 else 0


@pytest.mark.skipif(node_major() < 18, reason="needs node 18 or later to run the page's script")
def test_the_browser_page_classifies_the_chosen_files_through_predict(server, clf, tmp_path):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    conn.request("GET", "/")
    r = conn.getresponse()
    page = r.read().decode()
    conn.close()
    assert r.status == 200 and r.getheader("Content-Type") == "text/html; charset=utf-8"
    assert "<title>cifarcnn: paper-cnn</title>" in page and "TTA flip" in page
    (tmp_path / "page.js").write_text(page.split("<script>")[1].split("</script>")[0])
    (tmp_path / "harness.js").write_text(HARNESS)
    files = images(2, seed=6)
    for i, f in enumerate(files):
        (tmp_path / f"{i}.png").write_bytes(f)
    host, port = server.server_address[:2]
    base = f"http://{host}:{port}/"
    out = subprocess.run(["node", str(tmp_path / "harness.js"), base, str(tmp_path / "page.js"),
                          str(tmp_path / "0.png"), str(tmp_path / "1.png")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    expect = clf.predict(np.stack([decode_image(f, "x") for f in files]))
    assert [row["lines"][0] for row in rows] == ["photo 0.png", "photo 1.png"]
    for row, p in zip(rows, expect, strict=True):
        top = np.argsort(p)[::-1][:2]  # the server's --top 2
        assert [line.split()[0] for line in row["lines"][1:]] == [clf.classes[i] for i in top]
        shown = [float(line.split()[1].rstrip("%")) for line in row["lines"][1:]]
        np.testing.assert_allclose(shown, 100 * p[top], atol=0.2)
        assert row["img"].startswith("blob:") and all(b.endswith("em") for b in row["bars"])


def test_keep_alive_and_stalled_clients(clf, capfd):
    """Two requests on one connection; a client that stops mid-body is cut off after the
    timeout without a traceback, and the server goes on."""
    srv = make_server(clf, port=0, timeout=2.0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=60)
        for f in images(2, seed=3):
            conn.request("POST", "/predict", body=f)
            r = conn.getresponse()
            assert r.status == 200 and json.loads(r.read())["top"]
        conn.close()
        with socket.create_connection(srv.server_address[:2], timeout=30) as s:
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
                      + b"x" * 10)
            t0 = time.monotonic()
            assert s.recv(100) == b""  # closed by the server, not answered
            assert time.monotonic() - t0 < 20
        assert request(srv, "POST", "/predict", images(1)[0])[0] == 200
    finally:
        srv.shutdown()
        srv.server_close()
    assert "Traceback" not in capfd.readouterr().err


def test_a_failing_model_answers_500_to_each_waiting_request(clf):
    class Broken:
        classes, meta, path, tta = clf.classes, clf.meta, clf.path, clf.tta
        def __init__(self):
            self.failures = ["out of memory", "short"]

        def predict(self, x):
            if not self.failures:
                return clf.predict(x)
            if self.failures.pop(0) == "short":
                return clf.predict(x)[:0]  # no answers at all
            raise RuntimeError("out of memory")

    srv = make_server(Broken(), port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        status, r = request(srv, "POST", "/predict", images(1)[0])
        assert status == 500 and "out of memory" in r["error"]
        status, r = request(srv, "POST", "/predict", images(1)[0])
        assert status == 500 and "0 answers for 1 images" in r["error"]
        assert request(srv, "POST", "/predict", images(1)[0])[0] == 200  # the worker lives
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_taken_port_and_bad_flags_are_one_line_errors(clf, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(CifarError, match=f"cannot listen on 127.0.0.1:{port}"):
            make_server(clf, port=port)
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "choose another --port" in err[0]
    with pytest.raises(CifarError, match="--top 0"):
        make_server(clf, port=0, top=0)
    assert main(["serve", "--port", "70000"]) == 2
    assert main(["serve", "--max-batch", "0", "--port", "0"]) == 2
    assert "--max-batch 0" in capsys.readouterr().err


def test_cli_serves_until_sigterm(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cifarcnn", "serve", "--weights", "paper-cnn",
                             "--port", "0", "--no-tta"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/", line).group(1))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/predict", body=images(1)[0])
        r = conn.getresponse()
        assert r.status == 200 and len(json.loads(r.read())["top"]) == 3
        conn.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "stopped" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


def test_throughput_benchmark_prints_a_row_per_setting():
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_throughput.py"
    r = subprocess.run([sys.executable, str(bench), "--weights", "paper-cnn", "--requests", "12",
                        "--clients", "1", "3", "--max-batch", "1", "8", "--max-wait-ms", "0", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [line.split("|")[1:-1] for line in r.stdout.splitlines()
            if line.startswith("| paper-cnn")]
    # max batch 1 once (its wait changes nothing), 8 at each wait; each at 1 and 3 clients
    assert [(b.strip(), w.strip(), c.strip()) for _, b, w, c, *_ in rows] == [
        ("1", "0", "1"), ("1", "0", "3"), ("8", "0", "1"), ("8", "0", "3"),
        ("8", "2", "1"), ("8", "2", "3")]
    for row in rows:
        assert float(row[4]) > 0 and float(row[7]) >= 1.0


def test_an_ipv6_address_serves(clf):
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    srv = make_server(clf, host="::1", port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        conn = http.client.HTTPConnection("::1", srv.server_address[1], timeout=60)
        conn.request("GET", "/health")
        assert json.loads(conn.getresponse().read())["model"] == "paper-cnn"
        conn.close()
    finally:
        srv.shutdown()
        srv.server_close()
