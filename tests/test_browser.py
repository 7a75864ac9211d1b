"""The page in a real browser: Debian's chromium driven by playwright (never `playwright install`:
there is no internet). Skipped, with the reason, when chromium or playwright is missing;
`make system-deps` installs chromium."""
from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

# Gradio's queue calls pandas APIs that pandas 3 deprecates: its business, not this project's.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:gradio.queueing")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
CAPTION_TIMEOUT_MS = 30_000
MANY_TIMEOUT_MS = 120_000      # a few photos, on a CPU other jobs may be using

try:
    from playwright.sync_api import sync_playwright
except ImportError:   # the dev extra is not installed
    sync_playwright = None

needs_browser = pytest.mark.skipif(
    sync_playwright is None or not CHROMIUM.is_file(),
    reason=f"needs the playwright package and Debian's chromium at {CHROMIUM} "
           "(`apt-get install -y chromium`, or `make system-deps`)")


@contextlib.contextmanager
def browser_page(viewport: dict = DESKTOP):
    """A fresh chromium page; the browser is closed when the block ends."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport=viewport)
        finally:
            browser.close()


def caption_in_page(page, url: str, photo: Path | str) -> str:
    """Open the page, upload the photo, press Caption and return the caption the page shows."""
    page.goto(url)
    page.locator("#photo input[type=file]").set_input_files(str(photo))
    page.locator("#caption-button").click()
    page.wait_for_function("() => document.querySelector('#caption textarea').value.length > 0",
                           timeout=CAPTION_TIMEOUT_MS)
    return page.locator("#caption textarea").input_value()


@needs_browser
def test_browser_uploads_a_photo_and_reads_its_caption(tiny_captioner, tmp_path):
    from test_webapp import EXAMPLES, running_app

    photo = EXAMPLES[0]
    expected = tiny_captioner.caption(photo, method="beam", beam_size=3).text
    not_an_image = tmp_path / "not_an_image.png"
    not_an_image.write_text("plain text")
    with running_app(tiny_captioner) as (_, url), browser_page() as page:
        assert caption_in_page(page, url, photo) == expected
        words = page.locator("#words").inner_text()
        assert all(word in words for word in expected.split())
        assert "%" in words                                      # per-word confidence labels
        assert expected in page.locator("#candidates").inner_text()
        assert "efficientnet_lite0" in page.locator("#model-card").inner_text()

        # Phone width: everything fits, nothing scrolls sideways.
        page.set_viewport_size(PHONE)
        page.wait_for_timeout(300)
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        assert page.locator("#caption-button").is_visible()

        # An example photo: one click puts it in the image box.
        page.locator("#examples img").nth(1).click()
        page.locator("#caption-button").click()
        second = tiny_captioner.caption(EXAMPLES[1], method="beam", beam_size=3).text
        assert second != expected                  # else this step could not tell the photos apart
        page.wait_for_function("text => document.querySelector('#caption textarea').value === text",
                               arg=second, timeout=CAPTION_TIMEOUT_MS)

        # A file that is not an image: the page shows our message, and the next photo still works.
        page.set_viewport_size(DESKTOP)
        page.locator("#photo input[type=file]").set_input_files(str(not_an_image))
        page.locator("#caption-button").click()
        page.get_by_text("not an image").first.wait_for(timeout=CAPTION_TIMEOUT_MS)
        assert caption_in_page(page, url, EXAMPLES[2]) == tiny_captioner.caption(
            EXAMPLES[2], method="beam", beam_size=3).text


@needs_browser
def test_gallery_opens_in_the_browser_with_thumbnails_and_word_confidence(tiny_checkpoint, tmp_path):
    """`-o gallery.html` from the CLI: chromium shows every photo, its caption and each word's
    probability on hover, from the one file (no network), and fits a phone."""
    from test_outputs import caption_args, photos

    from captioner.cli import main

    photos(tmp_path / "photos", 3)
    (tmp_path / "photos" / "<b>bold<i>.jpg").write_bytes(b"not an image")
    gallery = tmp_path / "gallery.html"
    assert main(["caption", str(tmp_path / "photos"), "-o", str(gallery),
                 *map(str, caption_args(tiny_checkpoint))]) == 1
    with browser_page() as page:
        requests = []
        page.on("request", lambda request: requests.append(request.url))
        page.goto(gallery.as_uri())
        cards = page.locator("figure.card")
        assert cards.count() == 4
        # every thumbnail decoded by the browser
        assert page.evaluate("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
        assert page.locator("img").count() == 3
        names = page.locator(".name").all_inner_texts()
        assert str(tmp_path / "photos" / "<b>bold<i>.jpg") in names          # shown as text
        assert page.locator("figure.failed .error").inner_text()
        first_word = page.locator(".caption .w").first
        assert first_word.get_attribute("title").endswith("%")
        first_word.hover()
        assert all(url.startswith(("file:", "data:")) for url in requests)
        page.set_viewport_size(PHONE)
        page.wait_for_timeout(200)
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]


@needs_browser
def test_browser_captions_many_photos_and_a_zip(tiny_captioner, tmp_path):
    """The many-photos tab: photos and a zip in, the table fills in, every row (an error row for a
    bad file), the summary, and CSV / JSON Lines downloads holding the same rows."""
    from test_webapp import EXAMPLES, photo_zip, read_downloads, running_app

    from captioner.webapp import CaptionService

    archive = photo_zip(tmp_path / "photos.zip", {"trip/day 1/one.jpg": EXAMPLES[1], "notes.txt": b"x"})
    bad = tmp_path / "broken.jpg"
    bad.write_text("not a photo")
    uploads = [str(EXAMPLES[0]), str(archive), str(bad)]
    expected = list(CaptionService(tiny_captioner).caption_many(uploads))[-1]
    captions = [row["caption"] for row in expected.rows if "caption" in row]
    assert len(captions) == 2 and all(captions)
    with running_app(tiny_captioner) as (_, url), browser_page() as page:
        page.goto(url)
        page.get_by_role("tab", name="Many photos").click()
        page.locator("#many-files input[type=file]").set_input_files(uploads)
        # uploaded when the list shows every file (the page shows a name's stem and suffix apart)
        page.wait_for_function("stems => stems.every(s => document.querySelector('#many-files').innerText.includes(s))",
                               arg=[Path(p).stem for p in uploads], timeout=CAPTION_TIMEOUT_MS)
        page.locator("#many-button").click()
        page.locator("#many-jsonl a").first.wait_for(timeout=MANY_TIMEOUT_MS)     # there once it has finished
        summary = page.locator("#many-summary").inner_text()
        assert "2 captioned, 1 could not be captioned" in summary and "1 files in zips ignored" in summary
        table = page.locator("#many-table").inner_text()
        for text in [*captions, EXAMPLES[0].name, "photos.zip/trip/day 1/one.jpg", "broken.jpg", "not an image"]:
            assert text in table, text
        downloaded = []
        for elem_id, name in (("many-csv", "captions.csv"), ("many-jsonl", "captions.jsonl")):
            link = page.locator(f"#{elem_id} a").first
            assert link.get_attribute("href").endswith(name)
            target = tmp_path / name
            target.write_bytes(page.request.get(link.get_attribute("href")).body())
            downloaded.append(str(target))
        csv_rows, jsonl_rows = read_downloads(tuple(downloaded))
        assert jsonl_rows == expected.rows and [r["caption"] for r in csv_rows] == [r.get("caption", "") for r in expected.rows]

        page.set_viewport_size(PHONE)
        page.wait_for_timeout(300)
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
