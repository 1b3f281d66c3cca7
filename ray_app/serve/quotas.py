"""How much a caller may do: requests per token, events written per user, failed authentications
per client address. Counted with `limits` (sliding-window counters) on the store's Redis where
the app runs with a Redis store, so that every Ingress replica shares one count; with a SQLite
store (one node), and while Redis cannot answer, each replica counts in its own memory.

Past a limit the API answers 429 with `Retry-After`:
- a token past its requests a minute (`field`: "authorization");
- a user past its events an hour, whatever token writes them (`field`: "events");
- a client address past its failed authentications a minute: its requests are refused before
  their token is checked, until the window passes (`field`: "authorization").
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from limits import RateLimitItemPerHour, RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage, RedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.errors import StorageError

from ray_app.serve.auth import AuthError, Principal
from ray_app.store.opener import expand_env

log = logging.getLogger("ray.serve")

SHARED_RETRY_S = 5.0  # after a failed call to the shared counts, the local ones are used this long
KEY_PREFIX = "di:limits"  # beside the store's own keys (ray_app/store/redis.py)


class QuotaExceeded(Exception):
    """A 429 that is not about the token: `field` names what the limit counts."""

    def __init__(self, detail: str, field: str, retry_after_s: int):
        super().__init__(detail)
        self.detail, self.field, self.retry_after_s = detail, field, retry_after_s


@dataclass(frozen=True)
class QuotaSettings:
    user_per_minute: int = 600  # requests a user token may make a minute
    service_per_minute: int = 60_000  # the same for a service token (the demo, a back end)
    events_per_hour: int = 5_000  # events written for one user an hour, by any token
    failed_auth_per_minute: int = 30  # requests with a bad token from one client address a minute


class Quotas:
    """The counters of one Ingress replica; shared through Redis when `store_url` is a Redis URL."""

    def __init__(self, settings: QuotaSettings, store_url: str | None = None):
        self.settings = settings
        self._requests = {
            "user": RateLimitItemPerMinute(settings.user_per_minute),
            "service": RateLimitItemPerMinute(settings.service_per_minute),
        }
        self._events = RateLimitItemPerHour(settings.events_per_hour)
        self._failed = RateLimitItemPerMinute(settings.failed_auth_per_minute)
        self._local = SlidingWindowCounterRateLimiter(MemoryStorage())
        self._shared = None
        self.shared_url = None
        if store_url and store_url.startswith(("redis://", "rediss://")):
            storage = RedisStorage(
                "async+" + expand_env(store_url),
                implementation="redispy",
                key_prefix=KEY_PREFIX,
                wrap_exceptions=True,
                socket_timeout=0.5,  # a count must not hold a request up: past this, the local count
                socket_connect_timeout=0.5,
            )
            self._shared = SlidingWindowCounterRateLimiter(storage)
            self.shared_url = store_url
        self._shared_down_until = 0.0

    @property
    def shared(self) -> bool:
        """Whether the counts are shared now (a Redis store that answered its last call)."""
        return self._shared is not None and time.monotonic() >= self._shared_down_until

    async def _hit(self, item, key: str, cost: int = 1, test: bool = False) -> tuple[bool, int]:
        """Count `cost` against `item` for `key` (only look, with `test`) -> (within the limit?, seconds
        until it may be tried again)."""
        for limiter in (self._shared, self._local) if self.shared else (self._local,):
            try:
                ok = await (limiter.test if test else limiter.hit)(item, key, cost=cost)
                if ok:
                    return True, 0
                stats = await limiter.get_window_stats(item, key)
                return False, max(1, math.ceil(stats.reset_time - time.time()))
            except StorageError as e:
                self._shared_down_until = time.monotonic() + SHARED_RETRY_S
                log.warning(
                    "the shared rate limits are unreachable, counting per replica for %g s: %s",
                    SHARED_RETRY_S,
                    e.storage_error,
                )
        raise RuntimeError("the local rate limiter failed")  # the memory storage raises no StorageError

    async def admit(self, who: Principal) -> None:
        """AuthError(429) once the caller's token has used up its minute."""
        ok, wait = await self._hit(self._requests[who.role], f"token:{who.token_key}")
        if not ok:
            limit = self._requests[who.role].amount
            raise AuthError(
                429, f"rate limit: at most {limit} requests a minute for this token; retry in {wait} s", wait
            )

    async def admit_events(self, user_id: str, n: int) -> None:
        """QuotaExceeded once `n` more events would take the user past its events an hour (the
        events are not counted then)."""
        item = self._events
        ok, wait = await self._hit(item, f"events:{user_id}", cost=n)
        if not ok:
            raise QuotaExceeded(
                f"events: user {user_id!r} may write at most {item.amount} events an hour; {n} more would "
                f"exceed it, retry in {wait} s",
                "events",
                wait,
            )

    async def check_address(self, address: str | None) -> None:
        """AuthError(429) while `address` is past its failed authentications a minute."""
        if address:
            ok, wait = await self._hit(self._failed, f"failed:{address}", test=True)
            if not ok:
                raise AuthError(429, f"too many requests with a bad token from this address; retry in {wait} s", wait)

    async def failed(self, address: str | None) -> None:
        """Count one failed authentication from `address`."""
        if address:
            await self._hit(self._failed, f"failed:{address}")
