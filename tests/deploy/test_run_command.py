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

from app.cli import RESTART_STABLE_AFTER, Supervised, restart_delay
from tests.helpers import free_port


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


def _child(pid: int, role: str) -> int:
    """The child of `pid` running Celery's `role` (worker or beat)."""
    for child in _children(pid):
        argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        if b"celery" in argv and role.encode() in argv:
            return child
    raise AssertionError(f"no {role} among {_children(pid)}")


def _wait_for(pattern: str, log: Path, times: int = 1, timeout: float = 60) -> list[str]:
    """The matches of `pattern` once the log holds at least `times` of them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.findall(pattern, log.read_text())
        if len(found) >= times:
            return found
        time.sleep(0.2)
    raise AssertionError(f"{pattern!r} not logged {times}x in {timeout}s:\n{log.read_text()}")


def test_a_killed_worker_or_beat_is_restarted_with_backoff_while_the_api_serves(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """kill -9 of the worker: logged, restarted (new pid, answers pings) after 1 s, then 2 s the
    next time; beat likewise; the API answers throughout and `run` keeps running."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    admin_key = "run-command-admin-key-0123"
    env = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "DATABASE_URL"}}
    env |= {"DATA_DIR": str(tmp_path / "data"), "MODEL": str(tiny_model_dir), "PORT": str(port),
            "MODEL_DTYPE": "float32", "ADMIN_API_KEY": admin_key}  # fmt: skip
    headers = {"Authorization": f"Bearer {admin_key}"}
    log = tmp_path / "run.log"
    process = _start(env, log)
    try:
        _wait_ready(process, log)
        for attempt, delay in ((1, "1"), (2, "2")):
            worker = _child(process.pid, "worker")
            os.kill(worker, signal.SIGKILL)
            _wait_for(rf"worker \(pid {worker}\) exited with code -9; restarting in {delay} s", log)
            # While the worker is down the API answers as ever.
            answer = httpx.post(
                f"{base}/v1/generate", json={"prompt": "Hi", "max_new_tokens": 2}, headers=headers
            )
            assert answer.status_code == 200, answer.text
            restarted = int(_wait_for(r"worker restarted \(pid (\d+)\)", log, attempt)[-1])
            assert restarted != worker and _child(process.pid, "worker") == restarted
        ping = subprocess.run(
            [sys.executable, "-m", "app.cli", "worker-ping", "--timeout", "60"], env=env,
            capture_output=True, text=True, timeout=90,
        )  # fmt: skip
        assert ping.returncode == 0, ping.stderr + log.read_text()

        beat = _child(process.pid, "beat")
        os.kill(beat, signal.SIGKILL)
        _wait_for(rf"beat \(pid {beat}\) exited with code -9; restarting in 1 s", log)
        restarted = int(_wait_for(r"beat restarted \(pid (\d+)\)", log)[-1])
        assert restarted != beat and _child(process.pid, "beat") == restarted
        assert httpx.get(f"{base}/readyz").status_code == 200
        assert process.poll() is None
    finally:
        assert _stop(process) == 0


def test_restarts_back_off_exponentially_up_to_a_cap_and_reset_after_a_stable_run() -> None:
    """1, 2, 4 ... 60 s between restarts of a process that keeps dying; one that ran for
    RESTART_STABLE_AFTER starts again from 1 s."""
    assert [restart_delay(n) for n in range(1, 10)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    child = Supervised("job", [sys.executable, "-c", "pass"])
    child.start()
    child.process.wait(timeout=30)
    first = child.process.pid
    child.check(child.started_at + 1)
    assert (child.failures, child.restart_at) == (1, child.started_at + 2)
    child.check(child.started_at + 1.5)  # not yet due
    assert child.process.pid == first
    child.check(child.started_at + 2)
    assert child.process.pid != first and child.restart_at is None
    child.process.wait(timeout=30)
    child.check(child.started_at + 1)
    assert child.failures == 2 and child.restart_at == child.started_at + 1 + 2
    child.start()
    child.process.wait(timeout=30)
    child.check(child.started_at + RESTART_STABLE_AFTER)
    assert child.failures == 1
