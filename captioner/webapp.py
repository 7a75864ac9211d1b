"""The web UI: upload a photo, read its caption; or many photos (files or zips) into a table with
CSV / JSON Lines downloads. A thin Gradio shell over `Captioner.caption` / `caption_stream`.

One model is loaded at start and shared by every request; requests go through Gradio's queue,
DEFAULT_CONCURRENCY at a time (one many-photos job at a time, so single photos keep a slot). The
endpoint `/caption` takes the image first and has defaults for everything else, so
`Client(url).predict(handle_file(path), api_name="/caption")[0]` is the caption; `/caption_many`
takes a list of files first and returns (table, CSV file, JSON Lines file, summary).
"""
from __future__ import annotations

import os

# Gradio reads this when it is imported: no usage reports leave the machine.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import math
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import torch

from .api import Caption, Captioner, default_checkpoint
from .batch import RowWriter
from .checkpoint import CheckpointError
from .outputs import caption_row, confidence_color, error_row
from .preprocess import MAX_PIXELS, ImageLoadError, ImageTooLarge, NotAnImage
from .uploads import UploadError, collect_uploads, remove_tree

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
MAX_UPLOAD = "25mb"
# Two cores: two requests in flight keep both busy; the rest wait in the queue.
DEFAULT_CONCURRENCY = 2
# PyTorch threads in the server. Beam search is a string of tiny matrix products whose threads wait
# on each other whenever the cores are busy (and concurrent requests keep them busy): on 2 loaded
# cores beam 3 took 618 ms median with 2 threads against 43 ms with 1. The CNN runs in ONNX
# Runtime, which has its own threads.
SERVER_TORCH_THREADS = 1
QUEUE_SIZE = 64
# Exit status of `serve` when it cannot start (no or a bad checkpoint, a busy port): the usage
# error status of every captioner command (cli.EXIT_USAGE).
USAGE_ERROR = 2
METHODS = ("beam", "greedy", "sample")
MAX_BEAM, MAX_CAPTIONS = 10, 5
# The many-photos tab: photos per engine batch (the table grows by about this many at a time), the
# most photos one request may hold, and how often the table is sent while a job runs.
MANY_BATCH = 8
MAX_PHOTOS = 1000
MANY_UPDATE_SECONDS = 0.5
MANY_HEADERS = ["file", "caption", "score", "error"]     # the batch CLI's row fields (batch.FIELDS)
METRIC_ORDER = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")

# System fonts only: the default theme would fetch Google Fonts, and the page must work offline.
THEME = gr.themes.Default(font=["system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"],
                          font_mono=["ui-monospace", "Menlo", "Consolas", "monospace"])
CSS = """
#caption textarea { font-size: 1.6rem !important; line-height: 1.3 !important; font-weight: 600; }
.gradio-container { max-width: 1100px !important; margin: auto; }
@media (max-width: 640px) { #caption textarea { font-size: 1.3rem !important; } }
/* The tables size their columns to unwrapped text: their width must not widen the page on a phone. */
#candidates, #many-table { contain: inline-size; }
"""


# Each word's label is its probability in percent ("87%"); the colour map covers all 101 labels.
CONFIDENCE_COLORS = {f"{p}%": confidence_color(p) for p in range(101)}


class BadRequest(Exception):
    """An upload or a setting we cannot caption with; the message is shown to the user."""


def bad_image(exc: ImageLoadError) -> BadRequest:
    """The user's message for an upload the engine's admission refused (preprocess.read_image:
    non-images, unreadable files, and images over MAX_PIXELS judged from the header alone)."""
    if isinstance(exc, ImageTooLarge):
        if exc.size is None:
            return BadRequest("This image is far too large (a decompression bomb?); "
                              f"the limit is {MAX_PIXELS / 1e6:.0f} megapixels.")
        width, height = exc.size
        return BadRequest(f"This image is too large: {width}x{height} pixels "
                          f"({width * height / 1e6:.0f} megapixels; the limit is {MAX_PIXELS / 1e6:.0f}).")
    if isinstance(exc, NotAnImage):
        return BadRequest("This file is not an image (or a format Pillow cannot read): "
                          "please upload a JPEG, PNG, WebP, GIF, BMP or TIFF photo.")
    return BadRequest(f"Could not read this image: {exc.reason}")


