"""Outputs people use, written from caption rows (no model code here): a `.txt` sidecar, an XMP
sidecar, the caption embedded in the photo's own metadata, and an HTML contact sheet.

    row {"image", "caption", "score", "words"?}
        -> photo.txt           --sidecar txt  (the convention of dataset-captioning tools)
        -> photo.jpg.xmp       --xmp          (dc:description; digiKam and darktable read it)
        -> photo.jpg itself    --embed        (XMP dc:description + EXIF ImageDescription, via exiv2)
        -> gallery.html        -o gallery.html (thumbnails, captions, per-word confidence)

Files that already exist are the user's: a sidecar or an embedded description that is there is
kept unless `overwrite` (the CLI's --overwrite). Every file is written atomically (a temporary
file in the same folder, then os.replace), so a killed run leaves the old file or the new one.
"""
from __future__ import annotations

import base64
import colorsys
import html
import io
import json
import os
import re
import shutil
import stat
import tempfile
import xml.sax.saxutils
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SIDECAR_FORMATS = ("txt",)


def atomic_replace(path: str | os.PathLike, data: bytes, like: str | os.PathLike | None = None) -> None:
    """Write data to path through a temporary file in the same folder and os.replace. like: a
    file whose permission bits and access/modification times the result keeps (the photo when
    its metadata is rewritten; otherwise new files get 0644)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if like is not None:
            info = os.stat(like)
            shutil.copymode(like, tmp)
            os.utime(tmp, ns=(info.st_atime_ns, info.st_mtime_ns))
        else:
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def why(exc: OSError) -> str:
    return exc.strerror or str(exc)


# ---------------------------------------------------------------------------------------------
# XMP
XMP_TOOLKIT = "captioner"
# XML 1.0 cannot hold most control characters, not even escaped.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def xmp_packet(description: str) -> str:
    """A complete XMP packet holding the description as dc:description (a language alternative
    with the x-default entry, as XMP requires and digiKam, darktable and exiv2 read)."""
    text = xml.sax.saxutils.escape(_NOT_XML.sub("", description))
    return ('<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
            f'<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="{XMP_TOOLKIT}">\n'
            ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
            '  <rdf:Description rdf:about=""\n'
            '    xmlns:dc="http://purl.org/dc/elements/1.1/">\n'
            '   <dc:description>\n'
            '    <rdf:Alt>\n'
            f'     <rdf:li xml:lang="x-default">{text}</rdf:li>\n'
            '    </rdf:Alt>\n'
            '   </dc:description>\n'
            '  </rdf:Description>\n'
            ' </rdf:RDF>\n'
            '</x:xmpmeta>\n'
            '<?xpacket end="w"?>\n')


def exiv2():
    """pyexiv2 (exiv2's C++ library in a wheel), quiet: its warnings would go to stderr per file."""
    import pyexiv2

    pyexiv2.set_log_level(4)          # 4 = mute; failures still raise
    return pyexiv2


def _default_description(xmp: dict) -> str:
    value = xmp.get("Xmp.dc.description")
    if isinstance(value, dict):       # a language alternative: {'lang="x-default"': text, ...}
        return str(value.get('lang="x-default"') or next(iter(value.values()), ""))
    return str(value or "")


def read_descriptions(source: bytes | str) -> tuple[str, str]:
    """(XMP dc:description x-default, EXIF ImageDescription) of an image or XMP sidecar: its
    bytes, or its path (then exiv2 reads the metadata only, not the whole file)."""
    pyexiv2 = exiv2()
    with (pyexiv2.ImageData(source) if isinstance(source, bytes) else pyexiv2.Image(source)) as image:
        xmp = image.read_xmp()
        try:
            exif = image.read_exif()
        except RuntimeError:          # an XMP sidecar has no EXIF
            exif = {}
    return _default_description(xmp), str(exif.get("Exif.Image.ImageDescription", ""))


def with_description(data: bytes, caption: str, exif: bool = True) -> bytes:
    """The image (or XMP packet) bytes with the caption as XMP dc:description, and as EXIF
    ImageDescription when exif. exiv2 rewrites the metadata segments only: the coded pixels are
    copied as they are. RuntimeError when exiv2 cannot write this format (GIF, BMP, ...)."""
    with exiv2().ImageData(data) as image:
        image.modify_xmp({"Xmp.dc.description": _NOT_XML.sub("", caption)})
        if exif:
            image.modify_exif({"Exif.Image.ImageDescription": _NOT_XML.sub("", caption)})
        return image.get_bytes()


# ---------------------------------------------------------------------------------------------
# Per-photo outputs
@dataclass
class PhotoOutputs:
    """Which per-photo files to write, and what happened (counts for the summary line)."""
    sidecar: str | None = None        # "txt": photo.txt beside photo.jpg
    xmp: bool = False                 # photo.jpg.xmp
    embed: bool = False               # into photo.jpg itself
    overwrite: bool = False           # replace existing sidecars / descriptions
    kept: int = 0                     # files or descriptions left as they were (they existed)
    written: int = 0

    @property
    def enabled(self) -> bool:
        return bool(self.sidecar or self.xmp or self.embed)

    def write(self, image: str, caption: str) -> str | None:
        """Write every requested output for one captioned photo; None, or a one-line error
        naming what could not be written (the other outputs are still tried)."""
        problems = []
        for name, writer in (("--sidecar", self.write_sidecar if self.sidecar else None),
                             ("--xmp", self.write_xmp if self.xmp else None),
                             ("--embed", self.write_embedded if self.embed else None)):
            if writer is None:
                continue
            try:
                writer(image, caption)
            except OutputError as exc:
                problems.append(f"{name}: {exc}")
        return "; ".join(problems) or None

    def _new_file(self, path: str, data: bytes) -> None:
        if os.path.lexists(path) and not self.overwrite:
            self.kept += 1
            return
        try:
            atomic_replace(path, data)
        except OSError as exc:
            raise OutputError(f"cannot write {path}: {why(exc)}") from None
        self.written += 1

    def write_sidecar(self, image: str, caption: str) -> None:
        self._new_file(sidecar_path(image), (caption + "\n").encode("utf-8"))

    def write_xmp(self, image: str, caption: str) -> None:
        path = xmp_path(image)
        if self.overwrite and os.path.isfile(path):
            # An existing sidecar may hold a raw editor's history (darktable) or tags: change
            # only its description.
            try:
                data = with_description(Path(path).read_bytes(), caption, exif=False)
            except (RuntimeError, OSError) as exc:
                raise OutputError(f"{path} exists and is not an XMP file exiv2 can update ({exc})") from None
            try:
                atomic_replace(path, data)
            except OSError as exc:
                raise OutputError(f"cannot write {path}: {why(exc)}") from None
            self.written += 1
            return
        self._new_file(path, xmp_packet(caption).encode("utf-8"))

    def write_embedded(self, image: str, caption: str) -> None:
        """The caption into the photo's own XMP and EXIF, atomically, keeping its permissions and
        modification time. A photo that already has a description (not blank, not this caption)
        keeps it unless overwrite."""
        target = os.path.realpath(image)        # a symbolic link stays a link to the new file
        try:
            if not stat.S_ISREG(os.stat(target).st_mode):
                raise OutputError("not a regular file")
            try:     # the metadata alone first: a resumed run reads no more of each photo
                existing = [d.strip() for d in read_descriptions(target)]
            except (RuntimeError, UnicodeError):     # unsupported format, or a name exiv2 cannot take
                existing = None
            if existing is not None and all(d == caption for d in existing):
                return                        # already there (a resumed run)
            data = Path(target).read_bytes()
        except OSError as exc:
            raise OutputError(f"cannot read {image}: {why(exc)}") from None
        try:
            if existing is None:
                existing = [d.strip() for d in read_descriptions(data)]
            if any(d and d != caption for d in existing) and not self.overwrite:
                self.kept += 1
                return
            updated = with_description(data, caption)
        except RuntimeError as exc:
            raise OutputError(f"cannot write metadata into this file ({exc}); "
                              "--xmp writes a sidecar instead") from None
        try:
            atomic_replace(target, updated, like=target)
        except OSError as exc:
            raise OutputError(f"cannot write {image}: {why(exc)}") from None
        self.written += 1


class OutputError(Exception):
    """One output of one photo could not be written; the message says which and why."""


def sidecar_path(image: str) -> str:
    return os.fspath(Path(image).with_suffix(".txt")) if Path(image).suffix else image + ".txt"


def xmp_path(image: str) -> str:
    return image + ".xmp"


# ---------------------------------------------------------------------------------------------
# Caption rows
def caption_row(image: str, caption, words: bool = False) -> dict[str, Any]:
    """One output row for a Caption; words adds [[word, probability], ...] (for the gallery)."""
    row: dict[str, Any] = {"image": image, "caption": caption.text, "score": round(caption.score, 4)}
    if words:
        row["words"] = [[w, round(p, 4)] for w, p in zip(caption.words, caption.word_probs)]
    return row


def error_row(image: str, reason: str) -> dict[str, Any]:
    """One output row for an input that could not be captioned."""
    return {"image": image, "error": reason}


# ---------------------------------------------------------------------------------------------
# The HTML contact sheet
THUMBNAIL_SIZE = 200          # longest side in pixels
THUMBNAIL_QUALITY = 70
ROWS_ID = "captioner-rows"    # the <script type="application/json"> holding the rows


def confidence_color(percent: int) -> str:
    """Pastel red (unsure) through yellow to green (sure), as a hex colour."""
    red, green, blue = colorsys.hls_to_rgb(percent / 100 * 125 / 360, 0.45, 0.7)
    return f"#{round(red * 255):02x}{round(green * 255):02x}{round(blue * 255):02x}"


def thumbnail(path: str) -> str:
    """A small JPEG of the photo, upright, as a data: URI ('' when it cannot be read)."""
    from .preprocess import open_image

    try:
        image = open_image(path, target_size=THUMBNAIL_SIZE)
        image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=THUMBNAIL_QUALITY)
    except Exception:      # a thumbnail is a convenience: the row is shown without one
        return ""
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _json_in_html(value: Any) -> str:
    # "<" escaped: the data can never close the <script> element or open a comment.
    return json.dumps(value, ensure_ascii=False).replace("<", "\\u003c")


