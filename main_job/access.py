"""The API's signing secret, the service token of a run and the demo's login, kept owner-only under runs/main."""

from __future__ import annotations

import os
from pathlib import Path

from main_job.settings import MainSettings, NewcomerError


def private_write(path: Path, text: str) -> None:
    """Write a file only its owner can read, atomically (a crash leaves the old one)."""
    from models.files import atomic_path

    with atomic_path(path, mode=0o600) as tmp:  # owner-only from its creation on
        tmp.write_text(text + "\n")


def setup_access(s: MainSettings) -> str:
    """The API's signing secret into this process's environment, before Ray starts (its workers,
    the Ingress among them, inherit it): $DYNAMIC_INTEREST_AUTH_SECRET when set, else the one
    generated at the first start and kept in runs/main/auth-secret (owner-only). A service token
    for this run goes to runs/main/token (owner-only) -> that token."""
    from ray_app.serve.auth import SECRET_ENV, mint, new_secret, secret_from_env

    if not os.environ.get(SECRET_ENV):
        if not s.secret_file.is_file():
            private_write(s.secret_file, new_secret())
        os.environ[SECRET_ENV] = s.secret_file.read_text().strip()
    try:
        secret = secret_from_env()
    except RuntimeError as e:
        raise NewcomerError(str(e)) from None
    token = mint(secret, "service")
    private_write(s.token_file, token)
    return token


DEMO_ADMIN = "admin"  # the demo account the main job makes: it may act for any user (each act logged)


def setup_demo_accounts(s: MainSettings) -> Path:
    """The demo's accounts file: made at the first start with one admin account, whose password is
    kept in runs/main/demo-password (owner-only, as the file); reused afterwards -> its path."""
    from gradio_demo.accounts import add_account

    if not s.demo_accounts_file.is_file():
        import secrets

        password = secrets.token_urlsafe(12)
        private_write(s.demo_password_file, password)
        add_account(s.demo_accounts_file, DEMO_ADMIN, password, None, admin=True)
    return s.demo_accounts_file
