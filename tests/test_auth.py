"""Bearer tokens (ray_app.serve.auth) without a server: what each token proves, and what it does not.
The same rules over real HTTP, on every route, are in tests/test_serve_http.py and tests/test_attacks.py;
the rate limits in tests/test_quotas.py."""

from __future__ import annotations

import time

import jwt
import pytest

from ray_app.serve.auth import (
    MAX_TTL_S,
    SECRET_ENV,
    VERIFY_SECRET_ENV,
    AuthError,
    Keys,
    Principal,
    TokenCheck,
    key_id,
    main,
    mint,
    new_secret,
    secret_from_env,
    verify,
)

SECRET = new_secret()
KID = {"kid": key_id(SECRET)}


def forged(claims: dict, key=SECRET, algorithm="HS256", headers=KID) -> str:
    """A token signed by hand, with the claims a test wants (defaults: a valid service token; None
    leaves a claim out)."""
    now = int(time.time())
    base = {"iss": "dynamic-interest", "role": "service", "iat": now, "exp": now + 60, "jti": "j1"}
    claims = {k: v for k, v in {**base, **claims}.items() if v is not None}
    return "Bearer " + jwt.encode(claims, key, algorithm, headers=headers)


def test_user_and_service_tokens_say_who_calls():
    user = verify(SECRET, f"Bearer {mint(SECRET, 'user', '42')}")
    assert (user.role, user.user_id) == ("user", "42") and len(user.token_key) == 32
    service = verify(SECRET, f"bearer {mint(SECRET, 'service')}")
    assert (service.role, service.user_id) == ("service", None)


@pytest.mark.parametrize(
    "header,why",
    [
        (lambda: None, "missing bearer token"),
        (lambda: "", "missing bearer token"),
        (lambda: "Basic dXNlcjpwYXNz", "must be `Bearer <token>`"),
        (lambda: "Bearer ", "must be `Bearer <token>`"),
        (lambda: "Bearer abc.def.ghi", "invalid token"),
        (lambda: f"Bearer {mint(new_secret(), 'service')}", "is not one of the API's keys"),
        (lambda: forged({}, key=new_secret()), "Signature verification failed"),  # our key id, another key
        (lambda: f"Bearer {mint(SECRET, 'service', ttl_s=-5)}", "expired"),
        (lambda: forged({"role": "admin"}), "role"),
        (lambda: forged({"role": "user"}), "subject"),
        (lambda: forged({"iss": "elsewhere"}), "issuer"),
        (lambda: forged({}, None, "none"), "not allowed"),
        (lambda: forged({}, headers={}), "names no key id"),
        (lambda: forged({}, headers={"kid": "0123456789abcdef"}), "is not one of the API's keys"),
        (lambda: forged({"exp": None}), "exp"),
        (lambda: forged({"jti": None}), "jti"),
        (lambda: forged({"iat": None}), "iat"),
        (lambda: forged({"exp": int(time.time()) + MAX_TTL_S["service"] + 100}), "may live"),
        (lambda: forged({"role": "user", "sub": "7", "exp": int(time.time()) + MAX_TTL_S["user"] + 100}), "may live"),
    ],
)
def test_a_token_that_proves_nothing_is_a_401(header, why):
    # Tokens are made when the test runs, not when it is collected: a suite that runs for longer than
    # a forged token's minute would otherwise find it expired.
    with pytest.raises(AuthError, match=why) as e:
        verify(SECRET, header())
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


def test_every_token_expires_has_an_id_and_names_its_key():
    now = time.time()
    user, service = (
        verify(SECRET, f"Bearer {mint(SECRET, 'user', '7')}"),
        verify(SECRET, f"Bearer {mint(SECRET, 'service')}"),
    )
    assert 3600 - 5 <= user.expires_at - now <= 3600 + 5  # the default lifetimes: 1 hour, 30 days
    assert 30 * 86400 - 5 <= service.expires_at - now <= 30 * 86400 + 5
    assert user.jti != service.jti and len(user.jti) == 32
    assert jwt.get_unverified_header(mint(SECRET, "service"))["kid"] == key_id(SECRET) != key_id(new_secret())
    with pytest.raises(ValueError, match="at most"):
        mint(SECRET, "user", "7", ttl_s=MAX_TTL_S["user"] + 1)
    with pytest.raises(ValueError):
        mint(SECRET, "user")  # a user token needs its user


