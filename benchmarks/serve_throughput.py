"""What batching buys `cifarcnn serve`: requests per second and latency under load.

    python benchmarks/serve_throughput.py [--weights paper-cnn fast] [--clients 1 4 16]
        [--max-batch 1 64] [--max-wait-ms 0 2 5] [--requests 400]

For each weights x max-batch it starts `cifarcnn serve --port 0` as its own
process (as a user would run it), then for each client count sends
`--requests` POST /predict requests of a 32x32 PNG from that many threads at
once, each sending its next request when the last is answered. Prints a table
of requests per second, median and 95th-percentile latency, and the mean
batch the server formed (from GET /health). `--max-batch 1` is the server
without batching: one forward pass per request.
"""

from __future__ import annotations

import argparse
import http.client
import io
import itertools
import json
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image


def png(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    img = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def post(port: int, body: bytes) -> float:
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/predict", body=body)
    r = conn.getresponse()
    r.read()
    conn.close()
    if r.status != 200:
        raise SystemExit(f"the server answered {r.status}")
    return time.perf_counter() - t0


def health(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/health")
    out = json.loads(conn.getresponse().read())
    conn.close()
    return out


def measure(port: int, clients: int, requests: int, body: bytes) -> dict:
    for _ in range(3):  # warm-up: the first forward passes allocate
        post(port, body)
    before = health(port)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        lat = sorted(pool.map(lambda _: post(port, body), range(requests)))
    wall = time.perf_counter() - t0
    after = health(port)
    batches = after["batches"] - before["batches"]
    return {"rps": requests / wall, "p50": statistics.median(lat) * 1e3,
            "p95": lat[int(0.95 * (len(lat) - 1))] * 1e3,
            "batch": (after["images"] - before["images"]) / max(1, batches)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", nargs="+", default=["paper-cnn"])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--max-batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--max-wait-ms", type=float, nargs="+", default=[2.0],
                    help="the server's default is 2")
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    body = png()
    print("| weights | max batch | wait ms | clients | requests/s | median ms | p95 ms "
          "| mean batch |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for weights in a.weights:
        for mb, wait in itertools.product(a.max_batch, a.max_wait_ms):
            if mb == 1 and wait != a.max_wait_ms[0]:
                continue  # without batching the wait does nothing
            proc = subprocess.Popen(
                [sys.executable, "-u", "-m", "cifarcnn", "serve", "--weights", weights,
                 "--port", "0", "--max-batch", str(mb), "--max-wait-ms", str(wait),
                 "--device", a.device], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True)
            try:
                line = proc.stdout.readline()
                found = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
                if not found:
                    proc.kill()
                    raise SystemExit(f"cifarcnn serve did not start: {proc.stderr.read()}")
                port = int(found.group(1))
                for c in a.clients:
                    r = measure(port, c, a.requests, body)
                    print(f"| {weights} | {mb} | {wait:g} | {c} | {r['rps']:.1f} | "
                          f"{r['p50']:.1f} | {r['p95']:.1f} | {r['batch']:.1f} |", flush=True)
            finally:
                proc.terminate()
                proc.wait()


if __name__ == "__main__":
    main()
