"""The API's limits (ray_app.serve.quotas) without a server: per token, per user's events, per
client address for failed authentications; shared by every replica through a real Redis, and
counted per replica while that Redis is down. The same limits over real HTTP are in
tests/test_serve_http.py and tests/test_attacks.py."""

from __future__ import annotations

import asyncio

import pytest

from ray_app.serve.auth import AuthError, Principal
from ray_app.serve.quotas import QuotaExceeded, Quotas, QuotaSettings
from store_helpers import RedisServer, needs_redis

ALICE = Principal("user", "alice", "a" * 32)
SETTINGS = QuotaSettings(user_per_minute=3, service_per_minute=5, events_per_hour=10, failed_auth_per_minute=2)


def run(coro):
    return asyncio.run(coro)


def test_a_token_gets_its_rate_and_another_token_its_own():
    async def go():
        q = Quotas(SETTINGS)
        for _ in range(3):
            await q.admit(ALICE)
        with pytest.raises(AuthError, match="at most 3 requests a minute") as e:
            await q.admit(ALICE)
        assert e.value.status == 429 and 1 <= e.value.retry_after_s <= 120
        await q.admit(Principal("user", "alice", "b" * 32))  # alice's other token counts apart
        service = Principal("service", None, "c" * 32)
        for _ in range(5):
            await q.admit(service)
        with pytest.raises(AuthError):
            await q.admit(service)

    run(go())


def test_a_user_has_a_write_budget_whatever_token_writes():
    async def go():
        q = Quotas(SETTINGS)
        await q.admit_events("alice", 6)
        await q.admit_events("alice", 4)
        with pytest.raises(QuotaExceeded, match="at most 10 events an hour") as e:
            await q.admit_events("alice", 1)
        assert e.value.field == "events" and e.value.retry_after_s >= 1
        await q.admit_events("bob", 10)  # another user's budget is untouched
        with pytest.raises(QuotaExceeded):
            await q.admit_events("carol", 11)  # more than the budget at once: refused whole

    run(go())


def test_an_address_with_too_many_failed_authentications_is_refused():
    async def go():
        q = Quotas(SETTINGS)
        await q.check_address("10.0.0.1")
        await q.failed("10.0.0.1")
        await q.check_address("10.0.0.1")
        await q.failed("10.0.0.1")
        with pytest.raises(AuthError, match="bad token from this address") as e:
            await q.check_address("10.0.0.1")
        assert e.value.status == 429
        await q.check_address("10.0.0.2")
        await q.check_address(None)  # no address known (a unix socket): not counted

    run(go())


@needs_redis
def test_replicas_on_one_redis_share_the_counts_and_count_alone_while_it_is_down(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    try:

        async def shared():
            one, two = Quotas(SETTINGS, server.url), Quotas(SETTINGS, server.url)
            assert one.shared and two.shared
            await one.admit(ALICE)
            await two.admit(ALICE)
            await one.admit(ALICE)
            with pytest.raises(AuthError):
                await two.admit(ALICE)  # three in all, whichever replica counted them
            await two.admit_events("alice", 10)
            with pytest.raises(QuotaExceeded):
                await one.admit_events("alice", 1)
            return one

        run(shared())
        server.stop()

        async def alone():
            q = Quotas(SETTINGS, server.url)
            for _ in range(3):  # Redis is down: this replica's own count, not an error
                await q.admit(ALICE)
            assert not q.shared
            with pytest.raises(AuthError):
                await q.admit(ALICE)

        run(alone())
    finally:
        server.stop()
