"""docs/screenshot.png: the page with a captioned example photo, taken in Debian's chromium.

Serves the app in this process on a free port, uploads the photo, presses Caption, and saves a
desktop-width screenshot; then checks that the page fits a 390 px phone screen (nothing scrolls
sideways) and saves that view too when --phone is given.

    .venv/bin/python benchmarks/screenshot.py [--checkpoint checkpoints/model.safetensors]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from captioner import webapp  # noqa: E402
from captioner.api import Captioner, default_checkpoint  # noqa: E402
from test_browser import CHROMIUM, DESKTOP, PHONE, browser_page, caption_in_page  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(default_checkpoint()))
    parser.add_argument("--photo", default=str(ROOT / "examples" / "dog_in_water.jpg"))
    parser.add_argument("--output", default=str(ROOT / "docs" / "screenshot.png"))
    parser.add_argument("--phone", help="also save the 390 px phone view here")
    args = parser.parse_args(argv)
    if not CHROMIUM.is_file():
        raise SystemExit(f"needs chromium at {CHROMIUM} (apt-get install -y chromium)")

    captioner = Captioner.load(args.checkpoint)
    app = webapp.build_app(captioner)
    _, url, _ = webapp.launch(app, port=None, prevent_thread_lock=True, quiet=True)
    try:
        with browser_page(DESKTOP) as page:
            caption = caption_in_page(page, url, args.photo)
            page.wait_for_timeout(500)          # let the table and highlights settle
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.output, full_page=True)
            print(f"{args.output}: {Path(args.photo).name} -> {caption!r}")
            page.set_viewport_size(PHONE)
            page.wait_for_timeout(500)
            width = page.evaluate("document.documentElement.scrollWidth")
            print(f"phone view ({PHONE['width']} px): page width {width} px"
                  f" -> {'fits' if width <= PHONE['width'] else 'SCROLLS SIDEWAYS'}")
            if args.phone:
                page.screenshot(path=args.phone, full_page=True)
    finally:
        app.close()
    return 0 if width <= PHONE["width"] else 1


if __name__ == "__main__":
    sys.exit(main())
