"""`captioner caption` end to end on generated awkward and broken files: every Pillow format, odd
sizes, EXIF, bad files with one error row each, exit statuses, JSON Lines and CSV, resume after a
kill -9 with every image exactly once."""
from __future__ import annotations

import csv
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner.api import Captioner
from captioner.batch import PROVENANCE_SUFFIX, run_provenance
from captioner.checkpoint import read_checkpoint
from captioner.cli import main
from captioner.config import with_overrides

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# Generated files
def photo(flickr8k_tiny: Path, n: int = 0) -> Image.Image:
    return Image.open(sorted((flickr8k_tiny / "Images").glob("*.jpg"))[n]).convert("RGB")


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims width x height (a decompression bomb's header)."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    ihdr = 8 + 8                                  # signature, then length + b"IHDR"
    data[ihdr:ihdr + 8] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    crc = zlib.crc32(bytes(data[ihdr - 4:ihdr + 13]))
    data[ihdr + 13:ihdr + 17] = crc.to_bytes(4, "big")
    return bytes(data)


def make_good_images(folder: Path, flickr8k_tiny: Path) -> list[Path]:
    """Every format and mode Pillow reads, odd sizes and orientations; each must be captioned."""
    folder.mkdir(parents=True, exist_ok=True)
    base = photo(flickr8k_tiny, 0)
    small = base.resize((64, 48))
    made = {}

    def save(name, image, **options):
        made[name] = folder / name
        image.save(made[name], **options)

    save("photo.jpg", base, quality=90)
    save("grey16.png", Image.fromarray(np.asarray(small.convert("L"), dtype=np.uint16) * 257))   # I;16
    palette = small.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    save("palette_transparent.png", palette, transparency=0)
    rgba = small.convert("RGBA")
    rgba.putalpha(128)
    save("rgba.png", rgba)
    save("bilevel.png", small.convert("1"))
    save("grey_alpha.png", small.convert("LA"))
    save("cmyk.jpg", small.convert("CMYK"))
    frames = [small, small.rotate(90), small.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    save("animated.gif", frames[0], save_all=True, append_images=frames[1:], duration=100, loop=0)
    save("photo.webp", small)
    save("photo.tiff", small)
    save("photo.bmp", small)
    save("one_pixel.png", Image.new("RGB", (1, 1), (200, 30, 30)))
    save("thin_4000x12.png", Image.new("RGB", (4000, 12), (10, 120, 200)))
    save("large_6000x4500.jpg", base.resize((6000, 4500), Image.NEAREST), quality=70)
    exif = Image.Exif()
    exif[0x0112] = 6       # orientation: rotate 90 degrees clockwise to display
    save("exif_rotated.jpg", base.rotate(90, expand=True), exif=exif, quality=90)
    save("jpeg_named.dat", base, format="JPEG")                 # recognised by content
    save("no_extension", small, format="PNG")
    return list(made.values())


def make_bad_files(folder: Path, source_jpeg: Path) -> dict[Path, str]:
    """Each broken input and a word its error message must contain."""
    folder.mkdir(parents=True, exist_ok=True)
    data = source_jpeg.read_bytes()
    bad = {folder / "empty.jpg": "empty", folder / "truncated.jpg": "truncated",
           folder / "not_image.png": "not an image", folder / "random.jpg": "not an image",
           folder / "page.jpg": "not an image", folder / "bomb.png": "decompression bomb",
           folder / "huge_bomb.png": "decompression bomb", folder / "dangling.jpg": "dangling"}
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "not_image.png").write_text("just some text\n")
    (folder / "random.jpg").write_bytes(random.Random(0).randbytes(5000))
    (folder / "page.jpg").write_text("<!DOCTYPE html><html><body>404 Not Found</body></html>")
    # Just over Pillow's limit (a warning in Pillow, refused here) and far over it (an error).
    (folder / "bomb.png").write_bytes(png_claiming_size(10000, 9000))
    (folder / "huge_bomb.png").write_bytes(png_claiming_size(100000, 100000))
    os.symlink(folder / "gone.jpg", folder / "dangling.jpg")
    return bad


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main(["caption", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def mixed_folder(tmp_path, flickr8k_tiny):
    folder = tmp_path / "mixed"
    good = make_good_images(folder, flickr8k_tiny)
    bad = make_bad_files(folder, sorted((flickr8k_tiny / "Images").glob("*.jpg"))[1])
    (folder / "holiday.jpg").mkdir()                    # a directory named like an image
    (folder / "holiday.jpg" / "inside.png").write_bytes((folder / "photo.bmp").read_bytes())
    (folder / "notes.txt").write_text("not an image and not named like one: ignored\n")
    return folder, good, bad


# ---------------------------------------------------------------------------------------------
def test_mixed_folder_captions_good_files_and_reports_bad_ones(mixed_folder, tiny_checkpoint, capsys, tmp_path):
    folder, good, bad = mixed_folder
    out = tmp_path / "out.jsonl"
    code, stdout, stderr = run_cli(capsys, folder, "-o", out, "--checkpoint", tiny_checkpoint,
                                   "--method", "greedy", "--batch-size", 4, "--workers", 2)
    assert code == 1                                    # some inputs failed, the rest were done
    assert stdout == ""
    rows = read_jsonl(out)
    by_image = {row["image"]: row for row in rows}
    assert len(by_image) == len(rows) == len(good) + len(bad)
    for path in good:
        row = by_image[str(path)]
        assert "error" not in row and row["caption"].strip(), row
        assert isinstance(row["score"], float)
    for path, word in bad.items():
        assert set(by_image[str(path)]) == {"image", "error"}
        assert word in by_image[str(path)]["error"], by_image[str(path)]
    assert str(folder / "notes.txt") not in by_image    # not an image, not named like one
    assert not any("holiday.jpg" in image for image in by_image)   # a folder, not recursed
    warning_lines = [line for line in stderr.splitlines() if "warning" in line]
    assert len(warning_lines) == len(bad)
    assert all(str(path) in stderr for path in bad)
    assert "Traceback" not in stderr
    assert f"{len(good)} captioned, {len(bad)} failed" in stderr.splitlines()[-1]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode, so "
                                               "chmod 000 cannot make one unreadable")
def test_unreadable_file_is_an_error_row(tmp_path, flickr8k_tiny, tiny_checkpoint, capsys):
    locked = tmp_path / "locked.jpg"
    shutil.copy(sorted((flickr8k_tiny / "Images").glob("*.jpg"))[0], locked)
    locked.chmod(0)
    try:
        code, stdout, stderr = run_cli(capsys, locked, "--checkpoint", tiny_checkpoint, "--quiet")
    finally:
        locked.chmod(0o644)
    assert code == 1
    assert json.loads(stdout) == {"image": str(locked), "error": "permission denied"}
    assert "permission denied" in stderr and "Traceback" not in stderr


def test_rows_match_the_api_and_exif_is_applied(tmp_path, flickr8k_tiny, tiny_checkpoint,
                                                tiny_captioner, capsys):
    """Exactly the captions of the API (tiny_captioner runs the eager CNN), whatever the
    batches hold; broken files in between must not shift a caption to another image."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, source in enumerate(sorted((flickr8k_tiny / "Images").glob("*.jpg"))):
        shutil.copy(source, folder / f"{i}.jpg")
        (folder / f"{i}_broken.jpg").write_bytes(b"\xff\xd8 broken")   # interleaved errors
    upright = photo(flickr8k_tiny, 2)
    upright.save(folder / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 8       # stored rotated; EXIF says rotate back
    upright.rotate(-90, expand=True).save(folder / "sideways.png", exif=exif)
    images = sorted(str(p) for p in folder.iterdir() if "broken" not in p.name)
    for method in ("greedy", "beam"):
        code, stdout, _ = run_cli(capsys, folder, "--checkpoint", tiny_checkpoint, "--method", method,
                                  "--beam-size", 3, "--batch-size", 3, "--quiet")
        assert code == 1
        rows = {row["image"]: row for row in map(json.loads, stdout.splitlines())}
        expected = tiny_captioner.caption(images, method=method, beam_size=3)
        assert {image: rows[image]["caption"] for image in images} == {
            image: cap.text for image, cap in zip(images, expected)}
        assert [rows[image]["score"] for image in images] == pytest.approx(
            [cap.score for cap in expected], abs=1e-3)
        assert rows[str(folder / "sideways.png")]["caption"] == rows[str(folder / "upright.png")]["caption"]
        assert len({rows[image]["caption"] for image in images}) > 2


def test_all_good_exits_0_and_writes_csv(tmp_path, flickr8k_tiny, tiny_checkpoint, capsys):
    images = sorted((flickr8k_tiny / "Images").glob("*.jpg"))[:5]
    out = tmp_path / "captions.csv"
    code, stdout, stderr = run_cli(capsys, *images, "-o", out, "--checkpoint", tiny_checkpoint,
                                   "--method", "beam", "--beam-size", 2, "--workers", 0)
    assert code == 0 and stdout == ""
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["image"] for row in rows] == [str(p) for p in images]
    assert all(row["caption"] and row["error"] == "" and float(row["score"]) < 0 for row in rows)
    assert "5 captioned, 0 failed" in stderr
    # a second run has nothing left to do and writes nothing
    before = out.read_bytes()
    code, _, stderr = run_cli(capsys, *images, "-o", out, "--checkpoint", tiny_checkpoint,
                              "--method", "beam", "--beam-size", 2)
    assert code == 0 and out.read_bytes() == before
    assert "0 captioned, 0 failed, 5 already in" in stderr


def test_inputs_files_globs_and_recursion(tmp_path, flickr8k_tiny, tiny_checkpoint, capsys):
    sources = sorted((flickr8k_tiny / "Images").glob("*.jpg"))
    top, nested = tmp_path / "top", tmp_path / "top" / "sub" / "deeper"
    nested.mkdir(parents=True)
    for i, source in enumerate(sources[:3]):
        shutil.copy(source, top / f"a{i}.jpg")
    for i, source in enumerate(sources[3:5]):
        shutil.copy(source, nested / f"b{i}.jpg")
    common = ["--checkpoint", tiny_checkpoint, "--method", "greedy", "--quiet"]

    def images(*inputs):
        code, stdout, _ = run_cli(capsys, *inputs, *common)
        assert code == 0
        found = [json.loads(line)["image"] for line in stdout.splitlines()]
        assert len(found) == len(set(found))            # no image twice
        return sorted(Path(p).name for p in found)

    assert images(top) == ["a0.jpg", "a1.jpg", "a2.jpg"]
    assert images(top, "-r") == ["a0.jpg", "a1.jpg", "a2.jpg", "b0.jpg", "b1.jpg"]
    assert images(f"{top}/**/*.jpg", "-r") == ["a0.jpg", "a1.jpg", "a2.jpg", "b0.jpg", "b1.jpg"]
    assert images(f"{top}/a*.jpg") == ["a0.jpg", "a1.jpg", "a2.jpg"]
    # the same image named three ways appears once
    assert images(top, top / "a1.jpg", f"{top}/a1*") == ["a0.jpg", "a1.jpg", "a2.jpg"]


def test_missing_path_is_an_error_row(tmp_path, flickr8k_tiny, tiny_checkpoint, capsys):
    image = sorted((flickr8k_tiny / "Images").glob("*.jpg"))[0]
    code, stdout, stderr = run_cli(capsys, image, tmp_path / "missing.jpg", "--checkpoint",
                                   tiny_checkpoint, "--quiet")
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert code == 1
    assert rows[1] == {"image": str(tmp_path / "missing.jpg"), "error": "no such file or directory"}
    assert "caption" in rows[0]


@pytest.mark.parametrize("args, message", [
    (["{empty}"], "no inputs found"),
    (["{tmp}/nothing_here.jpg"], "no inputs found"),
    (["{tmp}/*.png"], "no files match"),
    (["{image}", "--beam-size", "0"], "--beam-size must be >= 1"),
    (["{image}", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["{image}", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["{image}", "-o", "{tmp}"], "is a folder"),
    (["{image}", "-o", "{tmp}/foreign.jsonl"], "not a captioner JSON Lines output"),
    (["{image}", "-o", "{tmp}/foreign.csv"], "not a captioner CSV output"),
])
def test_usage_errors_exit_2(args, message, tmp_path, flickr8k_tiny, tiny_checkpoint, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "foreign.jsonl").write_text("this is my diary\n")
    (tmp_path / "foreign.csv").write_text("name,age\nann,3\n")
    image = sorted((flickr8k_tiny / "Images").glob("*.jpg"))[0]
    values = {"empty": tmp_path / "empty", "tmp": tmp_path, "image": image}
    code, stdout, stderr = run_cli(capsys, *[a.format(**values) for a in args],
                                   "--checkpoint", tiny_checkpoint)
    assert code == 2 and stdout == ""
    assert message in stderr and "Traceback" not in stderr
    assert (tmp_path / "foreign.jsonl").read_text() == "this is my diary\n"     # untouched


def test_unknown_option_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["caption", "x.jpg", "--no-such-option"])
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


def record_provenance(out: Path, checkpoint: Path, **options) -> None:
    """OUT.provenance.json as a run of this checkpoint with these decoding options writes it."""
    decode = with_overrides(read_checkpoint(checkpoint, tensors=False).decode, **options)
    Path(f"{out}{PROVENANCE_SUFFIX}").write_text(json.dumps(run_provenance(Path(checkpoint), decode)))


def test_resume_drops_partial_line_and_retries_errors(tmp_path, flickr8k_tiny, tiny_checkpoint, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for source in sorted((flickr8k_tiny / "Images").glob("*.jpg")):
        shutil.copy(source, folder / source.name)
    names = sorted(p.name for p in folder.iterdir())
    out = tmp_path / "out.jsonl"
    done = {"image": str(folder / names[0]), "caption": "kept from the first run", "score": -1.0}
    failed = {"image": str(folder / names[1]), "error": "permission denied"}   # fixed since
    partial = json.dumps({"image": str(folder / names[2]), "caption": "a dog", "score": -2.0})
    out.write_text(json.dumps(done) + "\n" + json.dumps(failed) + "\n" + partial[:25])
    record_provenance(out, tiny_checkpoint, method="greedy")     # as the killed run did
    code, _, stderr = run_cli(capsys, folder, "-o", out, "--checkpoint", tiny_checkpoint, "--method", "greedy")
    assert code == 0
    rows = read_jsonl(out)
    assert sorted(row["image"] for row in rows) == sorted(str(folder / n) for n in names)
    assert rows[0] == done                              # not captioned again
    assert all("caption" in row for row in rows)        # the failed image was retried
    assert f"{len(names) - 1} captioned, 0 failed, 1 already in" in stderr


def test_kill_9_then_rerun_gives_every_image_once(tmp_path, flickr8k_tiny, tiny_checkpoint, capsys):
    folder = tmp_path / "many"
    folder.mkdir()
    sources = sorted((flickr8k_tiny / "Images").glob("*.jpg"))
    for i in range(60):
        image = photo(flickr8k_tiny, i % len(sources)).rotate(i * 6)
        image.resize((160, 120)).save(folder / f"img{i:02d}.jpg", quality=80)
    out = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "captioner", "caption", str(folder), "-o", str(out),
               "--checkpoint", str(tiny_checkpoint), "--batch-size", "4", "--method", "beam",
               "--beam-size", "5", "--workers", "1"]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 8:   # two batches written
            break
        time.sleep(0.005)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    first = out.read_bytes()
    assert first.endswith(b"\n")                        # never half a row
    written = len(read_jsonl(out))
    assert 8 <= written < 60
    code, _, stderr = run_cli(capsys, folder, "-o", out, "--checkpoint", tiny_checkpoint,
                              "--batch-size", "4", "--method", "beam", "--beam-size", "5")
    assert code == 0
    rows = read_jsonl(out)
    assert sorted(row["image"] for row in rows) == sorted(str(p) for p in folder.iterdir())
    assert out.read_bytes().startswith(first)          # the first run's rows were kept
    assert f"{60 - written} captioned, 0 failed, {written} already in" in stderr


def test_without_onnxruntime_the_cli_falls_back_with_one_line(monkeypatch, flickr8k_tiny,
                                                              tiny_checkpoint, tiny_captioner, capsys):
    from captioner import fast_encoder

    monkeypatch.setattr(fast_encoder, "_warned", set())
    monkeypatch.setitem(sys.modules, "onnxruntime", None)       # import raises ImportError
    images = [str(p) for p in sorted((flickr8k_tiny / "Images").glob("*.jpg"))[:3]]
    code, stdout, stderr = run_cli(capsys, *images, "--checkpoint", tiny_checkpoint, "--method",
                                   "greedy")
    assert code == 0
    assert [json.loads(line)["caption"] for line in stdout.splitlines()] == [
        cap.text for cap in tiny_captioner.caption(images, method="greedy")]     # eager, fp32
    warning_lines = [line for line in stderr.splitlines() if "warning" in line]
    assert warning_lines == ["captioner: warning: onnxruntime is not installed: the CNN runs in "
                             "eager PyTorch (slower); pip install onnxruntime"]
