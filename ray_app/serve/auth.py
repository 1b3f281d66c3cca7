"""Who may call the API: bearer tokens, signed JWTs (HS256, PyJWT) with one of two roles.

- a **user** token (`sub` = a user id) reads and writes that user only, and may rank an
  inline history or search the catalogue;
- a **service** token (the demo, a back end) acts for any user, lists users, erases users and
  mints user tokens (`POST /tokens`).

Every token expires (`exp` is required; a user token lives 1 hour by default and 1 day at most,
a service token 30 days by default and 90 at most), carries an id (`jti`) that can be revoked,
and names the key that signed it (`kid`). The keys come from the environment, never from a
config file: `DYNAMIC_INTEREST_AUTH_SECRET` signs and verifies, and the optional
`DYNAMIC_INTEREST_AUTH_VERIFY_SECRET` only verifies, so that a key rotates without downtime
(docs/serving.md, "Rotating the signing key"). Each is at least 32 characters; without the first
the ingress refuses to start.

    python -m ray_app.serve.auth mint --service               # a service token (30 days)
    python -m ray_app.serve.auth mint --user 42 --hours 0.25  # user 42's token, 15 minutes
    python -m ray_app.serve.auth revoke JTI_OR_TOKEN --store-url redis://...   # refused from now on
    python -m ray_app.serve.auth kid                          # the key ids of the keys set

Only `/healthz`, `/readyz` and the API's own description (`/docs`, `/openapi.json`) answer
without a token. A missing or bad token is a 401, a token acting for another user a 403, both in
the API's `{detail, field}` error shape with `field` = "authorization".
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import sys
import time
import uuid
from dataclasses import dataclass

import jwt

SECRET_ENV = "DYNAMIC_INTEREST_AUTH_SECRET"  # the signing key (also verifies)
VERIFY_SECRET_ENV = "DYNAMIC_INTEREST_AUTH_VERIFY_SECRET"  # a second key that only verifies (rotation)
TOKEN_ENV = "DYNAMIC_INTEREST_TOKEN"  # a client's own token (the demo's service token)
MIN_SECRET_CHARS = 32
ALGORITHM = "HS256"
ISSUER = "dynamic-interest"
ROLES = ("user", "service")
FIELD = "authorization"
DEFAULT_TTL_S = {"user": 3600, "service": 30 * 86400}  # what `mint` gives when asked for no lifetime
MAX_TTL_S = {"user": 86400, "service": 90 * 86400}  # the longest lifetime `verify` accepts (exp - iat)


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
    jti: str = ""  # the token's id: what a revocation names
    expires_at: float = 0.0  # the token's `exp`

    def require_user(self, user_id: str) -> None:
        """403 unless this token may act for `user_id`."""
        if self.role != "service" and self.user_id != user_id:
            raise AuthError(403, f"this token belongs to user {self.user_id!r} and may not act for user {user_id!r}")

    def require_service(self, what: str) -> None:
        if self.role != "service":
            raise AuthError(403, f"{what} needs a service token; this one belongs to user {self.user_id!r}")


def key_id(secret: str) -> str:
    """The `kid` of a key: a short digest that names the key without revealing it."""
    return hashlib.sha256(b"dynamic-interest key id:" + secret.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Keys:
    """The signing key and, during a rotation, a second key that only verifies."""

    signing: str
    verify_only: str | None = None

    @property
    def by_id(self) -> dict[str, str]:
        keys = {key_id(self.signing): self.signing}
        if self.verify_only:
            keys[key_id(self.verify_only)] = self.verify_only
        return keys

    @classmethod
    def from_env(cls, environ=os.environ) -> Keys:
        return cls(secret_from_env(environ), _checked(VERIFY_SECRET_ENV, environ.get(VERIFY_SECRET_ENV)) or None)


def _checked(name: str, secret: str | None) -> str | None:
    if secret and len(secret) < MIN_SECRET_CHARS:
        raise RuntimeError(f"{name} has {len(secret)} characters: a key needs at least {MIN_SECRET_CHARS}")
    return secret


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


def mint(keys: str | Keys, role: str, user_id: str | None = None, ttl_s: float | None = None) -> str:
    """A signed token that expires after `ttl_s` (default: DEFAULT_TTL_S of its role); a user token
    names its user, a service token none."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if (role == "user") != (user_id is not None):
        raise ValueError("a user token needs a user id, a service token takes none")
    ttl = DEFAULT_TTL_S[role] if ttl_s is None else ttl_s
    if ttl > MAX_TTL_S[role]:
        raise ValueError(f"a {role} token lives at most {MAX_TTL_S[role]} s, asked for {ttl:g}")
    secret = keys.signing if isinstance(keys, Keys) else keys
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "role": role,
        "iat": now,
        "exp": now + int(ttl),
        "jti": uuid.uuid4().hex,
        **({"sub": user_id} if user_id is not None else {}),
    }
    return jwt.encode(claims, secret, algorithm=ALGORITHM, headers={"kid": key_id(secret)})


def verify(keys: str | Keys, authorization: str | None, revoked: set[str] | frozenset = frozenset()) -> Principal:
    """The `Authorization` header's value -> who is calling; AuthError(401) when it proves nothing
    (no token, a bad signature, an unknown key, expired, too long-lived, or revoked)."""
    who = decode(keys, authorization)
    if who.jti in revoked:
        raise AuthError(401, "the token has been revoked")
    return who


