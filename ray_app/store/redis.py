"""`StateStore` on Redis: one event log and state cache shared by serving replicas on several nodes.

Layout (every key under a namespace, default `di`):
- `di:ev:<user>`  a list of packed events in append order (so the count is `LLEN`): rating and time
                  (float64 each), the item id's length in bytes (uint64) and its UTF-8 text; a record
                  of exactly 24 bytes is one written while ids were integers (int64 id, rating,
                  time) and is read as the id's decimal string, so such a store needs no migration;
- `di:seen:<user>` a set of the item ids in the user's events (for `exclude_seen`);
- `di:st:<user>`  a hash `{v: model_version, n: n_events, b: blob}`, the state cache;
- `di:users`      a sorted set of user ids with equal scores, so `ZRANGEBYLEX` lists them by id
                  in the same byte order as SQLite's `ORDER BY user_id`;
- `di:op:<token>` a marker per append call, kept `op_ttl_s` (5 min; retries end within seconds).
- `di:idem:<user>:<key>` a client's Idempotency-Key, `{d: events digest, n: n_events after}`,
                  kept IDEMPOTENCY_TTL_S (24 h);
- `di:idemk:<user>` a sorted set of the user's live Idempotency-Keys (score: when each was used),
                  so that erasing the user finds them without scanning the keyspace;
- `di:revoked`    a sorted set of revoked token ids, scored by the token's expiry;
- `di:meta`       a hash; its field `dataset` records the dataset the store was loaded for (JSON).
- `di:items`      a list of the items added while serving, in the order they were added (so the
                  count, `LLEN`, is the catalogue's version): the id's and the fields' byte lengths
                  (uint64 each), the id, the fields (JSON) and the text embedding (float32);
- `di:itemids`    a hash, added item id -> its place in `di:items` (1, 2, ...).

Every write is one Lua script, which Redis runs atomically and logs to the AOF as one unit, so
the event list, the user set and the state never disagree. Durability comes from the server:
with `appendonly yes` and `appendfsync always`, Redis fsyncs the AOF before it answers, so a
returned `append_events` survives `kill -9` of the server (`durable` reports the setting).
Redis Cluster is not supported (the scripts touch the global user set and a user's keys).
Opening a store does not contact Redis: a replica starts while Redis is down, and each call
raises StoreUnavailable until Redis answers again.
"""

from __future__ import annotations

import functools
import logging
import struct
import time
import uuid
from collections.abc import Mapping, Sequence

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from ray_app.store.base import (
    IDEMPOTENCY_TTL_S,
    AddedItem,
    DatasetRecord,
    Event,
    EventCapReached,
    IdempotencyConflict,
    ItemCapReached,
    ItemExists,
    StoredState,
    StoreUnavailable,
    UserSnapshot,
    check_claim,
    events_digest,
    redact_url,
)

log = logging.getLogger(__name__)

# rating float64, timestamp float64, the id's byte length: then the id (exact round trips). Every
# such record is longer than 24 bytes (an id has at least one byte), the size of the records of
# integer ids (item_id int64, rating, timestamp) that stores written before hold.
_EVENT = struct.Struct("<ddQ")
_INT_EVENT = struct.Struct("<qdd")

# Each script pushes the events' item ids into the user's seen set in the same unit as the
# events, so the set never disagrees with the log. `push` goes in chunks because Lua's unpack()
# is bounded by the C stack (8000 values).
_PUSH = """
local function push(cmd, key, from, to)
  for i = from, to, 1000 do redis.call(cmd, key, unpack(ARGV, i, math.min(i + 999, to))) end
end
"""

# The token makes an append exactly-once under the client's automatic retries: if the
# connection drops after Redis ran the script but before the reply arrived, the retry carries
# the same token and only reads the count. A cap (>= 0; -1: none) refuses an append that would take the log
# past it, writing nothing. KEYS: ev, users, op, seen; ARGV: ttl_s, user, cap, k, k item ids,
# k packed events -> {refused 0/1, n_events}.
_APPEND = (
    _PUSH
    + """
if redis.call('EXISTS', KEYS[3]) == 1 then return {0, redis.call('LLEN', KEYS[1])} end
local cap, k = tonumber(ARGV[3]), tonumber(ARGV[4])
local n = redis.call('LLEN', KEYS[1])
if cap >= 0 and n + k > cap then return {1, n} end
redis.call('SET', KEYS[3], '1', 'EX', tonumber(ARGV[1]))
push('RPUSH', KEYS[1], 5 + k, 4 + 2 * k)
push('SADD', KEYS[4], 5, 4 + k)
redis.call('ZADD', KEYS[2], 0, ARGV[2])
return {0, redis.call('LLEN', KEYS[1])}
"""
)