def _words_html(row: dict) -> str:
    words = row.get("words")
    if not isinstance(words, list) or not words:
        return html.escape(str(row.get("caption", "")))
    spans = []
    for word, probability in words:
        percent = max(0, min(100, round(100 * float(probability))))
        spans.append(f'<span class="w" style="background:{confidence_color(percent)}" '
                     f'title="{percent}%" data-p="{float(probability):.4f}">{html.escape(str(word))}</span>')
    return " ".join(spans)


def _card_html(index: int, row: dict) -> str:
    name = html.escape(str(row.get("image", "")))
    image = (f'<img data-row="{index}" src="{html.escape(row["thumbnail"])}" alt="{name}">'
             if row.get("thumbnail") else '<div class="none">no preview</div>')
    lines = [f'<figure class="card{" failed" if row.get("error") else ""}">', image,
             f'<figcaption><div class="name">{name}</div>']
    if row.get("caption"):
        score = row.get("score")
        lines.append(f'<p class="caption">{_words_html(row)}</p>')
        if isinstance(score, (int, float)):
            lines.append(f'<div class="score">score {score:.3f}</div>')
    if row.get("error"):
        lines.append(f'<p class="error">{html.escape(str(row["error"]))}</p>')
    lines.append("</figcaption></figure>")
    return "\n".join(lines)


