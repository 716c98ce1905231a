"""What the benchmark scripts share: the default model's checkpoint, waiting for a server, and
sampling the resident memory of a tree of processes."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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


def _proc_fields(pid: int, name: str) -> dict[str, str]:
    """The `Key: value` lines of /proc/<pid>/<name> (status, smaps_rollup); empty once gone."""
    try:
        text = Path(f"/proc/{pid}/{name}").read_text()
    except OSError:
        return {}
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def _gib(fields: dict[str, str], name: str) -> float:
    """A `... kB` field in GiB (0 when absent)."""
    value = fields.get(name, "").split()
    return int(value[0]) / 2**20 if value else 0.0


def process_tree(root: int) -> list[int]:
    """`root` and every process descended from it that is still alive (not a zombie)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces: the fields start after it.
        state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
        if state != "Z":
            parents.setdefault(int(ppid), []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid == root and not Path(f"/proc/{pid}").exists():
            continue
        tree.append(pid)
        todo += parents.get(pid, [])
    return tree


def command_line(pid: int) -> list[str]:
    """A process's argv (empty once gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


@dataclass
class ProcessMemory:
    """What a sampler saw of one process, in GiB."""

    role: str
    pid: int
    rss: float = 0.0
    """Resident memory at the last sample."""
    peak_rss: float = 0.0
    """Highest resident memory sampled."""
    hwm: float = 0.0
    """The kernel's own peak (VmHWM) at the last sample: exact, whatever the sampling missed."""
    alive: bool = True


@dataclass
class WindowPeak:
    """The highest sums over a process tree sampled within one named stretch of time, in GiB."""

    rss: float = 0.0
    """Sum of every process's resident memory (pages shared between processes counted in each)."""
    pss: float = 0.0
    """Sum of proportional shares (shared pages divided among the processes that map them)."""
    by_role: dict[str, float] = field(default_factory=dict)
    """Highest resident memory sampled per role (summed over its processes)."""


class TreeSampler(threading.Thread):
    """Polls the resident memory of a process and all its descendants every `every` seconds
    (proportional shares every `pss_every` seconds: reading them walks every page table),
    keeping each process's peaks and, per window (set `window` to name the current stretch),
    the highest sums over the whole tree. `on_sample`, if given, is called after each poll with
    the tree's summed resident memory in GiB (say, to stop a runaway process)."""

    def __init__(
        self,
        root: int,
        classify: Callable[[int, list[str]], str],
        every: float = 0.25,
        pss_every: float = 2.0,
        on_sample: Callable[[float], None] | None = None,
    ) -> None:
        super().__init__(name="tree-sampler", daemon=True)
        self.root = root
        self.classify = classify
        self.every = every
        self.pss_every = pss_every
        self.on_sample = on_sample
        self.window = "start-up"
        self.processes: dict[int, ProcessMemory] = {}
        self.windows: dict[str, WindowPeak] = {}
        self._done = threading.Event()  # not `_stop`: threading.Thread has a method of that name
        self._lock = threading.Lock()
        self._pss_at = 0.0

    def run(self) -> None:
        while not self._done.is_set():
            total = self.sample()
            if self.on_sample is not None:
                self.on_sample(total)
            self._done.wait(self.every)

    def stop(self) -> None:
        """Stop polling, after one last sample."""
        self._done.set()
        if self.is_alive():
            self.join()
        self.sample()

    def sample(self) -> float:
        """Read the tree once; its summed resident memory in GiB."""
        tree = process_tree(self.root)
        now = time.monotonic()
        # At least once in every window, so that each has a figure.
        with_pss = now - self._pss_at >= self.pss_every or self.window not in self.windows
        if with_pss:
            self._pss_at = now
        with self._lock:
            peak = self.windows.setdefault(self.window, WindowPeak())
            total_rss = total_pss = 0.0
            by_role: dict[str, float] = {}
            for process in self.processes.values():
                process.alive = process.pid in tree
            for pid in tree:
                status = _proc_fields(pid, "status")
                if not status:
                    continue
                seen = self.processes.get(pid)
                if seen is None:
                    seen = self.processes[pid] = ProcessMemory(
                        self.classify(pid, command_line(pid)), pid
                    )
                seen.rss, seen.hwm = _gib(status, "VmRSS"), _gib(status, "VmHWM")
                seen.peak_rss = max(seen.peak_rss, seen.rss)
                total_rss += seen.rss
                if with_pss:
                    total_pss += _gib(_proc_fields(pid, "smaps_rollup"), "Pss")
                by_role[seen.role] = by_role.get(seen.role, 0.0) + seen.rss
            peak.rss, peak.pss = max(peak.rss, total_rss), max(peak.pss, total_pss)
            for role, rss in by_role.items():
                peak.by_role[role] = max(peak.by_role.get(role, 0.0), rss)
        return total_rss

    def of_role(self, role: str) -> list[ProcessMemory]:
        """The processes of one role seen so far, oldest first."""
        with self._lock:
            return [p for p in self.processes.values() if p.role == role]
