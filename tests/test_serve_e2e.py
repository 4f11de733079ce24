"""`aivax serve` as a user runs it: a fresh directory, the embedded default (SQLite in ./data),
first-start bootstrap printed once, and the quickstart's commands run against it."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.fixtures.assertions import REPO_ROOT

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("AIVAX_")}


@contextmanager
def serving(workdir: Path, port: int) -> Iterator[Path]:
    with serving_env(workdir, port, _clean_env()) as log:
        yield log


@contextmanager
def serving_env(workdir: Path, port: int, env: dict[str, str]) -> Iterator[Path]:
    log = workdir / f"serve-{time.monotonic_ns()}.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "aivax", "serve", "--port", str(port)],
            cwd=workdir,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                assert process.poll() is None, log.read_text()
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            else:
                pytest.fail(f"server did not become ready:\n{log.read_text()}")
            yield log
        finally:
            process.terminate()
            process.wait(timeout=20)


def _banner_value(text: str, label: str) -> str:
    match = re.search(rf"{label}\s*:\s*(\S+)", text)
    assert match, text
    return match.group(1)


def _doc_blocks(page: str) -> list[str]:
    text = (REPO_ROOT / "docs" / page).read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)
    return [block for block in blocks if "curl" in block]


# Every curl example of four docs pages runs against a real server with the bundled models
# (indexing included): about a minute on an idle machine, more on a busy one.
@pytest.mark.timeout(360)
def test_first_start_bootstraps_once_and_quickstart_works(tmp_path: Path) -> None:
    port = _free_port()
    with serving(tmp_path, port) as log:
        first = log.read_text()
        assert "shown ONCE" in first
        admin_token = _banner_value(first, "operator admin token")
        private_key = _banner_value(first, "private key")
        env = {
            **_clean_env(),
            "AIVAX_URL": f"http://127.0.0.1:{port}",
            "AIVAX_KEY": private_key,
            "AIVAX_ADMIN_TOKEN": admin_token,
            "AIVAX_PUBLIC_KEY": _banner_value(first, "public key"),
        }
        blocks = [
            *_doc_blocks("quickstart.md"),
            *_doc_blocks("gateways.md"),
            *_doc_blocks("structured-output.md"),
            *_doc_blocks("rag.md"),
        ]
        assert len(blocks) >= 12
        for block in blocks:
            result = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", block],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
                cwd=tmp_path,
            )
            assert result.returncode == 0, f"{block}\n{result.stdout}\n{result.stderr}"
        wallet = httpx.get(
            f"http://127.0.0.1:{port}/v1/wallet",
            headers={"Authorization": f"Bearer {private_key}"},
        ).json()
        assert wallet["balance_micros"] <= 15_000_000  # 5 USD demo + 10 USD top-up - two chats
        assert wallet["balance_micros"] > 14_990_000

    secret_file = tmp_path / "data" / "secret.key"
    assert secret_file.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "data" / "aivax.db").exists()

    with serving(tmp_path, port) as log:
        again = log.read_text()
        assert "shown ONCE" not in again
        assert admin_token not in again
        assert private_key not in again
        response = httpx.get(
            f"http://127.0.0.1:{port}/v1/account",
            headers={"Authorization": f"Bearer {private_key}"},
        )
        assert response.status_code == 200
    accounts = subprocess.run(
        [sys.executable, "-m", "aivax", "accounts", "list"],
        cwd=tmp_path,
        env=_clean_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert len(accounts.stdout.strip().splitlines()) == 1


def test_bad_models_file_stops_serve_with_one_line_and_keeps_the_banner(tmp_path: Path) -> None:
    bad = tmp_path / "models.toml"
    bad.write_text('[[models]]\nid = "x/y"\nprovider = "openai"\n')
    env = {**_clean_env(), "AIVAX_MODELS_FILE": str(bad)}
    result = subprocess.run(
        [sys.executable, "-m", "aivax", "serve", "--port", str(_free_port())],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: models file {str(bad)!r}: models[0].upstream_model: Field required"]
    assert "Traceback" not in result.stderr
    assert "shown ONCE" not in result.stdout  # the one-time secrets were not spent
    bad.write_text("")
    port = _free_port()
    with serving_env(tmp_path, port, env) as log:
        assert "shown ONCE" in log.read_text()
