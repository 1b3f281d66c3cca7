"""Who may log in to the demo: accounts with argon2id password hashes (argon2-cffi), each bound to
one user id of the API, or an admin that may act for any user (every such act is logged).

The accounts come from a YAML file (`--accounts FILE`, or `$DYNAMIC_INTEREST_DEMO_ACCOUNTS_FILE`)
or from the environment (`$DYNAMIC_INTEREST_DEMO_ACCOUNTS`, the same YAML), never from the page:

    alice: {password: "$argon2id$v=19$m=65536,t=3,p=4$...", user_id: "42"}
    ops:   {password: "$argon2id$...", admin: true}

    python -m gradio_demo.accounts add demo-accounts.yaml alice --user 42      # asks for the password
    python -m gradio_demo.accounts add demo-accounts.yaml ops --admin

The file is written owner-only; a password is never stored, only its hash.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

ACCOUNTS_ENV = "DYNAMIC_INTEREST_DEMO_ACCOUNTS"  # the accounts' YAML itself
ACCOUNTS_FILE_ENV = "DYNAMIC_INTEREST_DEMO_ACCOUNTS_FILE"  # or a file that holds it
_hasher = PasswordHasher()  # argon2id with the library's recommended parameters


@dataclass(frozen=True)
class Account:
    name: str
    password_hash: str
    user_id: str | None  # the one user this account acts for; None for an admin
    admin: bool = False


class AccountsError(ValueError):
    """Accounts that cannot be used; the message names the source and the account."""


def hash_password(password: str) -> str:
    return _hasher.hash(password)


class Accounts:
    """The demo's accounts; `check` is Gradio's `auth` callable."""

    def __init__(self, accounts: dict[str, Account]):
        self._accounts = accounts
        # Verifying against a real hash when the name is unknown takes as long as a wrong password:
        # the time of a failed login does not tell whether the account exists.
        self._decoy = hash_password(os.urandom(16).hex())

    def __len__(self) -> int:
        return len(self._accounts)

    def get(self, name: str | None) -> Account | None:
        return self._accounts.get(name or "")

    def check(self, name: str, password: str) -> bool:
        account = self._accounts.get(name)
        try:
            return _hasher.verify(account.password_hash if account else self._decoy, password) and account is not None
        except (VerificationError, InvalidHashError):
            return False

    @classmethod
    def parse(cls, text: str, source: str) -> Accounts:
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise AccountsError(f"{source}: not YAML ({e})") from None
        if not isinstance(raw, dict):
            raise AccountsError(f"{source}: expected a mapping of account names")
        accounts = {}
        for name, entry in raw.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("password"), str):
                raise AccountsError(f"{source}: account {name!r} needs a `password` (an argon2 hash)")
            if not entry["password"].startswith("$argon2"):
                raise AccountsError(
                    f"{source}: account {name!r}: `password` must be an argon2 hash "
                    "(python -m gradio_demo.accounts add ...), never the password itself"
                )
            admin, user_id = bool(entry.get("admin", False)), entry.get("user_id")
            if admin == (user_id is not None):
                raise AccountsError(f"{source}: account {name!r} needs either `user_id` or `admin: true`")
            accounts[str(name)] = Account(str(name), entry["password"], None if admin else str(user_id), admin)
        return cls(accounts)

    @classmethod
    def from_env(cls, path: str | Path | None = None, environ=os.environ) -> Accounts:
        """From `path`, else $DYNAMIC_INTEREST_DEMO_ACCOUNTS_FILE, else $DYNAMIC_INTEREST_DEMO_ACCOUNTS;
        AccountsError when none is set or none holds an account (the demo never runs without login)."""
        path = path or environ.get(ACCOUNTS_FILE_ENV)
        if path:
            try:
                accounts = cls.parse(Path(path).read_text(), str(path))
            except OSError as e:
                raise AccountsError(f"{path}: cannot be read ({e.strerror})") from None
        elif environ.get(ACCOUNTS_ENV):
            accounts = cls.parse(environ[ACCOUNTS_ENV], f"${ACCOUNTS_ENV}")
        else:
            raise AccountsError(
                f"no demo accounts: give --accounts FILE, ${ACCOUNTS_FILE_ENV} or ${ACCOUNTS_ENV} "
                "(python -m gradio_demo.accounts add FILE NAME --user ID makes one)"
            )
        if not len(accounts):
            raise AccountsError("the demo accounts hold no account")
        return accounts


def add_account(path: Path, name: str, password: str, user_id: str | None, admin: bool) -> None:
    """Add or replace `name` in the accounts file at `path` (created owner-only)."""
    from models.files import atomic_path

    raw = yaml.safe_load(path.read_text()) if path.is_file() else {}
    entry = {"password": hash_password(password), **({"admin": True} if admin else {"user_id": str(user_id)})}
    raw = {**(raw or {}), name: entry}
    Accounts.parse(yaml.safe_dump(raw), str(path))  # what is written can be read back
    with atomic_path(path, mode=0o600) as tmp:
        tmp.write_text(yaml.safe_dump(raw, sort_keys=True))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gradio_demo.accounts", description="Manage the demo's accounts.")
    sub = p.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="add or replace an account (asks for its password)")
    add.add_argument("file", type=Path)
    add.add_argument("name")
    who = add.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", help="the user id this account acts for")
    who.add_argument("--admin", action="store_true", help="may act for any user (each act is logged)")
    add.add_argument("--password-env", help="read the password from this environment variable instead of asking")
    a = p.parse_args(argv)
    password = os.environ.get(a.password_env, "") if a.password_env else getpass.getpass(f"password for {a.name}: ")
    if len(password) < 8:
        print("error: a password needs at least 8 characters", file=sys.stderr)
        return 2
    try:
        add_account(a.file, a.name, password, a.user, a.admin)
    except (AccountsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{a.file}: account {a.name!r} " + ("(admin)" if a.admin else f"for user {a.user!r}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
