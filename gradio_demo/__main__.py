"""`python -m gradio_demo --api http://127.0.0.1:8000 --port 7860 --accounts demo-accounts.yaml`

People log in with the accounts of `--accounts` (or $DYNAMIC_INTEREST_DEMO_ACCOUNTS[_FILE]; see
`gradio_demo.accounts`); without accounts the demo does not start. Starts even when the API is not
up yet: it says so here and on the page, and every action on the page tries the API again. The
demo's credential is a service token in $DYNAMIC_INTEREST_TOKEN (`python -m ray_app.serve.auth
mint --service`): it stays in this process, the page never sees it, and the API mints from it the
short-lived user token each person's calls carry. The demo never holds the API's signing key: it
refuses to start with $DYNAMIC_INTEREST_AUTH_SECRET in its environment.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from urllib.parse import urlparse

from gradio_demo.accounts import Accounts, AccountsError
from gradio_demo.app import CSS, Access, build_demo, describe_health
from gradio_demo.client import DEFAULT_API, ApiClient, ApiError
from ray_app.serve.auth import SECRET_ENV, TOKEN_ENV, VERIFY_SECRET_ENV


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
    p.add_argument("--accounts", help="the accounts' YAML file (default: the environment; see gradio_demo.accounts)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per API call drowns the useful ones
    keys = [name for name in (SECRET_ENV, VERIFY_SECRET_ENV) if os.environ.get(name)]
    if keys:
        print(
            f"error: the demo must not hold the API's signing keys; unset {' and '.join(keys)} in its environment "
            f"(it needs only a service token in {TOKEN_ENV})",
            file=sys.stderr,
        )
        return 2
    try:
        accounts = Accounts.from_env(args.accounts)
    except AccountsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
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
    demo = build_demo(Access(api, accounts))
    print(f"{len(accounts)} accounts may log in", flush=True)
    try:
        demo.launch(
            server_name=args.host,
            server_port=args.port,
            css=CSS,
            show_error=False,
            auth=accounts.check,
            auth_message="Log in with the account you were given.",
        )
    except OSError as e:  # gradio's message for a busy port names the port; no traceback for it
        print(
            f"error: the demo cannot listen on {args.host}:{args.port}: {e} (pick another with --port)", file=sys.stderr
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
