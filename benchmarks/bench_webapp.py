"""Web UI speed through gradio_client on loopback, the way a user's request travels.

Starts `python app.py --checkpoint CKPT --port PORT` in its own process, and beside it the floor:
a do-nothing Gradio app (this file with --floor-server: the same upload component, queue, outputs
and reply, a function that returns a constant caption) in another. Then:
  (1) latency: one upload at a time (beam 3, the page's defaults) to the app and to the floor,
      alternating, --single requests each cycling through the example photos; medians, p90 and
      the difference app - floor: what captioning adds to what any Gradio app costs. The Python
      API alone on the same photos, in this process, is shown beside it;
  (2) load: --requests requests from --concurrency client threads (one Client each); every one
      must come back with a caption; latency median/p90 and throughput.
Targets: median (1) app - floor <= 40 ms on 2 cores (issue 10), app <= 300 ms (issue 5);
(2) 80 requests at concurrency 8, no error.

--decoders 3 serves an ensemble of three copies of the checkpoint (captioner.ensemble.ensemble_of,
written to a temporary file): what a 3-decoder model would cost (each step runs every decoder).

    .venv/bin/python benchmarks/bench_webapp.py [--checkpoint checkpoints/model.safetensors] [--decoders 3]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import gradio  # noqa: E402
import torch  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402

from captioner.api import Captioner, default_checkpoint  # noqa: E402
from captioner.ensemble import ensemble_of  # noqa: E402
from captioner.webapp import example_images  # noqa: E402

LATENCY_TARGET_MS = 300
SHARE_TARGET_MS = 40          # app - do-nothing app (issue 10)


def machine() -> str:
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{model}, {os.cpu_count()} cores | Python {platform.python_version()}, torch "
            f"{torch.__version__}, gradio {gradio.__version__} | load average: {load}")


def summary(seconds: list[float]) -> str:
    ms = sorted(1000 * s for s in seconds)
    p90 = ms[min(len(ms) - 1, round(0.9 * (len(ms) - 1)))]
    return f"median {statistics.median(ms):6.0f} ms   p90 {p90:6.0f} ms   (n={len(ms)})"


def start_server(command: list[str], port: int, what: str, timeout: float = 180.0
                 ) -> tuple[subprocess.Popen, Client]:
    """Run `command` (a Gradio app on `port`) in its own process; returns once it answers."""
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"{what} exited with status {server.returncode}:\n{server.stderr.read()}")
        try:
            return server, Client(f"http://127.0.0.1:{port}/", verbose=False)
        except Exception:   # not listening yet
            time.sleep(0.5)
    server.kill()
    raise SystemExit(f"{what} did not answer on port {port} within {timeout:.0f} s")


def floor_app():
    """The do-nothing app: the real page's upload, queue and outputs; the reply is a constant."""
    from captioner import webapp

    reply = ("a dog runs through the grass", [("a", "90%"), ("dog", "80%"), ("runs", "70%")],
             [["a dog runs through the grass", -5.0]])
    with gradio.Blocks(analytics_enabled=False) as app:
        image = gradio.Image(type="filepath", image_mode=None)
        controls = [gradio.Radio(list(webapp.METHODS), value="beam"), gradio.Slider(1, 10, value=3, step=1),
                    gradio.Slider(0.1, 2.0, value=1.0), gradio.Slider(0.05, 1.0, value=1.0),
                    gradio.Slider(1, 5, value=3, step=1)]
        outputs = [gradio.Textbox(), gradio.HighlightedText(color_map=webapp.CONFIDENCE_COLORS),
                   gradio.Dataframe(headers=["caption", "score"], datatype=["str", "number"])]
        button = gradio.Button("Caption")
        button.click(lambda *inputs: reply, [image, *controls], outputs, api_name="caption", preprocess=False)
    app.queue(default_concurrency_limit=webapp.DEFAULT_CONCURRENCY, max_size=webapp.QUEUE_SIZE)
    return app


def timed_caption(client: Client, photo: str) -> float:
    start = time.perf_counter()
    caption = client.predict(handle_file(photo), api_name="/caption")[0]
    elapsed = time.perf_counter() - start
    if not caption:
        raise RuntimeError(f"empty caption for {photo}")
    return elapsed


