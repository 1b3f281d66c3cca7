"""A store from its URL: SQLite or Redis, with `${NAME}` references read from the environment."""

from __future__ import annotations

import os
import re

from ray_app.store.base import StateStore, redact_url
from ray_app.store.sqlite import SQLiteStore

_SCHEMES = "sqlite:///PATH (relative; sqlite:////abs/path for an absolute one) or redis://host:port/db"


_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(url: str) -> str:
    """`url` with each `${NAME}` replaced by the environment variable NAME (ValueError if it is unset)."""

    def from_env(m: re.Match) -> str:
        if not os.environ.get(m[1]):
            raise ValueError(
                f"store URL {redact_url(url)!r} takes ${{{m[1]}}} from the environment, where it is not set"
            )
        return os.environ[m[1]]

    return _ENV_REFERENCE.sub(from_env, url)


def open_store(url: str) -> StateStore:
    """`sqlite:///relative.db`, `sqlite:////abs/path.db` (SQLAlchemy convention) or `redis://host:port/db`.

    `${NAME}` in the URL is replaced by the environment variable NAME where the store is opened (in
    each replica), so that a password can come from a Kubernetes Secret instead of the serve config."""
    url = expand_env(url)
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///") :]
        if not path:
            raise ValueError(f"store URL {redact_url(url)!r} has no file path; accepted: {_SCHEMES}")
        return SQLiteStore(path)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from ray_app.store.redis import RedisStore

        return RedisStore(url)
    raise ValueError(f"unsupported store URL {redact_url(url)!r}; accepted: {_SCHEMES}")
