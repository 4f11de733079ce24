"""Gateway benchmark: what AIVAX adds on top of an upstream, and how it compares to LiteLLM.

Starts, each in its own process on loopback:
  - bench/mock_upstream.py  (an OpenAI-compatible mock with no artificial delay)
  - bench/bare_proxy.py     (the thinnest forwarding proxy on AIVAX's own server and client,
                             doing nothing else: the ceiling for any proxy on this stack)
  - `aivax serve`           (SQLite, every pipeline step on: key check, model resolution,
                             plan check, rate limits, token count, the wallet reservation
                             from the account's lease, settlement, request log)
  - LiteLLM's proxy         (only if `make bench-deps` installed it in .bench-venv)
then drives each with the same requests — non-streaming and streaming, at concurrency 1, 16
and 64 — and prints RPS, p50/p99 latency, p50 time to first byte, p50 overhead over the direct
call, and each proxy's CPU time per call (its process and children, from /proc). Timings
depend on the machine; run on an otherwise idle one.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx

ROOT = Path(__file__).resolve().parent.parent
SECONDS = float(os.environ.get("BENCH_SECONDS", "4"))
CONCURRENCY = [int(c) for c in os.environ.get("BENCH_CONCURRENCY", "1,16,64").split(",")]
LITELLM = ROOT / ".bench-venv" / "bin" / "litellm"
BODY = {"messages": [{"role": "user", "content": "What is the answer?"}], "max_tokens": 16}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    for _ in range(600):
        if process.poll() is not None:
            raise SystemExit(f"{url} exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} did not start:\n{log.read_text()[-3000:]}")


def spawn(args: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=cwd)


@dataclass
class Target:
    name: str
    url: str
    model: str
    headers: dict[str, str]
    pid: int | None = None  # the proxy's process, whose CPU time is reported per call


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time so far of a process and its live descendants (Linux /proc), or
    0 when unknown (a proxy may serve from a child process)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        children = [
            int(child)
            for task in Path(f"/proc/{pid}/task").iterdir()
            for child in (task / "children").read_text().split()
        ]
    except OSError:
        return 0.0
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own + sum(cpu_seconds(child) for child in children)


@dataclass
class Result:
    rps: float
    p50: float
    p99: float
    ttfb: float
    cpu_ms: float  # the proxy's CPU time per call (0 for the direct target)


async def drive(target: Target, *, stream: bool, concurrency: int) -> Result:
    """Closed-loop load with aiohttp (httpx's pool bookkeeping made the driver itself the
    bottleneck at concurrency 64)."""
    body = {**BODY, "model": target.model, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    payload = json.dumps(body).encode()
    headers = {**target.headers, "Content-Type": "application/json"}
    latencies: list[float] = []
    firsts: list[float] = []
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        url = f"{target.url}/chat/completions"
        for _ in range(3):  # warm up connections and caches
            async with session.post(url, data=payload, headers=headers) as response:
                await response.read()
        deadline = time.perf_counter() + SECONDS

        async def worker() -> None:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                async with session.post(url, data=payload, headers=headers) as response:
                    first = None
                    async for _ in response.content.iter_any():
                        first = first or time.perf_counter()
                    if response.status != 200:
                        raise SystemExit(f"{target.name}: HTTP {response.status}")
                ended = time.perf_counter()
                latencies.append(ended - started)
                firsts.append((first or ended) - started)

        began, cpu_before = time.perf_counter(), cpu_seconds(target.pid)
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
        cpu = cpu_seconds(target.pid) - cpu_before
    ordered = sorted(latencies)
    return Result(
        rps=len(latencies) / elapsed,
        p50=statistics.median(ordered) * 1000,
        p99=ordered[max(int(len(ordered) * 0.99) - 1, 0)] * 1000,
        ttfb=statistics.median(firsts) * 1000,
        cpu_ms=cpu / len(latencies) * 1000,
    )


def start_aivax(
    work: Path, mock_url: str, env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], Target]:
    models = work / "models.toml"
    models.write_text(
        '[[credentials]]\nname = "mock"\nprovider = "openai"\n'
        f'base_url = "{mock_url}/v1"\napi_key = "mock"\n\n'
        '[[models]]\nid = "bench/mock"\nprovider = "openai"\nupstream_model = "mock"\n'
        'credential = "mock"\ninput_price_per_m = 1000000\noutput_price_per_m = 2000000\n'
        "context_window = 8192\nmax_output_tokens = 256\n"
    )
    env = {
        **env,
        "AIVAX_MODELS_FILE": str(models),
        "AIVAX_LOG_LEVEL": "warning",
        "AIVAX_DATABASE_URL": env.get(
            "AIVAX_BENCH_DATABASE_URL", f"sqlite+aiosqlite:///{work}/aivax.db"
        ),
    }
    aivax = [sys.executable, "-m", "aivax"]
    subprocess.run([*aivax, "migrate"], env=env, cwd=work, check=True, capture_output=True)
    subprocess.run(
        [
            *aivax,
            "plans",
            "set",
            "free",
            'models_allowed=["*"]',
            "integrated_rpm=100000000",
            "integrated_input_tpm=1000000000",
        ],
        env=env,
        cwd=work,
        check=True,
        capture_output=True,
    )
    port = free_port()
    log = work / "aivax.log"
    process = spawn([*aivax, "serve", "--port", str(port)], log, env, work)
    wait_ready(f"http://127.0.0.1:{port}/readyz", process, log)
    banner = log.read_text()
    key = re.search(r"private key\s*:\s*(\S+)", banner)
    account = re.search(r"demo account\s*:\s*(\S+)", banner)
    if key is None or account is None:
        raise SystemExit(f"no bootstrap banner in the AIVAX log:\n{banner}")
    subprocess.run(
        [*aivax, "wallet", "topup", account.group(1), "1000000"],
        env=env,
        cwd=work,
        check=True,
        capture_output=True,
    )
    return process, Target(
        "aivax",
        f"http://127.0.0.1:{port}/v1",
        "bench/mock",
        {"Authorization": f"Bearer {key.group(1)}"},
        process.pid,
    )


def start_litellm(
    work: Path, mock_url: str, env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], Target] | None:
    if not LITELLM.exists():
        return None
    config = work / "litellm.yaml"
    config.write_text(
        "model_list:\n  - model_name: mock\n    litellm_params:\n      model: openai/mock\n"
        f"      api_base: {mock_url}/v1\n      api_key: mock\n"
    )
    port = free_port()
    log = work / "litellm.log"
    process = spawn(
        [str(LITELLM), "--config", str(config), "--port", str(port), "--num_workers", "1"],
        log,
        {**env, "LITELLM_LOG": "ERROR"},
        work,
    )
    wait_ready(f"http://127.0.0.1:{port}/health/liveliness", process, log)
    return process, Target("litellm", f"http://127.0.0.1:{port}/v1", "mock", {}, process.pid)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="aivax-bench-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIVAX_")}
    env["AIVAX_BENCH_DATABASE_URL"] = os.environ.get(
        "AIVAX_BENCH_DATABASE_URL", f"sqlite+aiosqlite:///{work}/aivax.db"
    )
    processes: list[subprocess.Popen[bytes]] = []
    try:
        mock_port = free_port()
        mock_log = work / "mock.log"
        mock = spawn(
            [sys.executable, str(ROOT / "bench" / "mock_upstream.py"), str(mock_port)],
            mock_log,
            env,
            work,
        )
        processes.append(mock)
        mock_url = f"http://127.0.0.1:{mock_port}"
        wait_ready(f"{mock_url}/v1/models", mock, mock_log)
        targets = [Target("direct", f"{mock_url}/v1", "mock", {})]
        bare_port = free_port()
        bare_log = work / "bare.log"
        bare = spawn(
            [sys.executable, str(ROOT / "bench" / "bare_proxy.py"), str(bare_port), mock_url],
            bare_log,
            env,
            work,
        )
        processes.append(bare)
        wait_ready(f"http://127.0.0.1:{bare_port}/v1/models", bare, bare_log)
        targets.append(Target("bare", f"http://127.0.0.1:{bare_port}/v1", "mock", {}, bare.pid))
        aivax, target = start_aivax(work, mock_url, env)
        processes.append(aivax)
        targets.append(target)
        litellm = start_litellm(work, mock_url, env)
        if litellm is not None:
            processes.append(litellm[0])
            targets.append(litellm[1])
        else:
            print("LiteLLM not installed (run `make bench-deps` to compare with it)\n")
        report(targets)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


def report(targets: list[Target]) -> None:
    print(
        f"{'target':<8} {'mode':<7} {'conc':>4} {'RPS':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'TTFB ms':>8} {'+p50 ms':>8} {'CPU ms/call':>11}"
    )
    results: dict[tuple[str, bool, int], Result] = {}
    for stream in (False, True):
        for concurrency in CONCURRENCY:
            for target in targets:
                result = asyncio.run(drive(target, stream=stream, concurrency=concurrency))
                results[(target.name, stream, concurrency)] = result
                direct = results[("direct", stream, concurrency)]
                overhead = result.p50 - direct.p50
                print(
                    f"{target.name:<8} {'stream' if stream else 'json':<7} {concurrency:>4} "
                    f"{result.rps:>8.0f} {result.p50:>8.2f} {result.p99:>8.2f} "
                    f"{result.ttfb:>8.2f} {overhead:>8.2f} "
                    + (f"{result.cpu_ms:>11.2f}" if target.pid else f"{'':>11}"),
                    flush=True,
                )
    if any(name == "litellm" for name, _, _ in results):
        for name, title in (("aivax", "AIVAX"), ("bare", "bare proxy (the ceiling)")):
            print(f"\n{title} RPS / LiteLLM RPS:")
            for stream in (False, True):
                ratios = [
                    results[(name, stream, c)].rps / results[("litellm", stream, c)].rps
                    for c in CONCURRENCY
                ]
                print(
                    f"  {'stream' if stream else 'json':<7} "
                    + "  ".join(
                        f"c={c}: {r:.1f}x" for c, r in zip(CONCURRENCY, ratios, strict=True)
                    )
                )


if __name__ == "__main__":
    main()