# A client's Idempotency-Key: the first call appends and records (digest, count); a later one with
# the key only answers what the first did. The key and the events are written by the same script,
# and the key joins the user's index of keys (entries older than the TTL dropped).
# KEYS: ev, users, idem, seen, idem index; ARGV: ttl_s, user, digest, cap, now, key, k, k item ids,
# k packed events -> {0 appended / 1 replayed / 2 refused by the cap, n_events, digest}
_APPEND_ONCE = (
    _PUSH
    + """
local seen = redis.call('HMGET', KEYS[3], 'd', 'n')
if seen[1] then return {1, tonumber(seen[2]), seen[1]} end
local cap, k = tonumber(ARGV[4]), tonumber(ARGV[7])
local n = redis.call('LLEN', KEYS[1])
if cap >= 0 and n + k > cap then return {2, n, ARGV[3]} end
push('RPUSH', KEYS[1], 8 + k, 7 + 2 * k)
push('SADD', KEYS[4], 8, 7 + k)
redis.call('ZADD', KEYS[2], 0, ARGV[2])
n = redis.call('LLEN', KEYS[1])
redis.call('HSET', KEYS[3], 'd', ARGV[3], 'n', n)
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[1]))
redis.call('ZADD', KEYS[5], tonumber(ARGV[5]), ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', tonumber(ARGV[5]) - tonumber(ARGV[1]))
redis.call('EXPIRE', KEYS[5], tonumber(ARGV[1]))
return {0, n, ARGV[3]}
"""
)

# Erase one user whole: the events, the seen set, the state, the idempotency records (found through
# the index) and the user's place in the user set. KEYS: ev, seen, st, users, idem index;
# ARGV: user, the prefix of the user's idempotency keys -> events erased.
_ERASE = """
for _, key in ipairs(redis.call('ZRANGE', KEYS[5], 0, -1)) do redis.call('DEL', ARGV[2] .. key) end
local n = redis.call('LLEN', KEYS[1])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[5])
redis.call('ZREM', KEYS[4], ARGV[1])
return n
"""
# Record the store's dataset unless it records one: KEYS: meta, users; ARGV: record (JSON), adopt
# (0/1) -> {the record held before (false: none), whether the store holds users}.
_CLAIM = """
local held = redis.call('HGET', KEYS[1], 'dataset')
local has_users = redis.call('ZCARD', KEYS[2]) > 0 and 1 or 0
if not held and (has_users == 0 or ARGV[2] == '1') then redis.call('HSET', KEYS[1], 'dataset', ARGV[1]) end
return {held, has_users}
"""
# Idempotent initial load of one user: skipped if the user is already known. KEYS: ev, users, seen;
# ARGV: user, k, k item ids, k packed events -> 1 if loaded.
_LOAD = (
    _PUSH
    + """
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then return 0 end
local k = tonumber(ARGV[2])
redis.call('DEL', KEYS[1], KEYS[3])
push('RPUSH', KEYS[1], 3 + k, 2 + 2 * k)
push('SADD', KEYS[3], 3, 2 + k)
redis.call('ZADD', KEYS[2], 0, ARGV[1])
return 1
"""
)

# A cache write never moves n_events backwards for the same model version (a slower replica
# must not overwrite a newer state), and is dropped for a user the store does not hold (erased
# meanwhile). KEYS: st, users; ARGV: version, n, blob, user -> 1 if written.
_PUT_STATE = """
if not redis.call('ZSCORE', KEYS[2], ARGV[4]) then return 0 end
local cur = redis.call('HMGET', KEYS[1], 'v', 'n')
if cur[1] == ARGV[1] and tonumber(cur[2]) > tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'n', ARGV[2], 'b', ARGV[3])
return 1
"""

# An added item: refused when its id is taken or the cap (-1: none) is reached.
# KEYS: items, itemids; ARGV: id, record, cap -> {0 added / 1 id taken / 2 cap reached, count}.
_ADD_ITEM = """
local n = redis.call('LLEN', KEYS[1])
if redis.call('HMGET', KEYS[2], ARGV[1])[1] then return {1, n} end
local cap = tonumber(ARGV[3])
if cap >= 0 and n >= cap then return {2, n} end
n = redis.call('RPUSH', KEYS[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], n)
return {0, n}
"""
_ITEM_HEAD = struct.Struct("<QQ")  # the id's and the fields' byte lengths