def test_a_revoked_token_is_refused_even_when_remembered():
    check = TokenCheck()
    header = f"Bearer {mint(SECRET, 'user', '42')}"
    who = check(SECRET, header)
    assert check(SECRET, header, revoked={"another"}) == who
    with pytest.raises(AuthError, match="revoked") as e:
        check(SECRET, header, revoked={who.jti})
    assert e.value.status == 401
    with pytest.raises(AuthError, match="revoked"):
        verify(SECRET, header, revoked={who.jti})


def test_a_key_rotates_without_a_moment_when_a_live_token_is_refused():
    """The documented rotation from key A to key B, each step a configuration every replica may run
    beside the previous step's: (1) sign with A, verify B too; (2) sign with B, verify A too; (3)
    after the longest token lifetime, B alone. A token of either key is accepted wherever a
    replica of the neighbouring step may see it."""
    a, b = new_secret(), new_secret()
    before, step1, step2, step3 = Keys(a), Keys(a, b), Keys(b, a), Keys(b)
    token_a, token_b = f"Bearer {mint(before, 'user', '1')}", f"Bearer {mint(step2, 'user', '1')}"
    assert mint(step1, "service").count(".") == 2 and jwt.get_unverified_header(mint(step1, "service"))[
        "kid"
    ] == key_id(a)
    for keys in (before, step1, step2):
        assert verify(keys, token_a).user_id == "1"  # A's tokens, until step 3
    for keys in (step1, step2, step3):
        assert verify(keys, token_b).user_id == "1"  # B's tokens, from step 1 on
    with pytest.raises(AuthError, match="not one of the API's keys"):
        verify(step3, token_a)  # retired with its key
    with pytest.raises(AuthError, match="not one of the API's keys"):
        verify(before, token_b)


def test_the_keys_come_from_the_environment(monkeypatch):
    a, b = new_secret(), new_secret()
    monkeypatch.setenv(SECRET_ENV, a)
    monkeypatch.delenv(VERIFY_SECRET_ENV, raising=False)
    assert Keys.from_env() == Keys(a)
    monkeypatch.setenv(VERIFY_SECRET_ENV, b)
    assert Keys.from_env() == Keys(a, b) and set(Keys.from_env().by_id) == {key_id(a), key_id(b)}
    monkeypatch.setenv(VERIFY_SECRET_ENV, "short")
    with pytest.raises(RuntimeError, match=f"{VERIFY_SECRET_ENV} has 5 characters"):
        Keys.from_env()


def test_minting_and_revoking_from_the_command_line(monkeypatch, capsys, tmp_path):
    from ray_app.store.sqlite import SQLiteStore

    monkeypatch.setenv(SECRET_ENV, SECRET)
    monkeypatch.delenv(VERIFY_SECRET_ENV, raising=False)
    assert main(["--user", "7", "--days", "1"]) == 0  # the flags without a subcommand still mint
    out = capsys.readouterr()
    who = verify(SECRET, "Bearer " + out.out.strip())
    assert who.user_id == "7" and who.jti in out.err and 86400 - 5 <= who.expires_at - time.time() <= 86400
    assert main(["mint", "--service", "--hours", "2"]) == 0
    service_token = capsys.readouterr().out.strip()
    url = f"sqlite:///{tmp_path}/state.db"
    assert main(["revoke", who.jti, "--store-url", url]) == 0
    assert main(["revoke", service_token, "--store-url", url]) == 0  # a whole token: its jti and exp
    assert SQLiteStore(str(tmp_path / "state.db")).revoked_tokens() == {
        who.jti,
        verify(SECRET, f"Bearer {service_token}").jti,
    }
    assert main(["kid"]) == 0 and key_id(SECRET) in capsys.readouterr().out
    assert main(["mint", "--user", "7", "--hours", "48"]) == 2 and "at most" in capsys.readouterr().err
    monkeypatch.delenv(SECRET_ENV)
    assert main(["--service"]) == 2 and SECRET_ENV in capsys.readouterr().err


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
