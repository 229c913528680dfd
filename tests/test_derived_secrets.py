"""Issue 10, item 11: the OTP pepper and the admin-session key come from the configured signing key (so
replicas that set only JWT_KEYS agree), and a generated secret file is private from its first byte."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from config import Settings
from domain import auth

KEYS = "k2:second-signing-secret-0123456789,k1:first-signing-secret-0123456789"


def _replica(tmp_path: Path, name: str, **values: str) -> Settings:
    """A replica with its own DATA_DIR, so its generated jwt_secret file differs from the others'."""
    return Settings().model_copy(update={"data_dir": tmp_path / name, "jwt_secret": None, **values})


def test_replicas_that_share_jwt_keys_share_the_pepper_and_the_session_key(tmp_path: Path) -> None:
    a, b = _replica(tmp_path, "a", jwt_keys=KEYS), _replica(tmp_path, "b", jwt_keys=KEYS)
    assert a.resolved_jwt_secret() != b.resolved_jwt_secret()  # what the pepper used to be made of
    for purpose in ("otp pepper", "admin session"):
        assert auth.derived_secret(a, purpose) == auth.derived_secret(b, purpose)
    # a code issued through one replica is checked by the other
    assert auth._code_hash("+9779812345678", "123456", auth._code_pepper(a)) == auth._code_hash(
        "+9779812345678", "123456", auth._code_pepper(b)
    )
    # distinct purposes, distinct keys; neither is the signing key itself
    pepper, session = auth.derived_secret(a, "otp pepper"), auth.derived_secret(a, "admin session")
    assert pepper != session and "second-signing-secret-0123456789" not in (pepper, session)


def test_another_signing_key_gives_another_pepper(tmp_path: Path) -> None:
    a = _replica(tmp_path, "a", jwt_keys=KEYS)
    rotated = _replica(tmp_path, "b", jwt_keys="k3:third-signing-secret-0123456789," + KEYS)
    assert auth.derived_secret(a, "otp pepper") != auth.derived_secret(rotated, "otp pepper")


def test_the_generated_jwt_secret_is_private_from_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even if nothing ever narrowed its mode afterwards (a crash between writing and chmod)."""
    monkeypatch.setattr(Path, "chmod", lambda self, mode: None)
    monkeypatch.setattr(os, "chmod", lambda *args, **kwargs: None)
    old = os.umask(0o022)
    try:
        settings = _replica(tmp_path, "fresh")
        secret = settings.resolved_jwt_secret()
    finally:
        os.umask(old)
    path = tmp_path / "fresh" / "jwt_secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert settings.resolved_jwt_secret() == secret and len(secret) >= 48  # created once, then read back
