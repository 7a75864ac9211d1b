"""`captioner caption`: files, folders and glob patterns -> one JSON Lines or CSV row per image.

    inputs -> candidate paths -> the inference engine (engine.py: image workers, ONNX Runtime CNN,
           batched decoding; the same captions as the API and the web UI) -> rows appended per batch

Images are recognised by content. A file named on the command line, or named like an image, that
cannot be captioned gets an error row `{"image": path, "error": reason}` and a one-line warning;
other files in a folder that are not images (notes.txt) are ignored. Decompression bombs are
refused from the image header, before any pixel is decoded.

Each batch is appended with ONE write() of complete lines, then flushed, so kill -9 loses at most
the batch in flight. Rerunning the same command resumes: images with a caption in the output are
skipped; images whose row is an error are tried again (their old error rows are removed first, so
every image appears exactly once); a partial last line from a killed run is dropped. What produced
the rows (the checkpoint's sha256 and the decoding options) is recorded beside OUT, in
OUT.provenance.json: a rerun with another checkpoint or other options is refused (exit status 2,
OUT untouched) rather than mixing two models' captions in one file; --overwrite starts OUT again.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .checkpoint import atomic_write, fingerprint, read_checkpoint, resolve_checkpoint
from .config import DecodeConfig, PreprocessConfig, to_dict, with_overrides
from .engine import DEFAULT_WORKERS, read_images, torch_threads
from .fast_encoder import FastEncoderWarning, cpu_count
from .outputs import Gallery, PhotoOutputs, caption_row, error_row, read_gallery
from .preprocess import NotAnImage

FIELDS = ("image", "caption", "score", "error")     # CSV columns; JSON rows use the same keys


class UsageError(ValueError):
    """Bad options or no inputs: `captioner` prints it and exits with status 2."""


# ---------------------------------------------------------------------------------------------
# Inputs
@dataclass
class Candidate:
    path: str
    # Named on the command line or named like an image: it gets a row even if it is not one.
    # Other files found in folders (notes.txt) are ignored unless their content is an image.
    expected: bool


def image_suffixes() -> frozenset[str]:
    Image.init()
    return frozenset(Image.registered_extensions())


def folder_files(folder: str, recursive: bool) -> list[str]:
    """Files (and symlinks to nothing) in a folder, sorted; subfolders only when recursive.
    A directory named like an image (`holiday.jpg/`) is never a file, so it is never captioned."""
    if not recursive:
        with os.scandir(folder) as entries:
            return sorted(e.path for e in entries if not e.is_dir())
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        found += [os.path.join(root, f) for f in sorted(files)]
    return found


def collect_inputs(inputs: list[str], recursive: bool = False) -> tuple[list[Candidate], list[str]]:
    """Expand files, folders and glob patterns (each image once, first mention kept) and return
    the candidates with notes for the user (patterns that matched nothing, skipped folders)."""
    suffixes = image_suffixes()
    candidates: list[Candidate] = []
    notes: list[str] = []
    seen: set[str] = set()

    def add(path: str, named: bool) -> None:
        key = os.path.abspath(path)
        if key not in seen:
            seen.add(key)
            candidates.append(Candidate(path, named or Path(path).suffix.lower() in suffixes))

    for item in inputs:
        if os.path.isdir(item):
            for path in folder_files(item, recursive):
                add(path, named=False)
        elif os.path.lexists(item) or not glob.has_magic(item):
            add(item, named=True)          # a missing path gets its own "no such file" row
        else:
            matches = sorted(glob.glob(item, recursive=recursive))
            if not matches:
                notes.append(f"no files match {item}")
            for path in matches:
                if not os.path.isdir(path):
                    add(path, named=False)
                elif recursive:
                    for inner in folder_files(path, recursive):
                        add(inner, named=False)
                else:
                    notes.append(f"skipping folder {path} (use --recursive to caption folders "
                                 "matched by a pattern)")
    return candidates, notes


# ---------------------------------------------------------------------------------------------
# Output: JSON Lines or CSV, appended one batch per write(), resumable
def row_key(image: str) -> str:
    return os.path.abspath(image)


PROVENANCE_SUFFIX = ".provenance.json"


def run_provenance(checkpoint: Path, decode: DecodeConfig) -> dict:
    """What produces a run's rows: the checkpoint by content (sha256: its weights, vocabulary and
    header) and the decoding options in effect."""
    return {"checkpoint": checkpoint.name, "checkpoint_sha256": fingerprint(checkpoint),
            "decode": to_dict(decode)}


def provenance_differences(recorded: dict, current: dict) -> list[str]:
    """What differs between two provenance records, in words ('beam_size 3 -> 5')."""
    differences = []
    if recorded.get("checkpoint_sha256") != current["checkpoint_sha256"]:
        differences.append(f"checkpoint {recorded.get('checkpoint')} (sha256 "
                           f"{str(recorded.get('checkpoint_sha256'))[:12]}) -> {current['checkpoint']} "
                           f"(sha256 {current['checkpoint_sha256'][:12]})")
    old_decode = recorded.get("decode") if isinstance(recorded.get("decode"), dict) else {}
    for name, value in current["decode"].items():
        if old_decode.get(name, "unset") != value:
            differences.append(f"{name} {json.dumps(old_decode.get(name, 'unset'))} -> {json.dumps(value)}")
    return differences


class RowWriter:
    """Appends rows to OUT (or stdout). The file is opened O_APPEND and every batch goes out in
    one os.write of complete lines, so a killed run never leaves half a row behind.
    provenance (see run_provenance) is kept in OUT.provenance.json; a rerun must match it."""

    def __init__(self, output: str | None, provenance: dict | None = None, overwrite: bool = False):
        self.output = output
        self.as_csv = bool(output) and output.lower().endswith(".csv")
        self.fd: int | None = None
        # as JSON reads it back (floats stay floats, tuples become lists), for comparing
        self.provenance = json.loads(json.dumps(provenance)) if provenance is not None else None
        self.overwrite = overwrite
        self.kept_rows: list[dict] = []     # the captioned rows a resumed OUT already holds
        self.wants_words = False            # rows carry per-word probabilities (the gallery)

    @property
    def provenance_path(self) -> Path:
        return Path(f"{self.output}{PROVENANCE_SUFFIX}")

    def open(self) -> set[str]:
        """Open for appending after checking that OUT was written by this checkpoint and these
        options, and repairing what a killed run left; returns the keys of the images already
        captioned there. --overwrite empties OUT first."""
        if not self.output:
            return set()
        path = Path(self.output)
        if path.is_dir():
            raise UsageError(f"-o {self.output} is a folder; give a .jsonl or .csv file")
        resuming = path.is_file() and path.stat().st_size > 0 and not self.overwrite
        done = self.repair(path) if resuming else set()
        try:
            # Emptied BEFORE the new record is written: a crash in between leaves an empty OUT
            # (a fresh start next time), never old rows under a new record.
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT
                              | (os.O_TRUNC if self.overwrite else 0), 0o644)
            if self.provenance is not None and not resuming:
                record = json.dumps(self.provenance, indent=1) + "\n"
                atomic_write(self.provenance_path, lambda tmp: Path(tmp).write_text(record))
        except OSError as exc:
            raise UsageError(f"cannot write {self.output}: {exc.strerror}") from None
        if self.as_csv and os.fstat(self.fd).st_size == 0:
            self._write(self.format_rows([dict(zip(FIELDS, FIELDS))]))
        return done

    def repair(self, path: Path) -> set[str]:
        """Drop a partial last line and error rows (those images are tried again), rewriting the
        file atomically only if something must go."""
        data = path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        rows = self.parse(complete.decode("utf-8", errors="surrogateescape"))
        self.check_provenance()
        kept = [row for row in rows if not row.get("error")]
        self.kept_rows = kept
        if len(kept) < len(rows) or len(complete) < len(data):
            text = self.format_rows(([dict(zip(FIELDS, FIELDS))] if self.as_csv else []) + kept)
            atomic_write(path, lambda tmp: Path(tmp).write_bytes(self.encode(text)))
        return {row_key(row["image"]) for row in kept}

    def check_provenance(self) -> None:
        """UsageError (OUT untouched) unless OUT's record matches this run."""
        if self.provenance is None:
            return
        again = "rerun with the same checkpoint and options to resume, or --overwrite to start it again"
        try:
            recorded = json.loads(self.provenance_path.read_text())
        except FileNotFoundError:
            raise UsageError(f"{self.output} has no record of the checkpoint and options that wrote it "
                             f"({self.provenance_path.name} is missing): use --overwrite to start it "
                             "again, or another -o") from None
        except (OSError, ValueError) as exc:
            raise UsageError(f"{self.provenance_path} is unreadable ({exc}): use --overwrite") from None
        differences = provenance_differences(recorded if isinstance(recorded, dict) else {},
                                             self.provenance)
        if differences:
            raise UsageError(f"{self.output} holds captions from another checkpoint or other "
                             f"options ({'; '.join(differences)}): {again}")

    def parse(self, text: str) -> list[dict]:
        problem = f"{self.output} exists but is not a captioner {'CSV' if self.as_csv else 'JSON Lines'} output"
        if self.as_csv:
            reader = csv.reader(io.StringIO(text))
            if tuple(next(reader, FIELDS)) != FIELDS:
                raise UsageError(f"{problem} (its header is not {','.join(FIELDS)})")
            rows = [dict(zip(FIELDS, values)) for values in reader if values]
        else:
            try:
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            except json.JSONDecodeError as exc:
                raise UsageError(f"{problem} ({exc})") from None
        if not all(isinstance(row, dict) and row.get("image") for row in rows):
            raise UsageError(f"{problem} (a row has no image)")
        return rows

    def format_rows(self, rows: list[dict]) -> str:
        if not self.as_csv:
            return "".join(json.dumps(row) + "\n" for row in rows)
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows([[row.get(f, "") for f in FIELDS] for row in rows])
        return buffer.getvalue()

    @staticmethod
    def encode(text: str) -> bytes:
        # surrogateescape round-trips file names that are not valid UTF-8
        return text.encode("utf-8", errors="surrogateescape")

    def write(self, rows: list[dict]) -> None:
        if rows:
            self._write(self.format_rows(rows))

    def _write(self, text: str) -> None:
        if self.fd is None:
            sys.stdout.write(text)
            sys.stdout.flush()
            return
        data = memoryview(self.encode(text))
        while data:   # os.write may write less than asked (rare for regular files)
            data = data[os.write(self.fd, data):]

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class GalleryWriter(RowWriter):
    """-o OUT.html: a contact sheet (outputs.render_gallery) instead of rows appended. The page
    keeps its rows in a JSON block, so resuming, provenance and retrying errors work as for
    JSON Lines; it is rewritten atomically as rows arrive (at most every FLUSH_SECONDS) and at
    the end, so kill -9 loses at most those seconds' rows (captioned again on the rerun)."""

    FLUSH_SECONDS = 5.0

    def __init__(self, output: str, provenance: dict | None = None, overwrite: bool = False):
        super().__init__(output, provenance, overwrite)
        self.gallery = Gallery(output)
        self.wants_words = True
        self.last_flush = time.monotonic()

    def repair(self, path: Path) -> set[str]:
        rows = self.parse(path.read_text(encoding="utf-8", errors="surrogateescape"))
        self.check_provenance()
        self.kept_rows = [row for row in rows if not row.get("error")]   # errors are retried
        self.gallery.rows = list(self.kept_rows)
        return {row_key(row["image"]) for row in self.kept_rows}

    def parse(self, text: str) -> list[dict]:
        try:
            rows = read_gallery(text)
        except ValueError as exc:
            raise UsageError(f"{self.output} exists but is not a captioner gallery ({exc})") from None
        if not all(row.get("image") for row in rows):
            raise UsageError(f"{self.output} exists but is not a captioner gallery (a row has no image)")
        return rows

    def write(self, rows: list[dict]) -> None:
        self.gallery.add(rows)
        if time.monotonic() - self.last_flush >= self.FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        text = self.gallery.render()
        atomic_write(self.output, lambda tmp: Path(tmp).write_bytes(self.encode(text)))
        self.last_flush = time.monotonic()

    def close(self) -> None:
        if self.fd is not None:
            self.flush()
        super().close()