def upload_path(image: Any) -> str:
    """The file behind the image input: Gradio's file payload (dict), a path, or None."""
    if image is None:
        raise BadRequest("No image: upload a photo (or pick an example) first.")
    if isinstance(image, dict):
        image = image.get("path")
    if not isinstance(image, (str, os.PathLike)) or not str(image):
        raise BadRequest("No image: upload a photo (or pick an example) first.")
    return str(image)


def shown(value: Any) -> str:
    """A value from a request, short enough to quote back."""
    text = repr(value)
    return text if len(text) <= 30 else text[:27] + "..."


def whole_number(value: Any, label: str, low: int, high: int) -> int:
    """A slider's whole number as the API may send it (3 or 3.0); BadRequest for anything else:
    a string, null, true, 3.5, or a number out of range."""
    if (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and value == int(value) and low <= value <= high):
        return int(value)
    raise BadRequest(f"{label} must be a whole number from {low} to {high} (got {shown(value)}).")


def number_above(value: Any, label: str, low: float, high: float) -> float:
    """A number in (low, high]; BadRequest for anything else."""
    if (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and low < value <= high):
        return float(value)
    raise BadRequest(f"{label} must be a number above {low:g} and at most {high:g} (got {shown(value)}).")


def decoding_options(method: Any, beam_size: Any, temperature: Any, top_p: Any,
                     num_captions: Any) -> dict[str, Any]:
    """The request's decoding settings, checked: the page's controls only send valid values, but
    the API (`/caption`) takes whatever JSON a client sends, so each is checked for type and
    range here and refused with a message (BadRequest), never a TypeError."""
    if not isinstance(method, str) or method not in METHODS:
        raise BadRequest(f"Unknown method {shown(method)}: choose one of {', '.join(METHODS)}.")
    options = {"method": method, "beam_size": whole_number(beam_size, "Beam size", 1, MAX_BEAM),
               "temperature": number_above(temperature, "Temperature", 0, 5),
               "top_p": number_above(top_p, "Top-p", 0, 1),
               "n_best": whole_number(num_captions, "Number of captions", 1, MAX_CAPTIONS)}
    if method == "greedy":
        options["n_best"] = 1
    return options


@dataclass
class CaptionResult:
    caption: str
    words: list[tuple[str, str]]            # (word, its model probability as "87%")
    candidates: list[list[Any]]             # rows: caption, score (best first)

    def outputs(self) -> tuple:
        return self.caption, self.words, self.candidates


def candidate_rows(ranked: list[Caption]) -> list[list[Any]]:
    """Table rows (caption, score) in the given order; repeated samples are listed once."""
    rows, seen = [], set()
    for option in ranked:
        if option.text not in seen:
            seen.add(option.text)
            rows.append([option.text, round(option.score, 2)])
    return rows


def upload_paths(files: Any) -> list[str]:
    """The files of the many-photos input: a list of paths (or Gradio file payloads)."""
    if isinstance(files, (str, dict, os.PathLike)):
        files = [files]
    if not files or not isinstance(files, (list, tuple)):
        raise BadRequest("No photos: add photos or a zip of photos first.")
    return [upload_path(f) for f in files]


@dataclass
class ManyProgress:
    """Where a many-photos job is: its rows so far, in the batch CLI's format (outputs.caption_row
    or error_row, input order), and the downloads once it has finished."""
    rows: list[dict[str, Any]]
    total: int                                   # rows the job will have
    ignored: int = 0                             # zip members that are not images
    downloads: tuple[str, str] | None = None     # (CSV, JSON Lines) when finished

    @property
    def failed(self) -> int:
        return sum("error" in row for row in self.rows)

    def table(self) -> list[list[Any]]:
        return [[row["image"], row.get("caption", ""), row.get("score"), row.get("error", "")]
                for row in self.rows]

    def summary(self) -> str:
        done = len(self.rows)
        parts = [f"{done - self.failed} of {self.total} captioned" if self.downloads is None
                 else f"{done - self.failed} captioned"]
        if self.failed:
            parts.append(f"{self.failed} could not be captioned (see the error column)")
        if self.ignored:
            parts.append(f"{self.ignored} files in zips ignored (not images)")
        return ", ".join(parts) + ("." if self.downloads is not None else " …")

    def outputs(self) -> tuple:
        csv_file, jsonl_file = self.downloads or (None, None)
        return self.table(), csv_file, jsonl_file, self.summary()


def ranked_captions(best: Caption) -> list[Caption]:
    """A result's n best, best first: beam search returns them in order, samples come in drawing
    order (ranked here by score). Both tabs show the first."""
    return sorted(best.alternatives or [best], key=lambda c: -c.score)


