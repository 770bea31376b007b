"""Users and sessions of the web view (web/auth.py) and their config (core/config.py [web])."""

from __future__ import annotations

import pytest

from insitu_daq.core.config import ConfigError, parse_config
from insitu_daq.web.auth import Users, hash_password, new_token, verify_password, verify_token

FAST = {"n": 2**10}  # a cheap scrypt for tests; the default costs ~50 ms a check


def _users(**fields: str) -> Users:
    config = parse_config({"web": {"users": [fields]}})
    return Users(config.web.users)


def test_a_password_is_checked_against_its_hash_only() -> None:
    stored = hash_password("correct horse", **FAST)
    assert stored.startswith("scrypt$1024$8$1$") and "correct horse" not in stored
    assert verify_password("correct horse", stored)
    assert not verify_password("correct hors", stored)
    assert hash_password("correct horse", **FAST) != stored  # salted
    assert not verify_password("x", "scrypt$1024$8$1$zz$zz")  # malformed: refused, no crash


def test_a_token_logs_in_its_user_and_nothing_else() -> None:
    token, hashed = new_token()
    users = _users(name="kiosk", role="viewer", token=hashed)
    assert verify_token(token, hashed) and not verify_token(token + "x", hashed)
    session = users.session(users.login(None, None, token))
    assert session is not None and session.user == "kiosk" and not session.can_control
    assert users.login(None, None, "guess") is None


def test_only_an_operator_session_may_control_and_logout_ends_it() -> None:
    users = Users(
        parse_config(
            {
                "web": {
                    "users": [
                        {
                            "name": "alice",
                            "role": "operator",
                            "password": hash_password("a", **FAST),
                        },
                        {"name": "vic", "password": hash_password("v", **FAST)},
                    ]
                }
            }
        ).web.users
    )
    alice = users.login("alice", "a", None)
    vic = users.login("vic", "v", None)
    assert users.login("alice", "v", None) is None  # another user's password
    assert users.login("nobody", "a", None) is None
    assert users.session(alice).can_control  # type: ignore[union-attr]
    assert not users.session(vic).can_control  # type: ignore[union-attr]  # viewer by default
    users.logout(alice)
    assert users.session(alice) is None
    assert users.session("forged") is None


@pytest.mark.parametrize(
    ("web", "field"),
    [
        ({"bind": "0.0.0.0"}, "web: bind='0.0.0.0' is not loopback"),
        ({"bind": "192.168.1.5", "tls_cert": "/c.pem"}, "web: tls_key: tls_cert and tls_key go"),
        ({"users": [{"name": "a", "password": "hunter2"}]}, "web.users.0.password: not an scrypt"),
        ({"users": [{"name": "a", "token": "abc"}]}, "web.users.0.token: not a sha256"),
        (
            {"users": [{"name": "a", "role": "admin", "token": "sha256$" + "0" * 64}]},
            "web.users.0.role: unknown role 'admin'",
        ),
        ({"users": [{"name": "a"}]}, "web.users.0: user 'a' has neither"),
        ({"preview_rate_hz": 0}, "web.preview_rate_hz"),
    ],
)
def test_an_unsafe_or_wrong_web_config_is_refused_naming_the_field(
    web: dict[str, object], field: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_config({"web": web})
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(field.split(":")[0]) and field.split(": ", 1)[-1] in message


def test_off_loopback_is_allowed_behind_a_proxy_or_with_tls() -> None:
    assert parse_config({"web": {"bind": "0.0.0.0", "behind_proxy": True}}).web.behind_proxy
    tls = parse_config({"web": {"bind": "0.0.0.0", "tls_cert": "/c", "tls_key": "/k"}}).web
    assert tls.tls_cert is not None
