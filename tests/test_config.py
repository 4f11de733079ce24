"""Settings validate themselves and fail with one line naming the setting."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from aivax.config import Settings, SettingsError, load_settings
from tests.fixtures.assertions import REPO_ROOT


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("AIVAX_PORT", "eighty"),
        ("AIVAX_PORT", "70000"),
        ("AIVAX_DATABASE_URL", "mysql://x"),
        ("AIVAX_SECRET_KEY", "short"),
        ("AIVAX_REDIS_URL", "http://localhost"),
        ("AIVAX_LOG_LEVEL", "loud"),
        ("AIVAX_MAX_BODY_BYTES", "10"),
        ("AIVAX_WORKERS", "0"),
        ("AIVAX_WORKERS", "65"),
        ("AIVAX_WALLET_LEASE_CALLS", "-1"),
        ("AIVAX_WALLET_LEASE_CALLS", "10001"),
        ("AIVAX_WALLET_LEASE_IDLE_SECONDS", "0"),
        ("AIVAX_WALLET_LEASE_IDLE_SECONDS", "3601"),
        ("AIVAX_WALLET_LEASE_MAX_SECONDS", "0"),
        ("AIVAX_REDIS_OUTAGE", "ignore"),
        ("AIVAX_REDIS_FALLBACK_SECONDS", "0"),
        ("AIVAX_REDIS_FALLBACK_SECONDS", "86401"),
        ("AIVAX_REDIS_FALLBACK_SECONDS", "soon"),
        ("AIVAX_REDIS_TIMEOUT_SECONDS", "0"),
        ("AIVAX_REDIS_TIMEOUT_SECONDS", "11"),
    ],
)
def test_invalid_setting_is_one_line_naming_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, variable: str, value: str
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as raised:
        load_settings()
    message = str(raised.value)
    assert variable in message
    assert "\n" not in message
    if variable in ("AIVAX_SECRET_KEY", "AIVAX_DATABASE_URL", "AIVAX_REDIS_URL"):
        assert value not in message  # values that may carry credentials are never echoed
    else:
        assert value in message


def test_every_setting_is_documented() -> None:
    operations = (REPO_ROOT / "docs" / "operations.md").read_text()
    documented = set(re.findall(r"AIVAX_[A-Z_]+", operations))
    for name in Settings.model_fields:
        assert f"AIVAX_{name.upper()}" in documented, f"AIVAX_{name.upper()} is undocumented"


@pytest.mark.parametrize(
    ("values", "named"),
    [
        (
            {"AIVAX_WALLET_LEASE_MAX_SECONDS": "1000", "AIVAX_HOLD_MAX_AGE_SECONDS": "1800"},
            ["AIVAX_WALLET_LEASE_MAX_SECONDS", "AIVAX_HOLD_MAX_AGE_SECONDS"],
        ),
        ({"AIVAX_WORKERS": "2"}, ["AIVAX_REDIS_URL"]),
    ],
)
def test_a_rule_between_settings_names_them_and_echoes_no_value(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, values: dict[str, str], named: list[str]
) -> None:
    """Such a rule sees every setting at once; none of their values may reach the message."""
    monkeypatch.chdir(tmp_path)
    secret = "hunter2-" + "s" * 40
    monkeypatch.setenv("AIVAX_SECRET_KEY", secret)
    monkeypatch.setenv("AIVAX_DATABASE_URL", "postgresql+asyncpg://u:dbpassword@h/db")
    for variable, value in values.items():
        monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as raised:
        load_settings()
    message = str(raised.value)
    assert message.startswith("invalid settings: ")
    assert all(variable in message for variable in named)
    assert "\n" not in message
    assert secret not in message
    assert "dbpassword" not in message


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("AIVAX_REDIS_OUTAGE", "fail-open"),
        ("AIVAX_REDIS_FALLBACK_SECONDS", "-1"),
        ("AIVAX_REDIS_TIMEOUT_SECONDS", "0"),
    ],
)
def test_invalid_redis_outage_settings_stop_the_server_with_exit_2(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    variable: str,
    value: str,
) -> None:
    error = _refused_at_start(monkeypatch, capsys, tmp_path, variable, value)
    assert error.startswith(f"error: invalid setting {variable}"), error


def test_redis_outage_settings_default_to_refusing_with_short_timeouts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    assert settings.redis_outage == "refuse"
    assert settings.redis_fallback_seconds == 300
    assert settings.redis_timeout_seconds == 1


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("HTTPS_PROXY", "socks5://operator:pw-1234@proxy:1080"),
        ("https_proxy", "http://operator:pw-1234@proxy:99999"),
        ("AIVAX_HTTP_PROXY", "http://operator:pw-1234@proxy:3128/path"),
        ("HTTP_PROXY", "http://:3128"),
        ("NO_PROXY", "localhost,10.0.0.0/33"),
        ("AIVAX_UPSTREAM_CLIENT", "curl"),
    ],
)
def test_invalid_upstream_client_or_proxy_settings_stop_the_server_with_exit_2(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    variable: str,
    value: str,
) -> None:
    error = _refused_at_start(monkeypatch, capsys, tmp_path, variable, value)
    assert error.startswith("error: invalid setting "), error
    assert variable.upper() in error
    assert "\n" not in error
    assert "pw-1234" not in error  # a proxy URL may carry a password: never echoed


def test_proxy_variables_are_read_under_their_conventional_names(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("https_proxy", "proxy.corp:3128")
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.corp:8080")
    monkeypatch.setenv("NO_PROXY", "localhost, *.corp,[::1],10.0.0.0/8")
    settings = load_settings()
    assert settings.upstream_client == "own"
    assert settings.https_proxy == "http://proxy.corp:3128"  # a bare host:port is http://
    assert settings.http_proxy == "http://proxy.corp:8080"
    assert settings.no_proxy == ["localhost", ".corp", "::1", "10.0.0.0/8"]


def _refused_at_start(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    variable: str,
    value: str,
) -> str:
    """Start as `aivax serve` does with `variable=value`: it must exit 2; the error line."""
    import typer

    from aivax.cli import settings_or_exit

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(variable, value)
    with pytest.raises(typer.Exit) as raised:
        settings_or_exit()
    assert raised.value.exit_code == 2
    return capsys.readouterr().err.strip()
