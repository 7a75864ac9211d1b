"""The web UI: `python app.py [--checkpoint PATH] [--host 127.0.0.1] [--port 7860] [--share]`.

A thin shell over captioner.webapp (`captioner serve` does the same). Without --checkpoint it
serves the shipped model, checkpoints/model.safetensors.
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Caption photos in the browser (Gradio web UI).")
    parser.add_argument("--checkpoint", help="checkpoint file or folder (default: the shipped model)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--share", action="store_true",
                        help="also open a temporary public gradio.live link (off by default)")
    args = parser.parse_args(argv)

    from captioner.webapp import serve   # after parsing: --help stays instant
    return serve(args.checkpoint, host=args.host, port=args.port, share=args.share)


if __name__ == "__main__":
    sys.exit(main())