GALLERY_CSS = """
body { font: 15px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 1.5rem; color: #222; }
h1 { font-size: 1.4rem; margin: 0 0 .3rem; } .summary { color: #555; margin-bottom: 1rem; }
.legend span { padding: 0 .35em; border-radius: 3px; }
.sheet { display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: 1rem; }
.card { margin: 0; border: 1px solid #ddd; border-radius: 8px; padding: .6rem; background: #fff; }
.card.failed { border-color: #c33; }
.card img { display: block; max-width: 100%; max-height: 200px; margin: 0 auto .4rem; border-radius: 4px; }
.none { height: 80px; display: grid; place-items: center; color: #999; background: #f4f4f4; }
.name { font-size: .8rem; color: #666; word-break: break-all; }
.caption { margin: .3rem 0; font-size: 1.05rem; } .w { padding: 0 .2em; border-radius: 3px; cursor: help; }
.score { font-size: .75rem; color: #777; } .error { color: #b00; margin: .3rem 0; }
"""


def render_gallery(rows: list[dict], title: str = "Captions") -> str:
    """The contact sheet: one self-contained HTML file (inline CSS and thumbnails, no script to
    run, nothing fetched). Every value from a row is HTML-escaped. The rows (without their
    thumbnails) are kept in a JSON <script> block, so a resumed run can read them back."""
    rows = sorted(rows, key=lambda r: str(r.get("image", "")))
    captioned = sum(1 for r in rows if r.get("caption") and not r.get("error"))
    failed = sum(1 for r in rows if r.get("error"))
    legend = " ".join(f'<span style="background:{confidence_color(p)}">{p}%</span>' for p in (10, 40, 70, 100))
    data = [{k: v for k, v in row.items() if k != "thumbnail"} for row in rows]
    cards = "\n".join(_card_html(i, row) for i, row in enumerate(rows))
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f'<meta name="generator" content="captioner">\n<title>{html.escape(title)}</title>\n'
            f'<style>{GALLERY_CSS}</style>\n</head>\n<body>\n<h1>{html.escape(title)}</h1>\n'
            f'<div class="summary">{captioned} captioned, {failed} failed. Word colour: the model\'s '
            f'probability of the word (hover a word for it): <span class="legend">{legend}</span></div>\n'
            f'<main class="sheet">\n{cards}\n</main>\n'
            f'<script type="application/json" id="{ROWS_ID}">{_json_in_html(data)}</script>\n'
            '</body>\n</html>\n')