class CaptionService:
    """The request handler around one loaded Captioner (shared by all requests, read only)."""

    def __init__(self, captioner: Captioner):
        self.captioner = captioner
        self.defaults = captioner.decode_cfg
        # The many-photos downloads, one folder a job; removed when the service goes.
        self.downloads = tempfile.TemporaryDirectory(prefix="captioner-downloads-")

    def caption(self, image: Any, method: str = "beam", beam_size: int = 3,
                temperature: float = 1.0, top_p: float = 1.0, num_captions: int = 3) -> CaptionResult:
        """One uploaded image -> its caption, per-word probabilities and the n best.
        Raises BadRequest with a message for the user when the upload cannot be captioned."""
        path = upload_path(image)
        options = decoding_options(method, beam_size, temperature, top_p, num_captions)
        try:
            best = self.captioner.caption(path, **options)
        except ImageLoadError as exc:
            raise bad_image(exc) from None
        ranked = ranked_captions(best)
        top = ranked[0]
        return CaptionResult(caption=top.text,
                             words=[(w, f"{round(100 * p)}%") for w, p in zip(top.words, top.word_probs)],
                             candidates=candidate_rows(ranked))

    def handle(self, image, method, beam_size, temperature, top_p, num_captions):
        """Gradio callback: bad input becomes a gr.Error message, never a traceback."""
        try:
            return self.caption(image, method, beam_size, temperature, top_p, num_captions).outputs()
        except BadRequest as exc:
            raise gr.Error(str(exc), print_exception=False) from None

    def caption_many(self, files: Any, method: str = "beam", beam_size: int = 3, temperature: float = 1.0,
                     top_p: float = 1.0, num_captions: int = 3) -> Iterator[ManyProgress]:
        """Uploaded photos and zips of photos -> their rows as they finish (the engine's
        caption_stream, on_error="skip": a file that cannot be captioned is an error row, and
        the rest go on), then the CSV and JSON Lines downloads in the batch CLI's format.
        The decoding settings are those of one photo, and a row holds the caption that tab
        shows first. BadRequest for a request that cannot start (no files, too many photos, bad
        settings)."""
        paths = upload_paths(files)
        options = decoding_options(method, beam_size, temperature, top_p, num_captions)
        workdir = tempfile.mkdtemp(prefix="captioner-zip-")
        try:
            try:
                uploads = collect_uploads(paths, workdir, MAX_PHOTOS)
            except UploadError as exc:
                raise BadRequest(str(exc)) from None
            rows: list[dict[str, Any]] = []
            yield ManyProgress(list(rows), len(uploads.items), uploads.ignored)
            results = self.captioner.caption_stream([u.path for u in uploads.items if u.path is not None],
                                                    batch_size=MANY_BATCH, on_error="skip", **options)
            last_update = time.monotonic()
            for upload in uploads.items:
                if upload.path is None:
                    rows.append(error_row(upload.name, upload.error))
                else:
                    result = next(results)
                    rows.append(caption_row(upload.name, ranked_captions(result)[0]) if result.ok
                                else error_row(upload.name, result.error))
                if time.monotonic() - last_update >= MANY_UPDATE_SECONDS:
                    last_update = time.monotonic()
                    yield ManyProgress(list(rows), len(uploads.items), uploads.ignored)
            yield ManyProgress(rows, len(uploads.items), uploads.ignored, self.write_downloads(rows))
        finally:
            remove_tree(workdir)

    def write_downloads(self, rows: list[dict[str, Any]]) -> tuple[str, str]:
        """captions.csv and captions.jsonl written by the batch CLI's writer (same columns)."""
        folder = Path(tempfile.mkdtemp(dir=self.downloads.name))
        paths = []
        for name in ("captions.csv", "captions.jsonl"):
            writer = RowWriter(str(folder / name))
            writer.open()
            writer.write(rows)
            writer.close()
            paths.append(str(folder / name))
        return paths[0], paths[1]

    def handle_many(self, files, method, beam_size, temperature, top_p, num_captions, progress=gr.Progress()):
        """Gradio callback (a generator: the table fills in as photos finish, under a progress bar)."""
        try:
            for update in self.caption_many(files, method, beam_size, temperature, top_p, num_captions):
                progress((len(update.rows), max(update.total, 1)), desc="Captioning", unit="photos")
                yield update.outputs()
        except BadRequest as exc:
            raise gr.Error(str(exc), print_exception=False) from None


