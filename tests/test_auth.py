"""Bearer tokens (ray_app.serve.auth) without a server: what each token proves, and what it does not.
The same rules over real HTTP, on every route, are in tests/test_serve_http.py."""

from __future__ import annotations

import time

import jwt
import pytest

from ray_app.serve.auth import (
    SECRET_ENV,
    AuthError,
    Principal,
    RateLimit,
    TokenCheck,
    main,
    mint,
    new_secret,
    secret_from_env,
    verify,
)

SECRET = new_secret()


def test_user_and_service_tokens_say_who_calls():
    user = verify(SECRET, f"Bearer {mint(SECRET, 'user', '42')}")
    assert (user.role, user.user_id) == ("user", "42") and len(user.token_key) == 32
    service = verify(SECRET, f"bearer {mint(SECRET, 'service')}")
    assert (service.role, service.user_id) == ("service", None)


@pytest.mark.parametrize(
    "header,why",
    [
        (None, "missing bearer token"),
        ("", "missing bearer token"),
        ("Basic dXNlcjpwYXNz", "must be `Bearer <token>`"),
        ("Bearer ", "must be `Bearer <token>`"),
        ("Bearer abc.def.ghi", "invalid token"),
        (f"Bearer {mint(new_secret(), 'service')}", "Signature verification failed"),
        (f"Bearer {mint(SECRET, 'service', ttl_s=-5)}", "expired"),
        (f"Bearer {jwt.encode({'iss': 'dynamic-interest', 'role': 'admin', 'iat': 0}, SECRET, 'HS256')}", "role"),
        (f"Bearer {jwt.encode({'iss': 'dynamic-interest', 'role': 'user', 'iat': 0}, SECRET, 'HS256')}", "subject"),
        (f"Bearer {jwt.encode({'iss': 'elsewhere', 'role': 'service', 'iat': 0}, SECRET, 'HS256')}", "issuer"),
        (f"Bearer {jwt.encode({'iss': 'dynamic-interest', 'role': 'service', 'iat': 0}, None, 'none')}", "not allowed"),
    ],
)
def test_a_token_that_proves_nothing_is_a_401(header, why):
    with pytest.raises(AuthError, match=why) as e:
        verify(SECRET, header)
    assert e.value.status == 401


def test_a_user_token_acts_for_its_user_only():
    me = Principal("user", "42")
    me.require_user("42")
    with pytest.raises(AuthError, match="may not act for user '43'") as e:
        me.require_user("43")
    assert e.value.status == 403
    with pytest.raises(AuthError, match="service token") as e:
        me.require_service("listing users")
    assert e.value.status == 403
    Principal("service", None).require_user("43")
    Principal("service", None).require_service("listing users")


def test_the_secret_must_be_set_and_long(monkeypatch):
    monkeypatch.delenv(SECRET_ENV, raising=False)
    with pytest.raises(RuntimeError, match=f"{SECRET_ENV} is not set"):
        secret_from_env()
    monkeypatch.setenv(SECRET_ENV, "short")
    with pytest.raises(RuntimeError, match="has 5 characters"):
        secret_from_env()
    monkeypatch.setenv(SECRET_ENV, SECRET)
    assert secret_from_env() == SECRET


def test_minting_from_the_command_line(monkeypatch, capsys):
    monkeypatch.setenv(SECRET_ENV, SECRET)
    assert main(["--user", "7", "--days", "1"]) == 0
    assert verify(SECRET, "Bearer " + capsys.readouterr().out.strip()).user_id == "7"
    monkeypatch.delenv(SECRET_ENV)
    assert main(["--service"]) == 2 and SECRET_ENV in capsys.readouterr().err
    with pytest.raises(ValueError):
        mint(SECRET, "user")  # a user token needs its user


def test_the_rate_limit_counts_per_token():
    limit = RateLimit(user_per_minute=3, service_per_minute=5)
    alice = verify(SECRET, f"Bearer {mint(SECRET, 'user', 'alice')}")
    alice_again = verify(SECRET, f"Bearer {mint(SECRET, 'user', 'alice', ttl_s=3600)}")  # another token
    for _ in range(3):
        limit.admit(alice)
    with pytest.raises(AuthError, match="at most 3 requests a minute") as e:
        limit.admit(alice)
    assert e.value.status == 429 and 1 <= e.value.retry_after_s <= 60
    limit.admit(alice_again)  # its own count
    service = verify(SECRET, f"Bearer {mint(SECRET, 'service')}")
    for _ in range(5):
        limit.admit(service)
    with pytest.raises(AuthError):
        limit.admit(service)


def test_the_rate_limit_window_slides_and_its_memory_is_bounded():
    limit = RateLimit(user_per_minute=10, service_per_minute=10, max_tokens=4)
    alice = Principal("user", "alice", "a" * 32)
    t0 = 6000.0  # the start of a minute
    for j in range(10):
        limit.admit(alice, now=t0 + j)
    with pytest.raises(AuthError):
        limit.admit(alice, now=t0 + 30)
    # 15 s into the next minute the previous one still weighs 10 * 0.75 = 7.5: two more fit, not three.
    limit.admit(alice, now=t0 + 75)
    limit.admit(alice, now=t0 + 75)
    with pytest.raises(AuthError) as e:
        limit.admit(alice, now=t0 + 75)
    assert e.value.retry_after_s == 45
    limit.admit(alice, now=t0 + 180)  # two minutes on, the old minutes no longer count
    for j in range(50):  # many tokens: the counts stay within the bound
        limit.admit(Principal("user", str(j), f"{j:032d}"), now=t0 + 200)
    assert len(limit._counts) <= 8


def test_a_remembered_token_is_refused_once_it_expires_and_bad_tokens_are_never_remembered():
    check = TokenCheck(max_tokens=2)
    header = f"Bearer {mint(SECRET, 'user', '42', ttl_s=1)}"
    assert check(SECRET, header).user_id == "42"
    assert check(SECRET, header).user_id == "42"  # from memory
    with pytest.raises(AuthError, match="invalid token"):
        check(new_secret(), header)  # another secret: checked again, and refused
    with pytest.raises(AuthError):
        check(SECRET, header + "x")
    assert len(check._known) == 1
    time.sleep(2.05)  # past its `exp` (whole seconds), while still remembered
    with pytest.raises(AuthError, match="expired"):
        check(SECRET, header)