def row_writer(output: str | None, provenance: dict, overwrite: bool) -> RowWriter:
    """The writer for -o: a gallery for .html, JSON Lines or CSV otherwise."""
    if output and output.lower().endswith((".html", ".htm")):
        return GalleryWriter(output, provenance, overwrite)
    return RowWriter(output, provenance, overwrite)


# ---------------------------------------------------------------------------------------------
# The command
DECODE_OPTIONS = ("method", "beam_size", "max_len", "length_penalty", "temperature", "top_k",
                  "top_p", "seed", "no_repeat_ngram_size")


def check_options(args) -> None:
    """Reject impossible values before any work starts (exit status 2)."""
    rules = [("batch_size", lambda v: v >= 1, ">= 1"), ("workers", lambda v: v >= 0, ">= 0"),
             ("beam_size", lambda v: v >= 1, ">= 1"), ("max_len", lambda v: v >= 1, ">= 1"),
             ("length_penalty", lambda v: v >= 0, ">= 0"), ("temperature", lambda v: v > 0, "> 0"),
             ("top_k", lambda v: v >= 0, ">= 0"), ("top_p", lambda v: 0 < v <= 1, "in (0, 1]")]
    for name, ok, need in rules:
        value = getattr(args, name, None)
        if value is not None and not ok(value):
            raise UsageError(f"--{name.replace('_', '-')} must be {need} (got {value})")