def api_latency(checkpoint: str, photos: list[str], repeats: int) -> list[float]:
    """The Python API alone, one image per call, with the server's thread setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        captioner = Captioner.load(checkpoint)
        captioner.caption(photos[0], method="beam", beam_size=3)      # warm-up
        times = []
        for i in range(repeats):
            start = time.perf_counter()
            captioner.caption(photos[i % len(photos)], method="beam", beam_size=3, n_best=3)
            times.append(time.perf_counter() - start)
        return times
    finally:
        torch.set_num_threads(threads)


def load_test(url: str, photos: list[str], requests: int, concurrency: int
              ) -> tuple[list[float], list[str], float]:
    clients = [Client(url, verbose=False) for _ in range(concurrency)]
    errors: list[str] = []

    def worker(index: int) -> float | None:
        try:
            return timed_caption(clients[index % concurrency], photos[index % len(photos)])
        except Exception as exc:   # counted and reported: the target is zero
            errors.append(f"request {index}: {type(exc).__name__}: {exc}")
            return None

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(worker, range(requests)))
    wall = time.perf_counter() - start
    return [r for r in results if r is not None], errors, wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(default_checkpoint()))
    parser.add_argument("--port", type=int, default=7891)
    parser.add_argument("--single", type=int, default=40, help="sequential requests for the latency")
    parser.add_argument("--requests", type=int, default=80)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--decoders", type=int, default=1,
                        help="serve an ensemble of this many copies of the checkpoint's decoder")
    parser.add_argument("--floor-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.floor_server:
        from captioner.webapp import launch

        launch(floor_app(), port=args.floor_server, quiet=True)
        return 0
    if not Path(args.checkpoint).exists():
        raise SystemExit(f"no checkpoint at {args.checkpoint}: pass --checkpoint PATH")
    photos = example_images()
    if not photos:
        raise SystemExit("no example photos in examples/")

    with tempfile.TemporaryDirectory(prefix="bench-webapp-") as folder:
        if args.decoders > 1:
            copies = [Captioner.load(args.checkpoint, fast=False) for _ in range(args.decoders)]
            args.checkpoint = str(ensemble_of(copies, [f"copy {i}" for i in range(args.decoders)]).save(
                Path(folder) / f"ensemble{args.decoders}.safetensors", half=True))
        return measure(args, photos)


def measure(args, photos: list[str]) -> int:
    print(machine())
    print(f"checkpoint {args.checkpoint}; {len(photos)} example photos "
          f"({', '.join(Path(p).name for p in photos)})")
    direct = api_latency(args.checkpoint, photos, args.single)
    server, client = start_server([sys.executable, str(ROOT / "app.py"), "--checkpoint", args.checkpoint,
                                   "--port", str(args.port)], args.port, "the app")
    floor_server, floor_client = start_server([sys.executable, __file__, "--floor-server", str(args.port + 1)],
                                              args.port + 1, "the floor app")
    try:
        for photo in photos:                                     # warm-up, one per photo
            timed_caption(client, photo)
            timed_caption(floor_client, photo)
        single, floor = [], []
        for i in range(args.single):                             # alternating: load hits both alike
            single.append(timed_caption(client, photos[i % len(photos)]))
            floor.append(timed_caption(floor_client, photos[i % len(photos)]))
        floor_server.terminate()
        floor_server.wait(timeout=30)
        loaded, errors, wall = load_test(f"http://127.0.0.1:{args.port}/", photos,
                                         args.requests, args.concurrency)
    finally:
        for process in (server, floor_server):
            process.terminate()
            process.wait(timeout=30)

    median_ms = 1000 * statistics.median(single)
    share_ms = median_ms - 1000 * statistics.median(floor)
    print(f"\n(1) one upload at a time, beam 3, through gradio_client: {summary(single)}"
          f"   target <= {LATENCY_TARGET_MS} ms: {'met' if median_ms <= LATENCY_TARGET_MS else 'MISSED'}")
    print(f"    the do-nothing Gradio app (floor), same uploads:     {summary(floor)}")
    print(f"    app - floor (medians): {share_ms:.0f} ms   target <= {SHARE_TARGET_MS} ms: "
          f"{'met' if share_ms <= SHARE_TARGET_MS else 'MISSED'}")
    print(f"    the Python API alone, same photos, in-process:       {summary(direct)}")
    print(f"(2) {args.requests} requests, {args.concurrency} concurrent clients: {summary(loaded)}; "
          f"{len(errors)} errors; {wall:.1f} s wall, {len(loaded) / wall:.1f} captions/s")
    for line in errors[:10]:
        print("   ", line)
    print(f"    load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0 if median_ms <= LATENCY_TARGET_MS and share_ms <= SHARE_TARGET_MS and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
