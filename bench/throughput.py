"""Throughput benchmark: this service under concurrent load, against the alternatives.

Over HTTP (streaming OpenAI chat completions) at each concurrency level, every client sends requests
for 128 new tokens back to back; it prints aggregate completion tokens per second, time to first
token (p50, p99) and time between tokens (p50). In the same run, on the same model: sequential
`transformers` `generate` (fp32, batch 1), and, with --llama-cpp, llama-cpp-python's server on
the same GGUF (installed into .cache/llama-venv-<version> on first use; building it takes minutes).

    .venv/bin/python bench/throughput.py                       # this service and generate
    .venv/bin/python bench/throughput.py --llama-cpp           # and llama-cpp-python
    .venv/bin/python bench/throughput.py --levels 1 16 --requests 2
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from common import DEFAULT_MODEL, ROOT, prepared_model, wait_ready  # bench/, beside this script

sys.path.insert(0, str(ROOT))

ADMIN = "bench-admin-key-0123456789"
LLAMA_CPP_VERSION = "0.3.16"
"""0.3.36, the newest on 2026-11-29, crashes (segmentation fault) on its first token on an AMX
machine here; 0.3.16 runs."""
PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how rain forms, for a child.",
    "Describe a busy market in the morning.",
    "Give advice to someone learning to cook.",
]


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0-1) of values, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def one_request(client: httpx.Client, url: str, headers: dict[str, str], prompt: str, tokens: int,
                model: str) -> tuple[int, float, list[float]]:  # fmt: skip
    """Stream one completion; (completion tokens, time to first token, gaps between tokens)."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": tokens, "temperature": 0.7, "stream": True}  # fmt: skip
    started = time.perf_counter()
    arrivals: list[float] = []
    usage = None
    with client.stream("POST", url, json=body, headers=headers) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0].get("delta", {}).get("content"):
                arrivals.append(time.perf_counter())
    count = usage if usage is not None else len(arrivals)
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    return count, (arrivals[0] - started) if arrivals else float("nan"), gaps


def load(base: str, model: str, concurrency: int, requests: int, tokens: int,
         headers: dict[str, str]) -> dict[str, float]:  # fmt: skip
    """`concurrency` clients, `requests` each; aggregate figures."""
    results: list[tuple[int, float, list[float]]] = []
    lock = threading.Lock()

    def client_loop(index: int) -> None:
        with httpx.Client(timeout=600) as client:
            for r in range(requests):
                # Every prompt differs from its start on (after the chat template), so that
                # neither server reuses more of an earlier prompt than its system prompt.
                prompt = f"Request {index}.{r}: {PROMPTS[(index + r) % len(PROMPTS)]}"
                result = one_request(client, f"{base}/v1/chat/completions", headers, prompt, tokens,
                                     model)  # fmt: skip
                with lock:
                    results.append(result)

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    total = sum(r[0] for r in results)
    ttft = [r[1] for r in results if r[1] == r[1]]  # requests that streamed any text
    gaps = [g for r in results for g in r[2]]
    return {
        "tok_s": total / elapsed,
        "ttft_p50": percentile(ttft, 0.5),
        "ttft_p99": percentile(ttft, 0.99),
        "tbt_p50": statistics.median(gaps) if gaps else float("nan"),
    }


