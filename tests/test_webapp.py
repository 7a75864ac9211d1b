"""The web UI: the caption callbacks (one photo, many photos and zips) called directly, then the app
served in this process and called through gradio_client, including bad uploads that must not take
the server down."""
from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import stat
import struct
import zipfile
import zlib
from pathlib import Path

import gradio as gr
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from captioner import uploads as uploads_module
from captioner import webapp
from captioner.uploads import collect_uploads
from captioner.webapp import BadRequest, CaptionService

# Gradio's queue calls pandas APIs that pandas 3 deprecates: its business, not this project's.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:gradio.queueing")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.jpg"))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but holds a few bytes of pixels: what a decompression
    bomb looks like to a header reader (decoding it would need width*height*3 bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    contents = {
        "text": ("notes.jpg", b"a text file with an image's name\n"),
        "empty": ("empty.png", b""),
        "truncated": ("truncated.jpg", EXAMPLES[0].read_bytes()[:4000]),  # header, part of the scan
        "huge": ("huge.png", png_header_only(9000, 8000)),       # 72 MP: over the app's limit
        "bomb": ("bomb.png", png_header_only(30000, 30000)),     # 900 MP: Pillow's bomb check
    }
    folder = tmp_path_factory.mktemp("bad_uploads")
    files = {}
    for key, (name, data) in contents.items():
        files[key] = folder / name
        files[key].write_bytes(data)
    return files


@contextlib.contextmanager
def running_app(captioner):
    """The app served on loopback (Gradio picks a free port from 7860 up) until the block ends."""
    app = webapp.build_app(captioner)
    _, url, _ = webapp.launch(app, port=None, prevent_thread_lock=True, quiet=True)
    try:
        yield app, url
    finally:
        app.close()


def test_examples_are_real_photos():
    assert 4 <= len(EXAMPLES) <= 8
    assert webapp.example_images() == [str(p) for p in EXAMPLES]


def test_caption_callback_matches_the_api(tiny_captioner):
    service = CaptionService(tiny_captioner)
    photo = EXAMPLES[0]
    result = service.caption(str(photo), method="beam", beam_size=3, num_captions=3)
    expected = tiny_captioner.caption(photo, method="beam", beam_size=3, n_best=3)
    assert result.caption and result.caption == expected.text
    assert [w for w, _ in result.words] == result.caption.split()
    percents = [int(label.rstrip("%")) for _, label in result.words]
    assert percents == [round(100 * p) for p in expected.word_probs]
    assert all(label in webapp.CONFIDENCE_COLORS for _, label in result.words)
    assert result.candidates[0][0] == result.caption
    scores = [score for _, score in result.candidates]
    assert scores == sorted(scores, reverse=True) and 1 <= len(scores) <= 3


def test_caption_callback_methods(tiny_captioner):
    service = CaptionService(tiny_captioner)
    photo = str(EXAMPLES[1])
    greedy = service.caption(photo, method="greedy", num_captions=5)
    assert greedy.caption == tiny_captioner.caption(photo, method="greedy").text
    assert len(greedy.candidates) == 1                       # greedy has one caption only
    sampled = service.caption(photo, method="sample", temperature=0.7, top_p=0.9, num_captions=4)
    assert sampled.caption and 1 <= len(sampled.candidates) <= 4
    assert len({text for text, _ in sampled.candidates}) == len(sampled.candidates)


def test_bad_inputs_get_a_clear_message(tiny_captioner, bad_files):
    service = CaptionService(tiny_captioner)
    cases = [(None, "No image"), ({"path": None}, "No image"),
             (str(bad_files["text"]), "not an image"), (str(bad_files["empty"]), "not an image"),
             (str(bad_files["truncated"]), "Could not read this image"),
             (str(bad_files["huge"]), "too large: 9000x8000"),
             (str(bad_files["bomb"]), "far too large")]
    for image, message in cases:
        with pytest.raises(BadRequest, match=message):
            service.caption(image)
    with pytest.raises(BadRequest, match="Unknown method"):
        service.caption(str(EXAMPLES[0]), method="magic")
    with pytest.raises(BadRequest, match="Temperature"):
        service.caption(str(EXAMPLES[0]), method="sample", temperature=0)
    # The Gradio callback turns them into gr.Error, which the page shows as a message.
    with pytest.raises(gr.Error, match="not an image"):
        service.handle(str(bad_files["text"]), "beam", 3, 1.0, 1.0, 3)


def test_model_card_shows_what_the_checkpoint_has(tiny_captioner):
    card = webapp.model_card(tiny_captioner)
    assert "efficientnet_lite0" in card and f"{len(tiny_captioner.vocab):,} words" in card
    nested = {"split": "test", "method": "beam", "scores": {"CIDEr": 0.5123, "BLEU-4": 0.2}}
    for info, expected in [({}, "stores no evaluation scores"),
                           ({"test_scores": {"BLEU-4": 0.2, "CIDEr": 0.5123}}, "| BLEU-4 | CIDEr |"),
                           ({"test_scores": nested}, "(split test, method beam)"),
                           ({"val_scores": {"CIDEr": 0.4}}, "Validation scores")]:
        original = tiny_captioner.info
        tiny_captioner.info = info
        try:
            assert expected in webapp.model_card(tiny_captioner)
        finally:
            tiny_captioner.info = original
    assert "0.512" in webapp.score_table(nested)


def test_served_app_through_gradio_client(tiny_captioner, bad_files):
    photo = EXAMPLES[2]
    expected = tiny_captioner.caption(photo, method="beam", beam_size=3).text
    with running_app(tiny_captioner) as (app, url):
        assert url.startswith("http://127.0.0.1:")
        assert app.analytics_enabled is False and not app.share
        assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
        client = Client(url, verbose=False)
        caption, words, table = client.predict(handle_file(str(photo)), api_name="/caption")
        assert caption == expected
        assert [w["token"] for w in words] == caption.split()
        assert table["data"][0][0] == caption
        for name, message in [("text", "not an image"), ("bomb", "too large")]:
            with pytest.raises(AppError, match=message):
                client.predict(handle_file(str(bad_files[name])), api_name="/caption")
        # The server kept serving, and the optional parameters are honoured.
        greedy = client.predict(handle_file(str(photo)), "greedy", api_name="/caption")
        assert greedy[0] == tiny_captioner.caption(photo, method="greedy").text
        assert len(greedy[2]["data"]) == 1


def load_app_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("captioner_app", ROOT / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_app_without_a_model_says_so(monkeypatch, capsys, tmp_path):
    app = load_app_module()
    monkeypatch.setattr(webapp, "default_checkpoint", lambda: tmp_path / "model.safetensors")
    assert app.main([]) == 2
    assert "not there yet" in capsys.readouterr().err
    assert app.main(["--checkpoint", str(tmp_path / "missing.safetensors")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        app.main(["--port", "not-a-number"])
    assert exit_info.value.code == 2


# Decoding settings as an API client may send them: wrong types, null, out of range.
BAD_SETTINGS = [
    (dict(method=None), "Unknown method None"),
    (dict(method=5), "Unknown method 5"),
    (dict(method="beam_search"), "Unknown method 'beam_search'"),
    (dict(beam_size="3"), "Beam size must be a whole number from 1 to 10 (got '3')"),
    (dict(beam_size=None), "Beam size must be a whole number"),
    (dict(beam_size=-3), "(got -3)"),
    (dict(beam_size=0), "Beam size must be a whole number"),
    (dict(beam_size=10**12), "(got 1000000000000)"),
    (dict(beam_size=2.5), "Beam size must be a whole number"),
    (dict(beam_size=True), "Beam size must be a whole number"),
    (dict(beam_size=float("nan")), "Beam size must be a whole number"),
    (dict(temperature="hot"), "Temperature must be a number above 0 and at most 5 (got 'hot')"),
    (dict(temperature=None), "Temperature must be a number"),
    (dict(temperature=0), "Temperature must be a number"),
    (dict(temperature=1e300), "Temperature must be a number"),
    (dict(top_p="0.9"), "Top-p must be a number above 0 and at most 1"),
    (dict(top_p=1.5), "Top-p must be a number"),
    (dict(top_p=[0.9]), "Top-p must be a number"),
    (dict(num_captions="3"), "Number of captions must be a whole number from 1 to 5"),
    (dict(num_captions=10**9), "Number of captions must be a whole number"),
    (dict(num_captions={"n": 3}), "Number of captions must be a whole number"),
]
GOOD_SETTINGS = dict(method="beam", beam_size=3, temperature=1.0, top_p=1.0, num_captions=3)


@pytest.mark.parametrize("change, message", BAD_SETTINGS)
def test_wrong_setting_types_get_the_friendly_message(tiny_captioner, change, message):
    service = CaptionService(tiny_captioner)
    settings = {**GOOD_SETTINGS, **change}
    with pytest.raises(gr.Error) as info:
        service.handle(str(EXAMPLES[0]), *settings.values())
    assert message in str(info.value.message)


def test_whole_numbers_may_come_as_floats(tiny_captioner):
    """A slider may send 3.0 for 3."""
    service = CaptionService(tiny_captioner)
    floats = service.caption(str(EXAMPLES[0]), "beam", 3.0, 1, 1, 2.0)
    ints = service.caption(str(EXAMPLES[0]), "beam", 3, 1.0, 1.0, 2)
    assert floats == ints


def test_served_api_refuses_wrong_setting_types_and_keeps_serving(tiny_captioner):
    photo = handle_file(str(EXAMPLES[0]))
    with running_app(tiny_captioner) as (_, url):
        client = Client(url, verbose=False)
        for change, message in [(dict(beam_size="three"), "Beam size must be a whole number"),
                                (dict(method=None), "Unknown method None"),
                                (dict(beam_size=-3), "(got -3)"),
                                (dict(temperature="hot"), "Temperature must be a number"),
                                (dict(num_captions=10**9), "Number of captions must be a whole number")]:
            settings = {**GOOD_SETTINGS, **change}
            with pytest.raises(AppError, match=re.escape(message)):
                client.predict(photo, *settings.values(), api_name="/caption")
        caption, _, _ = client.predict(photo, *GOOD_SETTINGS.values(), api_name="/caption")
        assert caption == tiny_captioner.caption(EXAMPLES[0], method="beam", beam_size=3).text


def test_pyproject_declares_the_gradio_versions_the_code_runs_on():
    """The code uses Gradio 6 APIs (launch(theme=, css=), Textbox(buttons=)): the declared range
    must hold the installed versions the suite runs with."""
    tomllib = pytest.importorskip("tomllib")
    from importlib.metadata import version

    from packaging.requirements import Requirement

    declared = [Requirement(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())
                ["project"]["dependencies"]]
    for name in ("gradio", "gradio_client"):
        (requirement,) = [r for r in declared if r.name.replace("-", "_") == name]
        assert requirement.specifier.contains(version(name)), (name, str(requirement), version(name))
        assert not requirement.specifier.contains("5.49.0" if name == "gradio" else "1.13.0")


# ---------------------------------------------------------------------------------------------
# Many photos: files and zips -> a table filled in as photos finish, CSV / JSON Lines downloads
def photo_zip(path: Path, members: dict[str, bytes | Path]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data.read_bytes() if isinstance(data, Path) else data)
    return path


@pytest.fixture
def many_uploads(tmp_path, bad_files) -> list[str]:
    """Two photos, a zip (nested folders, a name climbing out of it, a non-image, macOS
    metadata, a bad image) and a text file named like a photo."""
    archive = photo_zip(tmp_path / "holiday.zip", {
        "day 1/beach/first.jpg": EXAMPLES[1], "../../climbing.jpg": EXAMPLES[2],
        "notes.txt": b"not a photo", "__MACOSX/day 1/._first.jpg": b"\x00\x05\x16\x07",
        "broken.png": b"not a png", "day 2/": b""})
    return [str(EXAMPLES[0]), str(archive), str(bad_files["text"]), str(EXAMPLES[3])]


def many_uploads_dir(uploads: list[str]) -> Path:
    return Path(uploads[1]).parent


def read_downloads(downloads: tuple[str, str]) -> tuple[list[dict], list[dict]]:
    csv_path, jsonl_path = downloads
    with open(csv_path, newline="") as f:
        csv_rows = list(csv.DictReader(f))
    return csv_rows, [json.loads(line) for line in Path(jsonl_path).read_text().splitlines()]


def test_caption_many_callback(tiny_captioner, many_uploads, tmp_path):
    service = CaptionService(tiny_captioner)
    updates = list(service.caption_many(many_uploads, "beam", 3, 1.0, 1.0, 3))
    final = updates[-1]
    assert updates[0].rows == [] and all(u.downloads is None for u in updates[:-1])
    names = [row["image"] for row in final.rows]
    assert names == [EXAMPLES[0].name, "holiday.zip/day 1/beach/first.jpg", "holiday.zip/../../climbing.jpg",
                     "holiday.zip/broken.png", "notes.jpg", EXAMPLES[3].name]
    assert final.total == 6 and final.ignored == 2              # notes.txt, the macOS metadata
    assert not (tmp_path.parent / "climbing.jpg").exists() and not (tmp_path / "climbing.jpg").exists()
    photos = [EXAMPLES[0], EXAMPLES[1], EXAMPLES[2], EXAMPLES[3]]
    # The caption the one-photo tab shows first, for the same settings.
    expected = [service.caption(str(p), "beam", 3, 1.0, 1.0, 3).candidates[0] for p in photos]
    captioned = [row for row in final.rows if "caption" in row]
    assert [[row["caption"], round(row["score"], 2)] for row in captioned] == expected
    errors = {row["image"]: row["error"] for row in final.rows if "error" in row}
    assert set(errors) == {"holiday.zip/broken.png", "notes.jpg"}
    assert all(error.startswith("not an image") for error in errors.values())
    assert "4 captioned, 2 could not be captioned" in final.summary() and "2 files in zips ignored" in final.summary()
    # The downloads are the batch CLI's rows, in its CSV and JSON Lines formats.
    csv_rows, jsonl_rows = read_downloads(final.downloads)
    assert jsonl_rows == final.rows
    assert list(csv_rows[0]) == ["image", "caption", "score", "error"]
    assert [r["image"] for r in csv_rows] == names and csv_rows[3]["error"] == errors["holiday.zip/broken.png"]
    table = final.table()
    assert [row[0] for row in table] == names and table[3][2] is None and table[3][3] == errors["holiday.zip/broken.png"]


def test_caption_many_refuses_what_cannot_start(tiny_captioner, monkeypatch):
    service = CaptionService(tiny_captioner)
    for files, message in [(None, "No photos"), ([], "No photos")]:
        with pytest.raises(BadRequest, match=message):
            list(service.caption_many(files))
    with pytest.raises(BadRequest, match="Beam size"):
        list(service.caption_many([str(EXAMPLES[0])], "beam", 0))
    monkeypatch.setattr(webapp, "MAX_PHOTOS", 2)
    with pytest.raises(BadRequest, match="at most 2"):
        list(service.caption_many([str(p) for p in EXAMPLES[:3]]))
    with pytest.raises(gr.Error, match="at most 2"):
        list(service.handle_many([str(p) for p in EXAMPLES[:3]], "beam", 3, 1.0, 1.0, 3))


def test_zips_are_untrusted(tmp_path, monkeypatch):
    """No path from the zip is used on disk; limits on entries and uncompressed size hold even
    when the zip lies about sizes; links, corrupt data and non-zips are error rows."""
    photo = EXAMPLES[0].read_bytes()
    work = tmp_path / "work"
    work.mkdir()
    outside = tmp_path / "outside"
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("../outside/escaped.jpg", photo)
        zf.writestr(f"{tmp_path}/outside/absolute.jpg", photo)
        link = zipfile.ZipInfo("link.jpg")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    uploads = collect_uploads([str(archive)], work, max_photos=10)
    assert [u.name for u in uploads.items] == ["evil.zip/../outside/escaped.jpg",
                                              f"evil.zip/{tmp_path}/outside/absolute.jpg", "evil.zip/link.jpg"]
    assert not outside.exists()
    for upload in uploads.items[:2]:
        assert Path(upload.path).resolve().parent.parent == work.resolve()
        assert Path(upload.path).read_bytes() == photo
    assert uploads.items[2].path is None and "symbolic link" in uploads.items[2].error

    monkeypatch.setattr(uploads_module, "MAX_ZIP_MEMBERS", 3)
    many = photo_zip(tmp_path / "many.zip", {f"{i}.jpg": photo for i in range(4)})
    (row,) = collect_uploads([str(many)], work, max_photos=10).items
    assert row.path is None and "4 entries; the limit is 3" in row.error

    monkeypatch.setattr(uploads_module, "MAX_ZIP_BYTES", 2**20)
    bomb = photo_zip(tmp_path / "bomb.zip", {"zeros.bmp": bytes(2 * 2**20)})
    with zipfile.ZipFile(bomb) as zf:
        assert zf.infolist()[0].compress_size < 20_000
    (row,) = collect_uploads([str(bomb)], work, max_photos=10).items
    assert row.path is None and "the limit is 1 MB" in row.error
    # A zip that understates a member's size: zipfile stops at the declared size, the CRC fails.
    liar = bytearray(photo_zip(tmp_path / "liar.zip", {"big.bmp": bytes(2 * 2**20)}).read_bytes())
    central = liar.rfind(b"PK\x01\x02")
    liar[central + 24:central + 28] = struct.pack("<I", 1000)             # uncompressed size: 1000
    (tmp_path / "liar.zip").write_bytes(bytes(liar))
    (row,) = collect_uploads([str(tmp_path / "liar.zip")], work, max_photos=10).items
    assert row.path is None and row.error

    (tmp_path / "fake.zip").write_bytes(b"PK not really")
    (row,) = collect_uploads([str(tmp_path / "fake.zip")], work, max_photos=10).items
    assert row.path is None and "not a zip file that can be read" in row.error
    empty = photo_zip(tmp_path / "text.zip", {"readme.txt": b"hi"})
    uploads = collect_uploads([str(empty)], work, max_photos=10)
    assert [(u.path, u.error) for u in uploads.items] == [(None, "no images in this zip")] and uploads.ignored == 1


def test_served_caption_many_through_gradio_client(tiny_captioner, many_uploads):
    service = CaptionService(tiny_captioner)
    expected = list(service.caption_many(many_uploads, "greedy", 3, 1.0, 1.0, 1))[-1]
    with running_app(tiny_captioner) as (_, url):
        client = Client(url, verbose=False)
        table, csv_file, jsonl_file, summary = client.predict(
            [handle_file(p) for p in many_uploads], "greedy", api_name="/caption_many")
        assert [row[:2] for row in table["data"]] == [row[:2] for row in expected.table()]
        assert table["headers"] == webapp.MANY_HEADERS
        assert read_downloads((csv_file, jsonl_file))[1] == expected.rows
        assert "4 captioned, 2 could not be captioned" in summary
        with pytest.raises(AppError, match="No photos"):
            client.predict([], api_name="/caption_many")
        # More photos than one engine batch: image-reading processes start from the server.
        assert len(EXAMPLES) * 2 > webapp.MANY_BATCH
        twice = photo_zip(many_uploads_dir(many_uploads) / "twice.zip",
                          {f"{round}/{p.name}": p for round in ("a", "b") for p in EXAMPLES})
        table, _, jsonl_file, summary = client.predict([handle_file(str(twice))], "greedy", api_name="/caption_many")
        captions = [row[1] for row in table["data"]]
        assert len(captions) == 2 * len(EXAMPLES) and captions[:len(EXAMPLES)] == captions[len(EXAMPLES):]
        assert captions[0] == expected.rows[0]["caption"] and f"{2 * len(EXAMPLES)} captioned" in summary
        # the one-photo endpoint still answers beside it
        assert client.predict(handle_file(str(EXAMPLES[0])), api_name="/caption")[0]