def _pack_item(item: AddedItem) -> bytes:
    raw_id, fields = item.item_id.encode(), item.fields_json().encode()
    return _ITEM_HEAD.pack(len(raw_id), len(fields)) + raw_id + fields + item.text_emb


def _unpack_item(raw: bytes) -> AddedItem:
    n_id, n_fields = _ITEM_HEAD.unpack_from(raw)
    at = _ITEM_HEAD.size
    item_id, fields = raw[at : at + n_id].decode(), raw[at + n_id : at + n_id + n_fields]
    return AddedItem.from_parts(item_id, fields, raw[at + n_id + n_fields :])


# Replies that mean "not now" rather than a bug: out of memory under maxmemory noeviction, a
# replica that only reads, a failed snapshot, a server still loading, credentials refused.
_UNAVAILABLE_REPLIES = ("OOM", "READONLY", "MISCONF", "LOADING", "NOAUTH", "WRONGPASS", "NOPERM")


def _redis_faults(method):
    """Connection errors, timeouts and the replies above -> StoreUnavailable naming the (redacted)
    URL. A Lua script runs whole or not at all, so a refused write wrote nothing."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise StoreUnavailable(f"Redis store {self.url}: unreachable ({e})") from None
        except redis.ResponseError as e:
            refused = (
                redis.exceptions.OutOfMemoryError,
                redis.exceptions.ReadOnlyError,
                redis.exceptions.NoPermissionError,
            )
            if isinstance(e, refused) or str(e).startswith(_UNAVAILABLE_REPLIES):
                raise StoreUnavailable(f"Redis store {self.url}: refused ({type(e).__name__}: {e})") from None
            raise

    return wrapper


def _pack(events: Sequence[Event]) -> list[bytes]:
    out = []
    for e in events:
        raw = str(e.item_id).encode()
        out.append(_EVENT.pack(float(e.rating), float(e.timestamp), len(raw)) + raw)
    return out


def _cap(max_events: int | None) -> int:
    """The scripts' cap argument: -1 for none."""
    return -1 if max_events is None else max(int(max_events), 0)


def _args(events: Sequence[Event]) -> list:
    """k, the k item ids, the k packed events: the tail of every appending script's ARGV."""
    return [len(events), *(str(e.item_id) for e in events), *_pack(events)]


def _unpack(raw: bytes) -> Event:
    if len(raw) == _INT_EVENT.size:  # written while ids were integers
        item_id, rating, timestamp = _INT_EVENT.unpack(raw)
        return Event(str(item_id), rating, timestamp)
    rating, timestamp, n = _EVENT.unpack_from(raw)
    return Event(raw[_EVENT.size : _EVENT.size + n].decode(), rating, timestamp)


def _state_of(got: dict) -> StoredState | None:
    """A state hash (HGETALL's reply) -> the state; None for an empty reply (no state)."""
    return StoredState(got[b"v"].decode(), int(got[b"n"]), bytes(got[b"b"])) if got else None