def decode(keys: str | Keys, authorization: str | None) -> Principal:
    """`verify` without the revocation list."""
    keys = keys if isinstance(keys, Keys) else Keys(keys)
    if not authorization:
        raise AuthError(401, "missing bearer token: send `Authorization: Bearer <token>`")
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthError(401, "the Authorization header must be `Bearer <token>`")
    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except jwt.InvalidTokenError as e:
        raise AuthError(401, f"invalid token ({e})") from None
    if not isinstance(kid, str):
        raise AuthError(401, "invalid token (its header names no key id, `kid`)")
    secret = keys.by_id.get(kid)
    if secret is None:
        raise AuthError(401, f"invalid token (key id {kid!r} is not one of the API's keys)")
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            issuer=ISSUER,
            options={"require": ["iss", "role", "iat", "exp", "jti"]},
        )
    except jwt.ExpiredSignatureError:
        raise AuthError(401, "the token has expired") from None
    except jwt.InvalidTokenError as e:
        raise AuthError(401, f"invalid token ({e})") from None
    role, user_id, jti = claims.get("role"), claims.get("sub"), claims.get("jti")
    if role not in ROLES or (role == "user") != isinstance(user_id, str) or not isinstance(jti, str):
        raise AuthError(401, "invalid token (its role, subject or id is malformed)")
    if claims["exp"] - claims["iat"] > MAX_TTL_S[role]:
        raise AuthError(401, f"invalid token (a {role} token may live {MAX_TTL_S[role]} s at most)")
    digest = hashlib.sha256(token.encode()).hexdigest()[:32]
    return Principal(role, user_id if role == "user" else None, digest, jti, float(claims["exp"]))


class TokenCheck:
    """`verify` with a bounded memory of the tokens it already checked (a `cachetools.TTLCache` of
    `max_tokens`, each kept `ttl_s`): a client's repeated requests skip the HMAC and the claims'
    parsing; an expiring token is still refused from the moment its `exp` passes, and a revoked
    one as soon as `revoked` names it."""

    def __init__(self, max_tokens: int = 10_000, ttl_s: float = 60.0):
        from cachetools import TTLCache

        self._known: TTLCache = TTLCache(maxsize=max_tokens, ttl=ttl_s)  # (keys, header) -> who

    def __call__(self, keys: str | Keys, authorization: str | None, revoked: set[str] | frozenset = frozenset()):
        key = (keys, authorization)  # a rotated key checks every token again
        who = self._known.get(key)
        if who is None or who.expires_at <= time.time():
            who = decode(keys, authorization)
            self._known[key] = who
        if who.jti in revoked:
            raise AuthError(401, "the token has been revoked")
        return who


def _token_claims(text: str) -> tuple[str, float | None]:
    """A token id or a whole token (its signature unchecked) -> (jti, its exp if known)."""
    if text.count(".") == 2:
        claims = jwt.decode(text, options={"verify_signature": False})
        return str(claims["jti"]), float(claims["exp"])
    return text, None


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("--") and argv[0] not in ("-h", "--help"):
        argv = ["mint", *argv]  # `--user 42` / `--service`: minting, as before the subcommands
    p = argparse.ArgumentParser(prog="python -m ray_app.serve.auth", description="Mint or revoke API tokens.")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("mint", help=f"print a new token signed with ${SECRET_ENV}")
    who = m.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", help="a token for this user id only")
    who.add_argument("--service", action="store_true", help="a token that acts for any user")
    m.add_argument(
        "--hours",
        type=float,
        default=None,
        help=f"lifetime (default {DEFAULT_TTL_S['user'] // 3600} h for a user, "
        f"{DEFAULT_TTL_S['service'] // 86400} days for a service; at most {MAX_TTL_S['user'] // 3600} h "
        f"and {MAX_TTL_S['service'] // 86400} days)",
    )
    m.add_argument("--days", type=float, default=None, help="lifetime in days (instead of --hours)")
    r = sub.add_parser("revoke", help="refuse a token from now on (within seconds on every replica)")
    r.add_argument("token", help="the token's id (jti, printed when it was minted) or the token itself")
    r.add_argument("--store-url", required=True, help="the API's state store (its `store_url`)")
    sub.add_parser("kid", help="print the key id of each key set in the environment")
    a = p.parse_args(argv)
    try:
        if a.command == "mint":
            keys = Keys.from_env()
            role = "service" if a.service else "user"
            hours = a.days * 24 if a.days is not None else a.hours
            token = mint(keys, role, a.user, ttl_s=None if hours is None else hours * 3600)
            who = decode(keys, f"Bearer {token}")
            print(token)
            print(
                f"jti {who.jti}, expires {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(who.expires_at))}",
                file=sys.stderr,
            )
        elif a.command == "revoke":
            from ray_app.store.opener import open_store

            jti, exp = _token_claims(a.token.strip())
            store = open_store(a.store_url)
            try:
                # Without the token's own expiry, kept as long as any token may live.
                store.revoke_token(jti, exp if exp is not None else time.time() + max(MAX_TTL_S.values()))
            finally:
                store.close()
            print(f"revoked {jti}")
        else:
            keys = Keys.from_env()
            print(f"{SECRET_ENV}: {key_id(keys.signing)} (signs)")
            if keys.verify_only:
                print(f"{VERIFY_SECRET_ENV}: {key_id(keys.verify_only)} (verifies only)")
    except (RuntimeError, ValueError, jwt.InvalidTokenError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
