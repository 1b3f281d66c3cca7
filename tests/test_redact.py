"""The store URL's password is never printed or logged, and can come from the environment.

On Kubernetes the serve config names the password as `${DYNAMIC_INTEREST_REDIS_PASSWORD}`
(k8s/render.py); every replica takes it from its environment, set from a Secret.
"""

from __future__ import annotations

import logging
import socket

import pytest

from ray_app.store.opener import open_store
from ray_app.store.base import redact_url

SECRET = "s3cr3t-Pa55word_xyz"


@pytest.mark.parametrize(
    "url, shown",
    [
        (f"redis://dynamic-interest:{SECRET}@redis:6379/0", "redis://dynamic-interest:***@redis:6379/0"),
        (f"redis://:{SECRET}@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        (f"rediss://u:{SECRET}@h:6380/1?ssl_cert_reqs=none", "rediss://u:***@h:6380/1?ssl_cert_reqs=none"),
        (f"redis://h:6379/0?db=0&password={SECRET}", "redis://h:6379/0?db=0&password=***"),
        (f"unix://:{SECRET}@/run/redis.sock?db=0", "unix://:***@/run/redis.sock?db=0"),
        # A password with characters a URL parser cuts the authority at, unencoded.
        ("redis://:p#ss@redis:6379/0", "redis://:***@redis:6379/0"),
        ("redis://u:ab/cd?e@redis:6379/0", "redis://u:***@redis:6379/0"),
        # Nothing to hide: returned exactly as given.
        ("redis://redis:6379/0", "redis://redis:6379/0"),
        ("redis://dynamic-interest@redis:6379/0", "redis://dynamic-interest@redis:6379/0"),
        ("sqlite:////abs/state.db", "sqlite:////abs/state.db"),
        ("sqlite:///runs/serve/state.db", "sqlite:///runs/serve/state.db"),
    ],
)
def test_redact_url(url, shown):
    assert redact_url(url) == shown


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_redis_names_the_url_without_its_password():
    from ray_app.store.redis import RedisStore

    from ray_app.store.base import StoreUnavailable

    url = f"redis://dynamic-interest:{SECRET}@127.0.0.1:{_free_port()}/0"
    with pytest.raises(StoreUnavailable) as e:
        RedisStore(url, retries=0).ping()
    assert SECRET not in str(e.value) and redact_url(url) in str(e.value)


def test_unsupported_url_is_named_without_its_password():
    with pytest.raises(ValueError) as e:
        open_store(f"postgres://u:{SECRET}@db/x")
    assert SECRET not in str(e.value) and "u:***@db" in str(e.value)


def test_durability_warning_does_not_log_the_password(monkeypatch, caplog):
    """The warning about a server without `appendfsync always` names the URL, redacted."""
    import redis

    from ray_app.store.redis import RedisStore

    class FakeRedis:
        def ping(self):
            return True

        def config_get(self, pattern):
            return {"appendonly": "no", "appendfsync": "everysec"}

        def register_script(self, script):
            return None

    monkeypatch.setattr(redis.Redis, "from_url", staticmethod(lambda url, **kw: FakeRedis()))
    with caplog.at_level(logging.WARNING, logger="ray_app.store.redis"):
        store = RedisStore(f"redis://dynamic-interest:{SECRET}@redis:6379/0")
    assert store.durable is False and store.url == "redis://dynamic-interest:***@redis:6379/0"
    assert "dynamic-interest:***@redis" in caplog.text and SECRET not in caplog.text


def test_password_from_the_environment(monkeypatch):
    """`${NAME}` is read where the store is opened; a missing variable is named, not guessed."""
    import redis

    from ray_app.store.redis import RedisStore

    seen = {}

    def fake_init(self, url, **kwargs):
        seen["url"] = url

    monkeypatch.setattr(RedisStore, "__init__", fake_init)
    monkeypatch.setenv("DYNAMIC_INTEREST_REDIS_PASSWORD", SECRET)
    open_store("redis://dynamic-interest:${DYNAMIC_INTEREST_REDIS_PASSWORD}@redis:6379/0")
    assert seen["url"] == f"redis://dynamic-interest:{SECRET}@redis:6379/0"
    # The credentials reach redis-py as the user and password of the URL.
    kwargs = redis.connection.parse_url(seen["url"])
    assert (kwargs["username"], kwargs["password"]) == ("dynamic-interest", SECRET)

    monkeypatch.delenv("DYNAMIC_INTEREST_REDIS_PASSWORD")
    with pytest.raises(ValueError, match=r"\$\{DYNAMIC_INTEREST_REDIS_PASSWORD\}.*not set"):
        open_store("redis://dynamic-interest:${DYNAMIC_INTEREST_REDIS_PASSWORD}@redis:6379/0")