def model_card(captioner: Captioner) -> str:
    """Markdown: which checkpoint is loaded and the scores stored in its header, if any."""
    cfg, info = captioner.model_cfg, captioner.info
    source = Path(getattr(captioner, "source", "") or "(in memory)").name
    ensemble = f", an ensemble of {len(captioner.decoders)}" if len(captioner.decoders) > 1 else ""
    dataset = f", trained on {info['dataset']}" if isinstance(info.get("dataset"), str) else ""
    lines = [f"**Model:** `{source}`: {cfg.backbone} encoder, {cfg.num_layers}-layer LSTM "
             f"({cfg.hidden_dim} units), {len(captioner.vocab):,} words{ensemble}{dataset}."]
    for key, title in (("test_scores", "Test scores"), ("val_scores", "Validation scores")):
        table = score_table(info.get(key))
        if table:
            return "\n".join(lines + ["", f"**{title}**{score_context(info[key])}:", "", table])
    return "\n".join(lines + ["", "_This checkpoint stores no evaluation scores._"])


def split_scores(scores: Any) -> tuple[dict[str, float], dict[str, Any]]:
    """Metric values and their context: flat {"CIDEr": ..} or {"scores": {..}, "split": ..}."""
    if not isinstance(scores, dict):
        return {}, {}
    context = {}
    if isinstance(scores.get("scores"), dict):
        context = {k: v for k, v in scores.items() if k != "scores" and isinstance(v, (str, int, float))}
        scores = scores["scores"]
    metrics = {k: float(v) for k, v in scores.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return metrics, context


def score_context(scores: Any) -> str:
    context = split_scores(scores)[1]
    return f" ({', '.join(f'{k} {v}' for k, v in context.items())})" if context else ""


def score_table(scores: Any) -> str:
    """A one-row Markdown table of metric -> value (empty when there are none)."""
    metrics = split_scores(scores)[0]
    if not metrics:
        return ""
    names = sorted(metrics, key=lambda k: (METRIC_ORDER.index(k) if k in METRIC_ORDER else 99, k))
    return ("| " + " | ".join(names) + " |\n|" + "---|" * len(names) + "\n| "
            + " | ".join(f"{metrics[k]:.3f}" for k in names) + " |")


def example_images() -> list[str]:
    """The shipped example photos (absent from a plain pip install: then no examples)."""
    if not EXAMPLES_DIR.is_dir():
        return []
    return sorted(str(p) for p in EXAMPLES_DIR.iterdir()
                  if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))


