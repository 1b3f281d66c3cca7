"""Who may call the API: bearer tokens, signed JWTs (HS256, PyJWT) with one of two roles.

- a **user** token (`sub` = a user id) reads and writes that user only, and may rank an
  inline history or search the catalogue;
- a **service** token (the demo, a back end) acts for any user and may list users.

The signing secret comes from the environment (`DYNAMIC_INTEREST_AUTH_SECRET`, at least 32
characters; a Kubernetes Secret in `k8s/`), never from a config file; without it the ingress
refuses to start. Tokens are minted with the same secret:

    python -m ray_app.serve.auth --service            # a service token
    python -m ray_app.serve.auth --user 42 --days 30  # user 42's token, valid 30 days

Only `/healthz` and the API's own description (`/docs`, `/openapi.json`) answer without a
token. A missing or bad token is a 401, a token acting for another user a 403, both in the
API's `{detail, field}` error shape with `field` = "authorization".
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import secrets
import sys
import time
from dataclasses import dataclass

import jwt

SECRET_ENV = "DYNAMIC_INTEREST_AUTH_SECRET"
TOKEN_ENV = "DYNAMIC_INTEREST_TOKEN"  # a client's own token (the demo's service token)
MIN_SECRET_CHARS = 32
ALGORITHM = "HS256"
ISSUER = "dynamic-interest"
ROLES = ("user", "service")
FIELD = "authorization"


class AuthError(Exception):
    """A request the token does not allow: 401 (no or bad token), 403 (not this user's), 429 (too many)."""

    def __init__(self, status: int, detail: str, retry_after_s: int | None = None):
        super().__init__(detail)
        self.status, self.detail, self.retry_after_s = status, detail, retry_after_s


@dataclass(frozen=True)
class Principal:
    role: str  # "user" | "service"
    user_id: str | None  # the user a user token belongs to; None for a service
    token_key: str = ""  # a digest of the token itself: what the rate limit counts by

    def require_user(self, user_id: str) -> None:
        """403 unless this token may act for `user_id`."""
        if self.role != "service" and self.user_id != user_id:
            raise AuthError(403, f"this token belongs to user {self.user_id!r} and may not act for user {user_id!r}")

    def require_service(self, what: str) -> None:
        if self.role != "service":
            raise AuthError(403, f"{what} needs a service token; this one belongs to user {self.user_id!r}")


class RateLimit:
    """Requests per token per minute, in one process (each Ingress replica counts its own: with R
    replicas a token gets up to R times the rate). A sliding-window counter: the count of the
    current minute plus the previous minute's, weighted by how much of it the window still covers.
    The counts live in a `cachetools.TTLCache` (bounded to `max_tokens` tokens' counts; a count
    expires two minutes after its minute began), swept on access: no timer thread, nothing that
    grows with the callers."""

    WINDOW_S = 60.0

    def __init__(self, user_per_minute: int, service_per_minute: int, max_tokens: int = 100_000):
        from cachetools import TTLCache

        self._limits = {"user": user_per_minute, "service": service_per_minute}
        self._counts: TTLCache = TTLCache(maxsize=2 * max_tokens, ttl=2 * self.WINDOW_S)  # (token, minute) -> n

    def admit(self, who: Principal, now: float | None = None) -> None:
        """AuthError(429) once the caller's token has used up its minute."""
        limit = self._limits[who.role]
        now = time.time() if now is None else now
        minute, into = divmod(now, self.WINDOW_S)
        current = self._counts.get((who.token_key, minute), 0)
        previous = self._counts.get((who.token_key, minute - 1), 0)
        if previous * (1.0 - into / self.WINDOW_S) + current + 1 > limit:
            wait = max(1, math.ceil(self.WINDOW_S - into))
            raise AuthError(
                429,
                f"rate limit: at most {limit} requests a minute for this token; retry in {wait} s",
                retry_after_s=wait,
            )
        self._counts[(who.token_key, minute)] = current + 1


class TokenCheck:
    """`verify` with a bounded memory of the tokens it already checked (a `cachetools.TTLCache` of
    `max_tokens`, each kept `ttl_s`): a client's repeated requests skip the HMAC and the claims'
    parsing; an expiring token is still refused from the moment its `exp` passes."""

    def __init__(self, max_tokens: int = 10_000, ttl_s: float = 60.0):
        from cachetools import TTLCache

        self._known: TTLCache = TTLCache(maxsize=max_tokens, ttl=ttl_s)  # (secret, header) -> (who, exp)

    def __call__(self, secret: str, authorization: str | None) -> Principal:
        key = (secret, authorization)  # a rotated secret checks every token again
        hit = self._known.get(key)
        if hit is not None and (hit[1] is None or hit[1] > time.time()):
            return hit[0]
        who, exp = _verify(secret, authorization)
        self._known[key] = (who, exp)
        return who


def secret_from_env(environ=os.environ) -> str:
    secret = environ.get(SECRET_ENV, "")
    if len(secret) < MIN_SECRET_CHARS:
        state = "is not set" if not secret else f"has {len(secret)} characters"
        raise RuntimeError(
            f"{SECRET_ENV} {state}: the API signs and checks tokens with it and needs at least "
            f"{MIN_SECRET_CHARS} characters (e.g. `python -c 'import secrets; "
            f"print(secrets.token_urlsafe(32))'`)"
        )
    return secret


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def mint(secret: str, role: str, user_id: str | None = None, ttl_s: float | None = None) -> str:
    """A signed token; a user token names its user, a service token none."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if (role == "user") != (user_id is not None):
        raise ValueError("a user token needs a user id, a service token takes none")
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "role": role,
        "iat": now,
        **({"sub": user_id} if user_id is not None else {}),
        **({"exp": now + int(ttl_s)} if ttl_s else {}),
    }
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify(secret: str, authorization: str | None) -> Principal:
    """The `Authorization` header's value -> who is calling; AuthError(401) when it proves nothing."""
    return _verify(secret, authorization)[0]


def _verify(secret: str, authorization: str | None) -> tuple[Principal, float | None]:
    """`verify`, and the token's expiry time (None: it does not expire)."""
    if not authorization:
        raise AuthError(401, "missing bearer token: send `Authorization: Bearer <token>`")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError(401, "the Authorization header must be `Bearer <token>`")
    try:
        claims = jwt.decode(
            token.strip(), secret, algorithms=[ALGORITHM], issuer=ISSUER, options={"require": ["iss", "role", "iat"]}
        )
    except jwt.ExpiredSignatureError:
        raise AuthError(401, "the token has expired") from None
    except jwt.InvalidTokenError as e:
        raise AuthError(401, f"invalid token ({e})") from None
    role, user_id = claims.get("role"), claims.get("sub")
    if role not in ROLES or (role == "user") != isinstance(user_id, str):
        raise AuthError(401, "invalid token (its role or subject is malformed)")
    digest = hashlib.sha256(token.strip().encode()).hexdigest()[:32]
    return Principal(role, user_id if role == "user" else None, digest), claims.get("exp")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ray_app.serve.auth", description=f"Mint an API token with ${SECRET_ENV}."
    )
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", help="a token for this user id only")
    who.add_argument("--service", action="store_true", help="a token that acts for any user")
    p.add_argument("--days", type=float, default=None, help="expire after this many days (default: never)")
    a = p.parse_args(argv)
    try:
        secret = secret_from_env()
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ttl = a.days * 86400 if a.days else None
    print(mint(secret, "service", ttl_s=ttl) if a.service else mint(secret, "user", a.user, ttl_s=ttl))
    return 0


if __name__ == "__main__":
    sys.exit(main())
