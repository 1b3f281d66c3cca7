"""What the job prints once everything is up: where the API and the demo are, and commands to try."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from main_job.settings import MainSettings


def banner(api_url: str, demo_url: str | None, user_id: str, item_id: str, s: MainSettings) -> str:
    """The closing banner: the URLs, curl commands for `user_id` and `item_id`, and how to get a token."""
    from ray_app.serve.auth import SECRET_ENV, TOKEN_ENV

    token_file = s.token_file
    # The secret is the user's own ($DYNAMIC_INTEREST_AUTH_SECRET) or the one kept in the secret file.
    kept = s.secret_file.is_file() and s.secret_file.read_text().strip() == os.environ.get(SECRET_ENV)
    mint_user = f"{sys.executable} -m ray_app.serve.auth mint --user {user_id}"
    item = json.dumps(item_id)  # a string in the JSON bodies: "0133093" keeps its zero

    auth = f'-H "Authorization: Bearer ${TOKEN_ENV}"'
    json_ = "-H 'content-type: application/json'"
    lines = [
        "",
        "=" * 72,
        f"API   {api_url}        (OpenAPI docs: {api_url}/docs)",
        *(
            [f"demo  {demo_url}   (log in as admin, password: cat {s.demo_password_file.resolve()})"]
            if demo_url
            else []
        ),
        "",
        "try (every route but /healthz needs a token; this one acts for any user):",
        f"  export {TOKEN_ENV}=$(cat {token_file.resolve()})",
        f"  curl -s {api_url}/recommend {auth} {json_} \\",
        f'       -d \'{{"user_id": "{user_id}", "context": {{"intent": "something light and funny"}}, "k": 5, "explain": true}}\'',
        f"  curl -s {api_url}/users/{user_id}/events {auth} {json_} \\",
        f'       -d \'{{"events": [{{"item_id": {item}, "rating": 4.5, "timestamp": {time.time():.0f}}}]}}\'',
        f"  curl -s {api_url}/recommend {auth} {json_} \\",
        f'       -d \'{{"history": [{{"item_id": {item}, "timestamp": {time.time():.0f}}}], "k": 5}}\''
        "   # no rating: a view",
        f"  curl -s '{api_url}/users/{user_id}/interests?last=20' {auth}",
        f"  curl -s '{api_url}/items?q=space+adventure&k=5' {auth}",
        "",
        f"a token for user {user_id} only:",
        f"  {SECRET_ENV}=$(cat {s.secret_file.resolve()}) {mint_user}" if kept else f"  {mint_user}",
        "Ctrl-C stops the API and the demo.",
        "=" * 72,
    ]
    return "\n".join(lines)


def example_ids(prepared: Path) -> tuple[str, str]:
    """A user and an item of the prepared data, for the banner's examples."""
    from models.data.dataset import load_prepared

    data = load_prepared(prepared)
    return str(data.user_source_ids[1]), str(data.item_source_ids[1])  # [0] is padding