def sequential_generate(model_dir: Path, tokens: int, count: int) -> float:
    """Plain `model.generate`, fp32, one request at a time: tokens per second."""
    import torch

    from app.engine.loading import load_model

    model, tokenizer = load_model(model_dir, torch.float32)
    total, started = 0, time.perf_counter()
    with torch.inference_mode():
        for i in range(count):
            ids = tokenizer(PROMPTS[i % len(PROMPTS)], return_tensors="pt").input_ids
            out = model.generate(input_ids=ids, max_new_tokens=tokens, do_sample=True,
                                 temperature=0.7, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
            total += out.shape[1] - ids.shape[1]
    return total / (time.perf_counter() - started)


def llama_cpp_server(gguf: Path, port: int) -> subprocess.Popen[bytes]:
    """llama-cpp-python's OpenAI-compatible server on the GGUF, from its own environment."""
    venv = ROOT / ".cache" / f"llama-venv-{LLAMA_CPP_VERSION}"
    python = venv / "bin" / "python"
    if not python.exists():
        print("installing llama-cpp-python into .cache/llama-venv (builds llama.cpp) ...",
              flush=True)  # fmt: skip
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet",
                        f"llama-cpp-python[server]=={LLAMA_CPP_VERSION}"], check=True)  # fmt: skip
    return subprocess.Popen(
        [str(python), "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port),
         "--n_threads", str(os.cpu_count() or 2), "--n_ctx", "8192",
         # By default a new request interrupts the one streaming; serve them in turn instead.
         "--interrupt_requests", "False"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


LLAMA_IN_PROCESS = """
import sys, time
from llama_cpp import Llama
model = Llama(model_path=sys.argv[1], n_threads=int(sys.argv[2]), n_ctx=2048, verbose=False)
messages = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
model.create_chat_completion(messages=messages, max_tokens=8)  # warm up
total, started = 0, time.perf_counter()
for _ in range(3):
    out = model.create_chat_completion(messages=messages, max_tokens=int(sys.argv[3]))
    total += out["usage"]["completion_tokens"]
print(f"{total / (time.perf_counter() - started):.1f}")
"""


def llama_cpp_in_process(gguf: Path, tokens: int) -> float:
    """llama-cpp-python called directly (no server), batch 1: tokens per second."""
    python = ROOT / ".cache" / f"llama-venv-{LLAMA_CPP_VERSION}" / "bin" / "python"
    threads = str(os.cpu_count() or 2)
    out = subprocess.run([str(python), "-c", LLAMA_IN_PROCESS, str(gguf), threads, str(tokens)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return float(out.stdout.strip().splitlines()[-1])


def report(name: str, figures: dict[int, dict[str, float]]) -> None:
    for level, f in figures.items():
        print(
            f"{name:>18} c={level:<3} {f['tok_s']:7.1f} tok/s   TTFT p50 {f['ttft_p50']:.2f} s "
            f"p99 {f['ttft_p99']:.2f} s   TBT p50 {1000 * f['tbt_p50']:.0f} ms",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--requests", type=int, default=2, help="requests per client per level")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--llama-cpp", action="store_true")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    args = parser.parse_args()
    model_dir = prepared_model(args.model)

    print(f"sequential transformers generate (fp32, batch 1): "
          f"{sequential_generate(model_dir, args.tokens, 4):.1f} tok/s", flush=True)  # fmt: skip

    data_dir = Path(tempfile.mkdtemp(prefix="flm-throughput-"))
    env = {**os.environ, "DATA_DIR": str(data_dir), "MODEL": str(model_dir),
           "ADMIN_API_KEY": ADMIN, "REDIS_URL": "", "LOG_LEVEL": "WARNING"}  # fmt: skip
    from app.migrate import upgrade

    upgrade(f"sqlite:///{data_dir / 'feedback.db'}")
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--port", "8790",
         "--log-level", "warning"], env=env, cwd=ROOT,
    )  # fmt: skip
    try:
        wait_ready("http://127.0.0.1:8790/readyz", server)
        headers = {"Authorization": f"Bearer {ADMIN}"}
        ours = {
            level: load(
                "http://127.0.0.1:8790", "default", level, args.requests, args.tokens, headers
            )
            for level in args.levels
        }
        report("feedback-lm", ours)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)

    if args.llama_cpp:
        from app.engine.loading import fetch_default_gguf

        gguf = fetch_default_gguf(ROOT / ".cache" / "gguf")
        llama = llama_cpp_server(gguf, 8791)  # installs the environment on first use
        try:
            wait_ready("http://127.0.0.1:8791/v1/models", llama, 900)
            theirs = {
                level: load(
                    "http://127.0.0.1:8791", "default", level, args.requests, args.tokens, {}
                )
                for level in args.levels
            }
            report("llama-cpp-python", theirs)
        finally:
            llama.send_signal(signal.SIGTERM)
            llama.wait(timeout=60)
        print(f"llama-cpp-python called in-process (no server, batch 1): "
              f"{llama_cpp_in_process(gguf, args.tokens):.1f} tok/s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