class RedisStore:
    """`redis://[:password@]host:port/db` (or `rediss://`, `unix://`); see the module docstring."""

    def __init__(self, url: str, namespace: str = "di", op_ttl_s: int = 300, retries: int = 8, timeout_s: float = 5.0):
        # Reconnect with backoff for about 2.5 s: long enough to ride out a server restart.
        retry = Retry(ExponentialBackoff(cap=0.5, base=0.02), retries)
        self.url = redact_url(url)  # for messages and logs: never the password
        self._ns = namespace
        self._op_ttl_s = op_ttl_s
        # Connections are made on the first call (none here): a store that is down at start is a
        # StoreUnavailable per call, not a replica that cannot start.
        self._r = redis.Redis.from_url(
            url, retry=retry, socket_connect_timeout=min(timeout_s, 2.0), socket_timeout=timeout_s
        )
        self._append = self._r.register_script(_APPEND)
        self._append_key = self._r.register_script(_APPEND_ONCE)
        self._erase = self._r.register_script(_ERASE)
        self._load = self._r.register_script(_LOAD)
        self._put_state = self._r.register_script(_PUT_STATE)
        self._claim = self._r.register_script(_CLAIM)
        self._add_item = self._r.register_script(_ADD_ITEM)
        self._durable: bool | None = None
        self._durable_known = False

    @property
    def durable(self) -> bool | None:
        """True if the server fsyncs the AOF on every write, False if not (logged as a warning,
        once), None if CONFIG is not allowed; asked once, at first use. StoreUnavailable while
        Redis cannot answer."""
        if not self._durable_known:
            self._durable = self._check_durability()
            self._durable_known = True
        return self._durable

    @_redis_faults
    def _check_durability(self) -> bool | None:
        try:
            conf = self._r.config_get("append*")
        except redis.ResponseError:  # managed Redis often disables CONFIG
            return None
        durable = conf.get("appendonly") == "yes" and conf.get("appendfsync") == "always"
        if not durable:
            log.warning(
                "Redis at %s runs appendonly=%s appendfsync=%s: acknowledged events can be lost "
                "in a crash; run it with --appendonly yes --appendfsync always",
                self.url,
                conf.get("appendonly"),
                conf.get("appendfsync"),
            )
        return durable

    # -- keys ------------------------------------------------------------------------
    def _ev(self, user_id: str) -> str:
        return f"{self._ns}:ev:{user_id}"

    def _seen(self, user_id: str) -> str:
        return f"{self._ns}:seen:{user_id}"

    def _st(self, user_id: str) -> str:
        return f"{self._ns}:st:{user_id}"

    @property
    def _users(self) -> str:
        return f"{self._ns}:users"

    def _idem(self, user_id: str) -> str:
        return f"{self._ns}:idem:{user_id}:"

    # -- events ----------------------------------------------------------------------
    @_redis_faults
    def append_events(self, user_id: str, events: Sequence[Event], max_events: int | None = None) -> int:
        return self._append_once(user_id, events, uuid.uuid4().hex, max_events)

    @_redis_faults
    def append_once(
        self, user_id: str, key: str, events: Sequence[Event], max_events: int | None = None
    ) -> tuple[int, bool]:
        # A retry of the script itself (a dropped connection) finds the key and only reads: exactly once.
        digest = events_digest(events)
        keys = [
            self._ev(user_id),
            self._users,
            self._idem(user_id) + key,
            self._seen(user_id),
            f"{self._ns}:idemk:{user_id}",
        ]
        args = [IDEMPOTENCY_TTL_S, user_id, digest, _cap(max_events), time.time(), key, *_args(events)]
        outcome, n, seen = self._append_key(keys=keys, args=args)
        if outcome == 2:
            raise EventCapReached(user_id, int(n), int(max_events), len(events))
        if outcome == 1 and (seen.decode() if isinstance(seen, bytes) else seen) != digest:
            raise IdempotencyConflict(f"Idempotency-Key {key!r} was used for other events of this user")
        return int(n), bool(outcome)

    def _append_once(self, user_id: str, events: Sequence[Event], token: str, max_events: int | None = None) -> int:
        keys = [self._ev(user_id), self._users, f"{self._ns}:op:{token}", self._seen(user_id)]
        refused, n = self._append(keys=keys, args=[self._op_ttl_s, user_id, _cap(max_events), *_args(events)])
        if refused:
            raise EventCapReached(user_id, int(n), int(max_events), len(events))
        return int(n)

    @_redis_faults
    def events(self, user_id: str, start: int = 0, limit: int | None = None) -> list[Event]:
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        if limit is not None and limit <= 0:
            return []
        end = -1 if limit is None else start + int(limit) - 1
        return [_unpack(raw) for raw in self._r.lrange(self._ev(user_id), start, end)]

    @_redis_faults
    def count_events(self, user_id: str) -> int:
        return int(self._r.llen(self._ev(user_id)))

    @_redis_faults
    def seen_items(self, user_id: str) -> list[str]:
        items = self._r.smembers(self._seen(user_id))
        if not items and self._r.llen(self._ev(user_id)):  # a log from before the seen sets: fill it once
            ids = {e.item_id for e in self.events(user_id)}
            self._r.sadd(self._seen(user_id), *ids)
            return sorted(ids)
        return [i.decode() for i in items]

    # -- state cache -----------------------------------------------------------------
    @_redis_faults
    def get_state(self, user_id: str) -> StoredState | None:
        return _state_of(self._r.hgetall(self._st(user_id)))

    @_redis_faults
    def snapshot(self, user_id: str, with_seen: bool = False) -> UserSnapshot:
        with self._r.pipeline(transaction=True) as pipe:  # MULTI/EXEC: one round trip, one moment
            pipe.hgetall(self._st(user_id))
            pipe.llen(self._ev(user_id))
            pipe.lindex(self._ev(user_id), -1)
            if with_seen:
                pipe.smembers(self._seen(user_id))
            got, n, last, *items = pipe.execute()
        seen = None
        if with_seen:
            # An empty set beside a log from before the seen sets: seen_items fills it once.
            seen = [i.decode() for i in items[0]] if items[0] or not n else self.seen_items(user_id)
        return UserSnapshot(_state_of(got), int(n), _unpack(last) if last is not None else None, seen)

    @_redis_faults
    def put_state(self, user_id: str, state: StoredState) -> None:
        self._put_state(
            keys=[self._st(user_id), self._users], args=[state.model_version, int(state.n_events), state.blob, user_id]
        )

    # -- erasure and revoked tokens --------------------------------------------------------
    @_redis_faults
    def erase_user(self, user_id: str) -> int:
        keys = [self._ev(user_id), self._seen(user_id), self._st(user_id), self._users, f"{self._ns}:idemk:{user_id}"]
        return int(self._erase(keys=keys, args=[user_id, self._idem(user_id)]))

    @_redis_faults
    def revoke_token(self, jti: str, expires_at: float) -> None:
        self._r.zadd(f"{self._ns}:revoked", {jti: float(expires_at)}, gt=True)

    @_redis_faults
    def revoked_tokens(self) -> set[str]:
        key = f"{self._ns}:revoked"
        with self._r.pipeline(transaction=True) as pipe:
            pipe.zremrangebyscore(key, "-inf", f"({time.time()}")
            pipe.zrange(key, 0, -1)
            _, ids = pipe.execute()
        return {i.decode() for i in ids}

    # -- users -----------------------------------------------------------------------
    @_redis_faults
    def users(self, prefix: str = "", limit: int = 50) -> list[tuple[str, int]]:
        if limit <= 0:
            return []
        if prefix:
            p = prefix.encode()
            # b"\xff" never occurs in UTF-8, so "(p\xff" bounds every id that starts with p.
            lo, hi = b"[" + p, b"(" + p + b"\xff"
        else:
            lo, hi = b"-", b"+"
        ids = self._r.zrangebylex(self._users, lo, hi, start=0, num=int(limit))
        with self._r.pipeline(transaction=False) as pipe:
            for u in ids:
                pipe.llen(self._ev(u.decode()))
            counts = pipe.execute()
        return [(u.decode(), int(n)) for u, n in zip(ids, counts)]

    @_redis_faults
    def bulk_load(self, user_events: Mapping[str, Sequence[Event]], chunk: int = 500) -> None:
        # Pipelined in chunks of users: one round trip per chunk, each user atomic on its own.
        items = list(user_events.items())
        for i in range(0, len(items), chunk):
            with self._r.pipeline(transaction=False) as pipe:
                for user_id, events in items[i : i + chunk]:
                    self._load(
                        keys=[self._ev(user_id), self._users, self._seen(user_id)],
                        args=[user_id, *_args(events)],
                        client=pipe,
                    )
                pipe.execute()

    # -- the dataset -----------------------------------------------------------------
    @_redis_faults
    def dataset(self) -> DatasetRecord | None:
        held = self._r.hget(f"{self._ns}:meta", "dataset")
        return DatasetRecord.from_json(held) if held is not None else None

    @_redis_faults
    def claim_dataset(self, record: DatasetRecord, adopt: bool = False) -> None:
        held, has_users = self._claim(keys=[f"{self._ns}:meta", self._users], args=[record.to_json(), int(adopt)])
        held = DatasetRecord.from_json(held) if held else None  # Lua's false arrives as None
        check_claim(f"Redis store {self.url}", held, record, bool(has_users), adopt)

    # -- items added while serving ------------------------------------------------------
    @property
    def _items(self) -> list[str]:
        return [f"{self._ns}:items", f"{self._ns}:itemids"]

    @_redis_faults
    def add_item(self, item: AddedItem, max_items: int | None = None) -> int:
        outcome, n = self._add_item(keys=self._items, args=[item.item_id, _pack_item(item), _cap(max_items)])
        if outcome == 1:
            raise ItemExists(f"item {item.item_id!r} was added before")
        if outcome == 2:
            raise ItemCapReached(int(n), int(max_items))
        return int(n)

    @_redis_faults
    def count_items(self) -> int:
        return int(self._r.llen(self._items[0]))

    @_redis_faults
    def items_since(self, start: int, limit: int | None = None) -> list[AddedItem]:
        if limit is not None and limit <= 0:
            return []
        end = -1 if limit is None else int(start) + int(limit) - 1
        return [_unpack_item(raw) for raw in self._r.lrange(self._items[0], int(start), end)]

    @_redis_faults
    def get_item(self, item_id: str) -> AddedItem | None:
        seq = self._r.hmget(self._items[1], [item_id])[0]
        if seq is None:
            return None
        raw = self._r.lindex(self._items[0], int(seq) - 1)
        return _unpack_item(raw) if raw is not None else None

    @_redis_faults
    def ping(self) -> None:
        self._r.ping()

    def close(self) -> None:
        self._r.close()
