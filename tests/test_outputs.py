"""Outputs people use: `captioner caption --sidecar txt --xmp --embed -o gallery.html`, each alone,
together and resumed. The XMP is read back by exiv2 (pyexiv2), embedded photos are decoded
before and after (identical pixels), the gallery is parsed back (and opened in chromium in
test_browser.py)."""
from __future__ import annotations

import html.parser
import json
import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner import outputs
from captioner.cli import main

pyexiv2 = pytest.importorskip("pyexiv2")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.jpg"))
TRICKY = 'a <b>dog</b> & "cat" \u00e9t\u00e9 \u2014 caf\u00e9'
NS = {"x": "adobe:ns:meta/", "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
      "dc": "http://purl.org/dc/elements/1.1/"}


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main(["caption", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def caption_args(checkpoint) -> list:
    return ["--checkpoint", checkpoint, "--method", "greedy", "--workers", 0, "--quiet"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def photos(folder: Path, count: int = 3) -> list[Path]:
    """Small copies of the example photos (fast to caption)."""
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for i, source in enumerate(EXAMPLES[:count]):
        path = folder / f"p{i}.jpg"
        with Image.open(source) as image:
            image.convert("RGB").resize((96, 72)).save(path, quality=90)
        made.append(path)
    return made


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGBA"))


def described(path: Path) -> tuple[str, str]:
    """(XMP dc:description x-default, EXIF ImageDescription) as exiv2 reads them from the file."""
    return outputs.read_descriptions(path.read_bytes())


# ---------------------------------------------------------------------------------------------
def test_xmp_packet_is_xml_with_the_description_as_x_default(tmp_path):
    packet = outputs.xmp_packet(TRICKY + "\x01")          # a control character XML cannot hold
    root = ET.fromstring(packet.split("?>", 1)[1].rsplit("<?xpacket", 1)[0])
    items = root.findall("rdf:RDF/rdf:Description/dc:description/rdf:Alt/rdf:li", NS)
    assert [(li.get("{http://www.w3.org/XML/1998/namespace}lang"), li.text) for li in items] == [
        ("x-default", TRICKY)]
    # exiv2 (what digiKam is built on) reads the sidecar file as XMP
    sidecar = tmp_path / "photo.jpg.xmp"
    sidecar.write_text(packet, encoding="utf-8")
    with pyexiv2.Image(str(sidecar)) as image:
        assert image.read_xmp()["Xmp.dc.description"] == {'lang="x-default"': TRICKY}


def test_sidecar_txt_and_xmp_hold_the_caption_and_existing_ones_are_kept(tmp_path, tiny_checkpoint, capsys):
    folder = tmp_path / "photos"
    made = photos(folder)
    (folder / "p0.txt").write_text("my own caption\n")         # the user's: kept
    out = tmp_path / "out.jsonl"
    code, _, _ = run_cli(capsys, folder, "-o", out, "--sidecar", "txt", "--xmp", *caption_args(tiny_checkpoint))
    assert code == 0
    captions = {row["image"]: row["caption"] for row in read_jsonl(out)}
    assert (folder / "p0.txt").read_text() == "my own caption\n"
    for path in made[1:]:
        assert path.with_suffix(".txt").read_text(encoding="utf-8") == captions[str(path)] + "\n"
    for path in made:
        with pyexiv2.Image(f"{path}.xmp") as sidecar:
            assert sidecar.read_xmp()["Xmp.dc.description"] == {'lang="x-default"': captions[str(path)]}
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [p.name for p in made] + [f"{p.stem}.txt" for p in made] + [f"{p.name}.xmp" for p in made])

    # --overwrite replaces the sidecars; an existing XMP keeps its other properties
    with pyexiv2.Image(f"{made[0]}.xmp") as sidecar:
        sidecar.modify_xmp({"Xmp.dc.subject": ["holiday"], "Xmp.dc.description": "old"})
    code, _, stderr = run_cli(capsys, folder, "-o", out, "--sidecar", "txt", "--xmp", "--overwrite",
                              *caption_args(tiny_checkpoint))
    assert code == 0, stderr
    assert (folder / "p0.txt").read_text() == captions[str(made[0])] + "\n"
    with pyexiv2.Image(f"{made[0]}.xmp") as sidecar:
        xmp = sidecar.read_xmp()
    assert xmp["Xmp.dc.description"] == {'lang="x-default"': captions[str(made[0])]}
    assert xmp["Xmp.dc.subject"] == ["holiday"]


def embed_formats(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    with Image.open(EXAMPLES[0]) as source:
        base = source.convert("RGB").resize((80, 60))
    files = {}
    for name, fmt, options in [("a.jpg", "JPEG", {"quality": 85}), ("b.png", "PNG", {}),
                               ("c.webp", "WEBP", {"lossless": True}), ("d.tiff", "TIFF", {}),
                               ("e.gif", "GIF", {}), ("f.bmp", "BMP", {})]:
        files[name] = folder / name
        base.save(files[name], fmt, **options)
    return files


def test_embed_writes_xmp_and_exif_keeps_pixels_and_mtime(tmp_path, tiny_checkpoint, capsys):
    files = embed_formats(tmp_path / "photos")
    old_time = 1_500_000_000
    for path in files.values():
        os.utime(path, (old_time, old_time))
    before = {name: pixels(path) for name, path in files.items()}
    out = tmp_path / "out.jsonl"
    code, _, stderr = run_cli(capsys, tmp_path / "photos", "-o", out, "--embed", *caption_args(tiny_checkpoint))
    assert code == 1                                        # GIF and BMP cannot hold metadata
    rows = {Path(row["image"]).name: row for row in read_jsonl(out)}
    for name in ("a.jpg", "b.png", "c.webp", "d.tiff"):
        path = files[name]
        assert "error" not in rows[name], rows[name]
        assert described(path) == (rows[name]["caption"], rows[name]["caption"])
        assert np.array_equal(pixels(path), before[name]), name     # pixels untouched
        assert path.stat().st_mtime == old_time
    for name in ("e.gif", "f.bmp"):
        assert rows[name]["caption"]                          # captioned, then the embed failed
        assert rows[name]["error"].startswith("--embed: cannot write metadata into this file")
        assert files[name].stat().st_mtime == old_time
        assert f"{files[name]}: --embed" in stderr
    assert "Traceback" not in stderr
    assert sorted(p.name for p in (tmp_path / "photos").iterdir()) == sorted(files)   # no temp files

    # A description the photo already had is the user's: kept unless --overwrite.
    mine = tmp_path / "mine.jpg"
    shutil.copy(files["a.jpg"], mine)
    mine.write_bytes(outputs.with_description(files["a.jpg"].read_bytes(), "my dog Rex"))
    code, _, stderr = run_cli(capsys, mine, "--embed", *caption_args(tiny_checkpoint)[:-1])
    assert code == 0 and described(mine) == ("my dog Rex", "my dog Rex")
    assert "1 existing sidecars or descriptions kept" in stderr
    code, stdout, _ = run_cli(capsys, mine, "--embed", "--overwrite", *caption_args(tiny_checkpoint))
    assert code == 0 and described(mine) == (json.loads(stdout)["caption"],) * 2


def test_embed_through_a_symlink_keeps_the_link(tmp_path, tiny_checkpoint, capsys):
    real = photos(tmp_path / "real", 1)[0]
    link = tmp_path / "link.jpg"
    link.symlink_to(real)
    code, stdout, _ = run_cli(capsys, link, "--embed", *caption_args(tiny_checkpoint))
    assert code == 0 and link.is_symlink()
    assert described(real)[0] == json.loads(stdout)["caption"]


class GalleryReader(html.parser.HTMLParser):
    """What a browser shows: the cards' file names, caption words with their hover titles."""

    def __init__(self):
        super().__init__()
        self.names, self.words, self.images, self._in = [], [], [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        cls = attrs.get("class", "")
        self._in = "name" if cls == "name" else "word" if cls == "w" else None
        if self._in == "word":
            self.words.append([None, attrs["title"]])

    def handle_data(self, data):
        if self._in == "name":
            self.names.append(data)
        elif self._in == "word":
            self.words[-1][0] = data

    def handle_endtag(self, tag):
        self._in = None


def read_page(path: Path) -> GalleryReader:
    reader = GalleryReader()
    reader.feed(path.read_text(encoding="utf-8"))
    return reader


def test_gallery_escapes_everything_and_resumes(tmp_path, tiny_checkpoint, capsys):
    folder = tmp_path / "photos"
    made = photos(folder, 2)
    tricky = folder / '<img src=x onerror=alert(1)> & "q".jpg'
    shutil.copy(made[0], tricky)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    gallery = tmp_path / "gallery.html"
    code, _, _ = run_cli(capsys, folder, "-o", gallery, *caption_args(tiny_checkpoint))
    assert code == 1
    page = gallery.read_text(encoding="utf-8")
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    reader = read_page(gallery)
    assert sorted(reader.names) == sorted(str(p) for p in [*made, tricky, folder / "broken.jpg"])
    assert len(reader.images) == 3 and all(src.startswith("data:image/jpeg;base64,") for src in reader.images)
    rows = {row["image"]: row for row in outputs.read_gallery(page)}
    assert rows[str(folder / "broken.jpg")]["error"]
    for path in made:
        row = rows[str(path)]
        assert [w for w, _ in row["words"]] == row["caption"].split()
        assert 0 < min(p for _, p in row["words"]) <= max(p for _, p in row["words"]) <= 1
    assert all(title.endswith("%") for _, title in reader.words)

    # Rerun: nothing captioned again, nothing lost; a new photo is added; the error is retried.
    (folder / "broken.jpg").unlink()
    new = photos(tmp_path / "more", 3)[2]
    shutil.copy(new, folder / "new.jpg")
    code, _, stderr = run_cli(capsys, folder, "-o", gallery, *caption_args(tiny_checkpoint)[:-1])
    assert code == 0
    assert "1 captioned, 0 failed, 3 already in" in stderr
    again = {row["image"]: row for row in outputs.read_gallery(gallery.read_text(encoding="utf-8"))}
    assert sorted(again) == sorted(str(p) for p in [*made, tricky, folder / "new.jpg"])
    for image, row in rows.items():
        if "error" not in row:
            assert again[image] == row                     # the same caption and words
    assert len(read_page(gallery).images) == 4


def test_gallery_refuses_a_foreign_html_file(tmp_path, tiny_checkpoint, capsys):
    page = tmp_path / "index.html"
    page.write_text("<html><body>my homepage</body></html>")
    code, _, stderr = run_cli(capsys, EXAMPLES[0], "-o", page, *caption_args(tiny_checkpoint))
    assert code == 2 and "not a captioner gallery" in stderr
    assert page.read_text() == "<html><body>my homepage</body></html>"


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def test_all_outputs_together_then_rerun_redoes_nothing(tmp_path, tiny_checkpoint, capsys):
    folder = tmp_path / "photos"
    made = photos(folder, 3)
    gallery = tmp_path / "gallery.html"
    args = [folder, "--sidecar", "txt", "--xmp", "--embed", "-o", gallery, *caption_args(tiny_checkpoint)[:-1]]
    code, _, stderr = run_cli(capsys, *args)
    assert code == 0 and "3 captioned, 0 failed" in stderr
    rows = {row["image"]: row for row in outputs.read_gallery(gallery.read_text(encoding="utf-8"))}
    for path in made:
        caption = rows[str(path)]["caption"]
        assert path.with_suffix(".txt").read_text() == caption + "\n"
        assert outputs.read_descriptions(Path(f"{path}.xmp").read_bytes())[0] == caption
        assert described(path) == (caption, caption)
    files, page = snapshot(folder), gallery.read_bytes()

    code, _, stderr = run_cli(capsys, *args)
    assert code == 0 and "0 captioned, 0 failed, 3 already in" in stderr
    assert snapshot(folder) == files                       # nothing rewritten, nothing lost
    assert outputs.read_gallery(gallery.read_text(encoding="utf-8")) == outputs.read_gallery(page.decode())


def test_an_output_added_on_the_rerun_is_written_from_the_captions_already_there(
        tmp_path, tiny_checkpoint, capsys):
    folder = tmp_path / "photos"
    made = photos(folder, 2)
    out = tmp_path / "out.csv"
    assert run_cli(capsys, folder, "-o", out, *caption_args(tiny_checkpoint))[0] == 0
    code, _, stderr = run_cli(capsys, folder, "-o", out, "--sidecar", "txt", *caption_args(tiny_checkpoint)[:-1])
    assert code == 0 and "0 captioned, 0 failed, 2 already in" in stderr
    import csv
    with open(out, newline="") as f:
        captions = {row["image"]: row["caption"] for row in csv.DictReader(f)}
    for path in made:
        assert path.with_suffix(".txt").read_text() == captions[str(path)] + "\n"