_ROWS_RE = re.compile(f'<script type="application/json" id="{ROWS_ID}">(.*?)</script>', re.S)
_THUMB_RE = re.compile(r'<img data-row="(\d+)" src="(data:image/jpeg;base64,[A-Za-z0-9+/=]*)"')


def read_gallery(text: str) -> list[dict]:
    """The rows a gallery holds, with their thumbnails. ValueError if it is not a gallery."""
    found = _ROWS_RE.search(text)
    if found is None:
        raise ValueError("it holds no captioner rows")
    rows = json.loads(found.group(1))
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError("its rows are not a list of objects")
    for index, uri in _THUMB_RE.findall(text):
        if int(index) < len(rows):
            rows[int(index)]["thumbnail"] = uri
    return rows


@dataclass
class Gallery:
    """The rows of a gallery being written; `save` renders them all (with a thumbnail made
    once per photo)."""
    path: str
    rows: list[dict] = field(default_factory=list)
    make_thumbnail: Callable[[str], str] = thumbnail

    def add(self, rows: Iterable[dict]) -> None:
        for row in rows:
            row = dict(row)
            if "thumbnail" not in row and not row.get("error") and row.get("image"):
                row["thumbnail"] = self.make_thumbnail(row["image"])
            self.rows.append(row)

    def render(self) -> str:
        return render_gallery(self.rows, title=f"Captions: {Path(self.path).stem}")
