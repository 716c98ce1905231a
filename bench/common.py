"""What the benchmark scripts share: the default model's checkpoint, and waiting for a server."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = str(ROOT / "data" / "models" / "smollm2-135m-instruct")


def prepared_model(path: str) -> Path:
    """The checkpoint directory, or exit telling how to prepare it."""
    model_dir = Path(path).resolve()
    if not (model_dir / "config.json").is_file():
        sys.exit(f"{model_dir} is not prepared: run `make setup` first")
    return model_dir


def wait_ready(
    url: str, process: subprocess.Popen[bytes] | None = None, seconds: float = 300
) -> None:
    """Until `url` answers 200 (for this service, /readyz: the model is loaded); exit if the
    server exits or the time runs out."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            sys.exit(f"the server at {url} exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    sys.exit(f"{url} did not become ready")


def start_api(env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    """This service in a uvicorn process of its own with `env`, once it answers /readyz."""
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--port",
         str(port), "--log-level", "warning"],
        env=env, cwd=ROOT,
    )  # fmt: skip
    try:
        wait_ready(f"http://127.0.0.1:{port}/readyz", server)
    except BaseException:
        stop(server)
        raise
    return server


def stop(server: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 60 s."""
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()


def user_keys(base: str, admin_key: str, count: int, name: str) -> list[tuple[str, int]]:
    """`count` new user keys (secret, id), made with the admin key."""
    keys = []
    for i in range(count):
        created = httpx.post(
            f"{base}/v1/keys", json={"name": f"{name}-{i}", "role": "user"},
            headers={"Authorization": f"Bearer {admin_key}"},
        )  # fmt: skip
        created.raise_for_status()
        keys.append((created.json()["key"], created.json()["id"]))
    return keys
