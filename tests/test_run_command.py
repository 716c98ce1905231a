"""`python -m app.cli run` (what `make run` starts): embedded defaults, end to end."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import free_port


def _start(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    handle = log.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "app.cli", "run"], env=env, stdout=handle, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip


def _wait_ready(process: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        if "is ready at" in log.read_text():
            return
        time.sleep(0.5)
    raise AssertionError(f"not ready in {timeout}s:\n{log.read_text()}")


def _children(pid: int) -> list[int]:
    result = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(line) for line in result.stdout.split()]


def _stop(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=60)


def test_run_serves_with_worker_and_beat_then_restarts_with_everything_kept(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """First run: migrates, prints the admin key, serves, worker answers; a rerun keeps it all."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"ADMIN_API_KEY", "REDIS_URL", "DATABASE_URL"}
    }
    env |= {"DATA_DIR": str(tmp_path / "data"), "MODEL": str(tiny_model_dir), "PORT": str(port),
            "MODEL_DTYPE": "float32"}  # fmt: skip
    log = tmp_path / "run.log"

    process = _start(env, log)
    try:
        _wait_ready(process, log)
        output = log.read_text()
        match = re.search(r"Admin API key \(shown once.*\):\n\s+(flm_\S+)", output)
        assert match, output
        key = match.group(1)
        key_file = tmp_path / "data" / "admin_key"
        assert key_file.read_text().strip() == key
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

        assert len(_children(process.pid)) == 3  # api, worker, beat
        headers = {"Authorization": f"Bearer {key}"}
        answer = httpx.post(
            f"{base}/v1/generate", json={"prompt": "Hi", "max_new_tokens": 4}, headers=headers
        )
        assert answer.status_code == 200, answer.text
        ping = subprocess.run(
            [sys.executable, "-m", "app.cli", "worker-ping", "--timeout", "60"], env=env,
            capture_output=True, text=True, timeout=90,
        )  # fmt: skip
        assert ping.returncode == 0, ping.stderr
        assert "worker" in ping.stdout
        children = _children(process.pid)
    finally:
        assert _stop(process) == 0
    for pid in children:
        assert (
            not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        )

    log.write_text("")
    process = _start(env, log)
    try:
        _wait_ready(process, log)
        assert "flm_" not in log.read_text()  # the key is printed on the first start only
        kept = httpx.get(f"{base}/v1/generations/{answer.json()['id']}", headers=headers)
        assert kept.status_code == 200
        assert kept.json()["output"] == answer.json()["output"]
    finally:
        assert _stop(process) == 0
