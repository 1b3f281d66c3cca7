"""`python -m gradio_demo --api http://127.0.0.1:8000 --port 7860`

Starts even when the API is not up yet: it says so here and on the page, and every action on
the page tries the API again. The API's token comes from $DYNAMIC_INTEREST_TOKEN (a service
token, `python -m ray_app.serve.auth --service`): it stays in this process, the page never sees it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from urllib.parse import urlparse

from gradio_demo.app import CSS, build_demo, describe_health
from gradio_demo.client import DEFAULT_API, ApiClient, ApiError
from ray_app.serve.auth import TOKEN_ENV


def api_url(text: str) -> str:
    url = urlparse(text)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise argparse.ArgumentTypeError(f"{text!r} is not an http(s) URL such as {DEFAULT_API}")
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gradio_demo", description=__doc__.splitlines()[0])
    p.add_argument(
        "--api", type=api_url, default=DEFAULT_API, help="base URL of the recommender's HTTP API (default %(default)s)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a container)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each API call")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per API call drowns the useful ones
    token = os.environ.get(TOKEN_ENV)
    if not token:
        print(
            f"warning: {TOKEN_ENV} is not set: the API will refuse the demo's calls (401)", file=sys.stderr, flush=True
        )
    api = ApiClient(args.api, timeout=args.timeout, token=token)
    try:
        print(describe_health(api, api.health()), flush=True)
    except ApiError as e:
        print(f"Starting anyway: {e.message}", file=sys.stderr, flush=True)
    demo = build_demo(api)
    try:
        demo.launch(server_name=args.host, server_port=args.port, css=CSS, show_error=False)
    except OSError as e:  # gradio's message for a busy port names the port; no traceback for it
        print(
            f"error: the demo cannot listen on {args.host}:{args.port}: {e} (pick another with --port)", file=sys.stderr
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