class Reporter:
    """tqdm bar on stderr (only on a terminal, not with --quiet); warnings that do not break it."""

    def __init__(self, total: int, quiet: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="img", desc="captioning", file=sys.stderr,
                        disable=quiet or not sys.stderr.isatty(), dynamic_ncols=True, smoothing=0.1)

    def warn(self, message: str) -> None:
        line = f"captioner: warning: {message}"
        if self.bar.disable:
            print(line, file=sys.stderr, flush=True)
        else:
            self.bar.write(line, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def caption_inputs(args) -> int:
    """Run `captioner caption`; returns the exit status (0 all captioned, 1 some failed;
    usage errors raise UsageError or CheckpointError, which cli.main turns into status 2)."""
    from .api import default_checkpoint

    start = time.perf_counter()
    check_options(args)
    candidates, notes = collect_inputs(args.inputs, getattr(args, "recursive", False))
    if not any(os.path.lexists(c.path) for c in candidates):
        raise UsageError("no inputs found: " + (", ".join(notes) if notes else " ".join(args.inputs)))
    checkpoint = resolve_checkpoint(args.checkpoint if args.checkpoint else default_checkpoint())
    # The whole checkpoint is checked (tensors too, ~0.1 s) before OUT is touched: an unusable
    # one is an exit status 2 with nothing done.
    decode = with_overrides(read_checkpoint(checkpoint).decode,
                            **{k: getattr(args, k, None) for k in DECODE_OPTIONS})
    overwrite = getattr(args, "overwrite", False)
    writer = row_writer(args.output, run_provenance(checkpoint, decode), overwrite)
    photo_outputs = PhotoOutputs(sidecar=getattr(args, "sidecar", None), xmp=getattr(args, "xmp", False),
                                 embed=getattr(args, "embed", False), overwrite=overwrite)
    done = writer.open()
    todo = [c for c in candidates if row_key(c.path) not in done]
    reporter = Reporter(len(todo), args.quiet)
    for note in notes:
        reporter.warn(note)
    counts = {"captioned": 0, "failed": 0, "ignored": 0}
    try:   # a closed stdout (`| head`) raises BrokenPipeError: cli.main exits quietly
        catch_up(photo_outputs, writer.kept_rows, reporter, counts)
        if todo:
            run(checkpoint, todo, args, writer, reporter, counts, photo_outputs)
    finally:
        reporter.close()
        writer.close()
    if not args.quiet:
        summary(counts, len(candidates) - len(todo), time.perf_counter() - start, args.output,
                photo_outputs.kept)
    return 1 if counts["failed"] else 0


def write_photo_outputs(photo_outputs: PhotoOutputs, rows: list[dict], reporter: Reporter) -> int:
    """The per-photo outputs (--sidecar, --xmp, --embed) of freshly captioned rows, written
    BEFORE the rows go to OUT: a photo with a row in OUT has its outputs, so a killed run is
    resumed without losing any. A failure turns the row into an error row that keeps its caption
    (retried on the rerun). Returns how many failed."""
    failed = 0
    for row in rows:
        problem = photo_outputs.write(row["image"], row["caption"]) if "caption" in row else None
        if problem:
            row["error"] = problem
            reporter.warn(f"{row['image']}: {problem}")
            failed += 1
    return failed


def catch_up(photo_outputs: PhotoOutputs, kept_rows: list[dict], reporter: Reporter,
             counts: dict[str, int]) -> None:
    """Per-photo outputs of the photos a resumed OUT already holds (an option added on the
    rerun): written from OUT's captions, nothing captioned again; those already there are kept.
    A failure is a warning (exit status 1); the rerun tries again."""
    if photo_outputs.enabled and kept_rows:
        counts["failed"] += write_photo_outputs(photo_outputs, [dict(row) for row in kept_rows], reporter)


def run(checkpoint: Path, todo: list[Candidate], args, writer: RowWriter, reporter: Reporter,
        counts: dict[str, int], photo_outputs: PhotoOutputs | None = None) -> None:
    """Caption `todo` with the engine every entry point uses (engine.py), writing rows per batch."""
    from .api import Captioner

    # The image workers start first (they need only the checkpoint's preprocessing), so the
    # first batches are read while the model loads.
    workers = args.workers if args.workers is not None else min(cpu_count(), DEFAULT_WORKERS)
    batches = read_images([c.path for c in todo], checkpoint_preprocess(checkpoint), args.batch_size, workers)
    with warnings.catch_warnings(record=True) as caught, torch_threads(1):
        warnings.simplefilter("always", FastEncoderWarning)
        # One thread while loading: an export runs the CNN once beside the image workers.
        captioner = Captioner.load(checkpoint, device=args.device, fast=not getattr(args, "no_fast", False))
    for warning in caught:   # "fast path unavailable" as one line like the others; the rest as usual
        if issubclass(warning.category, FastEncoderWarning):
            reporter.warn(str(warning.message))
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    cfg = captioner.decode_config(**{k: getattr(args, k, None) for k in DECODE_OPTIONS})
    many = len(todo) > args.batch_size
    for batch, captions in captioner.engine.caption_batches(batches, cfg, many=many):
        rows = {i: caption_row(todo[i].path, cap, words=writer.wants_words)
                for i, cap in zip(batch.indices, captions)}
        output_failures = write_photo_outputs(photo_outputs, [rows[i] for i in batch.indices],
                                              reporter) if photo_outputs else 0
        failed = ignored = 0
        for i, error in batch.errors:
            if isinstance(error, NotAnImage) and not todo[i].expected:
                ignored += 1         # notes.txt in a folder: not an image, and not meant as one
                continue
            rows[i] = error_row(todo[i].path, error.reason)
            reporter.warn(f"{todo[i].path}: {error.reason}")
            failed += 1
        writer.write([rows[i] for i in sorted(rows)])
        counts["captioned"] += len(batch.indices) - output_failures
        counts["failed"] += failed + output_failures
        counts["ignored"] += ignored
        reporter.bar.update(len(batch.indices) + len(batch.errors))


def checkpoint_preprocess(checkpoint: Path) -> PreprocessConfig:
    """The checkpoint's image preprocessing, from its checked header (no tensor is read)."""
    return read_checkpoint(checkpoint, tensors=False).preprocess


def summary(counts: dict[str, int], already: int, seconds: float, output: str | None,
            kept_outputs: int = 0) -> None:
    parts = [f"{counts['captioned']} captioned", f"{counts['failed']} failed"]
    if already:
        parts.append(f"{already} already in {output}")
    if kept_outputs:
        parts.append(f"{kept_outputs} existing sidecars or descriptions kept (--overwrite replaces them)")
    if counts["ignored"]:
        parts.append(f"{counts['ignored']} non-image files ignored")
    rate = counts["captioned"] / seconds if seconds > 0 else 0.0
    print(f"captioner: {', '.join(parts)}, {seconds:.1f} s ({rate:.1f} images/s)", file=sys.stderr)