def build_app(captioner: Captioner) -> gr.Blocks:
    """The page. Call `launch(app)` (below) to serve it with the project's theme and limits."""
    service = CaptionService(captioner)
    d = service.defaults
    method = d.method if d.method in METHODS else "beam"
    with gr.Blocks(title="Captioner", analytics_enabled=False) as app:
        gr.Markdown("# Captioner\nDrop in a photo and read what it shows — "
                    "a Show-and-Tell model (CNN encoder + LSTM decoder).")
        with gr.Tabs():
            with gr.Tab("One photo", id="one", elem_id="tab-one"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=1, min_width=300):
                        # image_mode=None: Gradio hands over the file untouched (no decode, no re-encode).
                        image = gr.Image(label="Photo", type="filepath", image_mode=None,
                                         sources=["upload", "clipboard", "webcam"], height=360,
                                         elem_id="photo")
                        button = gr.Button("Caption", variant="primary", elem_id="caption-button")
                    with gr.Column(scale=1, min_width=300):
                        caption = gr.Textbox(label="Caption", lines=2, interactive=False, elem_id="caption",
                                             buttons=["copy"])
                        words = gr.HighlightedText(label="Word confidence", color_map=CONFIDENCE_COLORS,
                                                   show_legend=False, show_inline_category=True,
                                                   elem_id="words")
                        candidates = gr.Dataframe(headers=["caption", "score"], datatype=["str", "number"],
                                                  label="Best captions (score: log-probability)",
                                                  interactive=False, wrap=True, column_widths=["78%", "22%"],
                                                  elem_id="candidates")
                examples = example_images()
                if examples:
                    gr.Examples(examples=[[p] for p in examples], inputs=[image], elem_id="examples",
                                label="Example photos: pick one, then press Caption",
                                examples_per_page=len(examples))
            with gr.Tab("Many photos", id="many", elem_id="tab-many"):
                files = gr.File(label="Photos, or zips of photos (folders inside are fine)",
                                file_count="multiple", type="filepath", elem_id="many-files")
                many_button = gr.Button("Caption all", variant="primary", elem_id="many-button")
                many_summary = gr.Markdown(elem_id="many-summary")
                many_table = gr.Dataframe(headers=MANY_HEADERS, datatype=["str", "str", "number", "str"],
                                          label="Captions (score: log-probability, higher is better)",
                                          interactive=False, wrap=True, elem_id="many-table",
                                          column_widths=["25%", "50%", "10%", "15%"])
                with gr.Row():
                    csv_file = gr.File(label="CSV", interactive=False, elem_id="many-csv")
                    jsonl_file = gr.File(label="JSON Lines", interactive=False, elem_id="many-jsonl")
        with gr.Accordion("Advanced: decoding (both tabs)", open=False):
            method_in = gr.Radio(list(METHODS), value=method, label="Method")
            beam_in = gr.Slider(1, MAX_BEAM, value=min(max(d.beam_size, 1), MAX_BEAM), step=1,
                                label="Beam size (beam search)")
            temperature_in = gr.Slider(0.1, 2.0, value=d.temperature, step=0.05,
                                       label="Temperature (sampling)")
            top_p_in = gr.Slider(0.05, 1.0, value=d.top_p, step=0.05, label="Top-p (sampling)")
            count_in = gr.Slider(1, MAX_CAPTIONS, value=3, step=1,
                                 label="Number of captions (beam, sampling; the best is shown for many photos)")
        settings = [method_in, beam_in, temperature_in, top_p_in, count_in]
        # preprocess=False: the callback gets the uploaded file as is and judges it itself, so a
        # non-image gets our message instead of a failure inside Gradio's image decoding.
        button.click(service.handle, [image, *settings], [caption, words, candidates],
                     api_name="caption", preprocess=False,
                     api_description="Caption one image: returns (caption, word probabilities, n best).")
        # One many-photos job at a time: the other slot stays free for single photos.
        many_button.click(service.handle_many, [files, *settings],
                          [many_table, csv_file, jsonl_file, many_summary], api_name="caption_many",
                          concurrency_limit=1,
                          api_description="Caption many images (a list of image or zip files): returns "
                                          "(table, CSV file, JSON Lines file, summary).")
        with gr.Accordion("About the model", open=True):
            gr.Markdown(model_card(captioner), elem_id="model-card")
    app.queue(default_concurrency_limit=DEFAULT_CONCURRENCY, max_size=QUEUE_SIZE)
    return app


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False,
           prevent_thread_lock: bool = False, quiet: bool = False):
    """Serve the page: loopback unless told otherwise, no share link unless asked."""
    return app.launch(server_name=host, server_port=port, share=share,
                      prevent_thread_lock=prevent_thread_lock, quiet=quiet,
                      max_file_size=MAX_UPLOAD, theme=THEME, css=CSS)


def warm_up(captioner: Captioner) -> None:
    """One caption before the first user, so the first request does not pay for first-call setup."""
    examples = example_images()
    if examples:
        captioner.caption(examples[0], method="beam", beam_size=3)


def serve(checkpoint: str | None = None, host: str = "127.0.0.1", port: int = 7860,
          share: bool = False) -> int:
    """`python app.py` / `captioner serve`: load the model once, serve until interrupted."""
    if checkpoint is None and not default_checkpoint().is_file():
        print(f"error: the shipped model {default_checkpoint()} is not there yet; train one "
              "(make train-flickr8k) or pass --checkpoint PATH", file=sys.stderr)
        return USAGE_ERROR
    torch.set_num_threads(SERVER_TORCH_THREADS)
    try:
        captioner = Captioner.load(checkpoint)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    warm_up(captioner)
    app = build_app(captioner)
    try:
        _, local_url, _ = launch(app, host=host, port=port, share=share,
                                 prevent_thread_lock=True, quiet=True)
    except OSError:   # Gradio's own message names its launch() arguments, not our flags
        print(f"error: cannot serve on {host}:{port}: the port is in use or the address is not "
              "this machine's; choose another --port or --host", file=sys.stderr)
        return USAGE_ERROR
    reach = "this machine only (--host 0.0.0.0 for your network)" if host == "127.0.0.1" else host
    print(f"Captioner web UI: {local_url}  [{reach}; Ctrl-C stops]", flush=True)
    app.block_thread()    # until Ctrl-C, which closes the server
    return 0
