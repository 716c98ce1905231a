"""Learning benchmark: simulated raters with a known preference rate the model's answers through
the REST API, rounds run on a worker, and the approval rate on held-out prompts is printed for
each version, with its KL to the base.

The raters' preference: an answer is good when it gets to the point, i.e. its first sentence has
at most --max-words words (about a third of the default model's answers do); each rater follows
that rule with probability --agreement and otherwise flips a coin. Approval on held-out
prompts is judged by the rule itself (no noise). Target on the default model: at least +20 points
after at most 3 rounds of at most 128 ratings each.

    .venv/bin/python bench/learning.py                         # 3 rounds x 128 ratings
    .venv/bin/python bench/learning.py --rounds 1 --ratings 64 # a quicker look
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from common import DEFAULT_MODEL, ROOT, prepared_model, wait_ready  # bench/, beside this script

ADMIN = "bench-admin-key-0123456789"
HEADERS = {"Authorization": f"Bearer {ADMIN}"}

SUBJECTS = [
    "the moon", "coffee", "volcanoes", "the internet", "bees", "chess", "rainbows", "bicycles",
    "the ocean", "music", "trees", "electricity", "the Roman Empire", "sleep", "bread", "glaciers",
    "owls", "the piano", "recycling", "football", "clouds", "honey", "trains", "deserts",
    "vaccines", "the sun", "cats", "mountains", "paper", "tea", "robots", "libraries",
    "earthquakes", "dolphins", "gardening", "photography", "the heart", "maps", "soap", "wind",
]  # fmt: skip
TEMPLATES = [
    "Tell me about {}.", "What is interesting about {}?", "Explain {} to a child.",
    "Why do people care about {}?",
]  # fmt: skip


def prompts() -> tuple[list[str], list[str]]:
    """Train and held-out prompts; held-out subjects never appear in training."""
    train = [t.format(s) for s in SUBJECTS[:32] for t in TEMPLATES]
    heldout = [t.format(s) for s in SUBJECTS[32:] for t in TEMPLATES]
    return train, heldout


def good(answer: str, max_words: int) -> bool:
    """The raters' hidden rule: a short first sentence."""
    first = re.split(r"(?<=[.!?])\s", answer.strip(), maxsplit=1)[0]
    return 0 < len(first.split()) <= max_words


def approval(
    client: httpx.Client, base: str, heldout: list[str], args: argparse.Namespace
) -> tuple[float, str]:
    """Share of held-out answers the rule approves, and the version that wrote them."""
    approved, version = 0, ""
    for index, prompt in enumerate(heldout):
        body = {
            "prompt": prompt,
            "max_new_tokens": args.max_new_tokens,
            "temperature": 0.7,
            "seed": index,
        }
        answer = client.post(f"{base}/v1/generate", json=body).raise_for_status().json()
        approved += good(answer["output"], args.max_words)
        version = answer["model_version"]
    return approved / len(heldout), version


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ratings", type=int, default=128, help="ratings per round")
    parser.add_argument("--raters", type=int, default=4, help="rater keys sharing the ratings")
    parser.add_argument(
        "--agreement", type=float, default=0.9, help="how often a rater follows the rule"
    )
    parser.add_argument("--max-words", type=int, default=10, help="first-sentence words")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--min-length-ratio", type=float, default=0.5, help="gate bound")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--port", type=int, default=8790)
    args = parser.parse_args()
    model_dir = prepared_model(args.model)

    data_dir = Path(tempfile.mkdtemp(prefix="flm-learning-"))
    env = {**os.environ, "DATA_DIR": str(data_dir), "MODEL": str(model_dir), "ADMIN_API_KEY": ADMIN,
           "PORT": str(args.port), "TRAINING_MIN_ITEMS": "8", "REDIS_URL": "", "DATABASE_URL": "",
           "SWAP_POLL_INTERVAL": "1",
           # One admin key asks for every answer: faster than the per-key limit allows.
           "RATE_LIMIT_GENERATION": "none"}  # fmt: skip
    subprocess.run([sys.executable, "-m", "app.cli", "setup"], env=env, cwd=ROOT, check=True)
    api_command = [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory",
                   "--port", str(args.port), "--log-level", "warning"]  # fmt: skip
    worker_command = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
                      "--pool", "solo", "--loglevel", "WARNING"]  # fmt: skip
    api = subprocess.Popen(api_command, env=env, cwd=ROOT)
    worker = subprocess.Popen(worker_command, env=env, cwd=ROOT)
    base = f"http://127.0.0.1:{args.port}"
    rng = random.Random(0)
    train, heldout = prompts()
    rows: list[dict[str, Any]] = []
    try:
        wait_ready(f"{base}/readyz", api)
        client = httpx.Client(headers=HEADERS, timeout=600)
        # Several raters, as in a real deployment (each contributes at most its cap per round).
        raters = []
        for index in range(args.raters):
            key = client.post(f"{base}/v1/keys", json={"name": f"rater-{index}"}).json()["key"]
            raters.append({"Authorization": f"Bearer {key}"})
        started = time.perf_counter()
        rate, version = approval(client, base, heldout, args)
        rows.append({"version": version, "approval": rate, "kl": 0.0, "run": "-"})
        print(f"{version}: held-out approval {rate:.1%}", flush=True)
        for round_index in range(args.rounds):
            approved_in_round = 0
            for i in range(args.ratings):
                prompt = train[(round_index * args.ratings + i) % len(train)]
                body = {"prompt": prompt, "max_new_tokens": args.max_new_tokens, "temperature": 0.9,
                        "seed": round_index * 10_000 + i}  # fmt: skip
                answer = client.post(f"{base}/v1/generate", json=body).raise_for_status().json()
                verdict = good(answer["output"], args.max_words)
                if rng.random() > args.agreement:
                    verdict = rng.random() < 0.5
                approved_in_round += verdict
                thumbs = "up" if verdict else "down"
                rating = {"generation_id": answer["id"], "thumbs": thumbs}
                client.post(f"{base}/v1/feedback", json=rating, headers=raters[i % len(raters)])
            print(
                f"round {round_index + 1}: {args.ratings} ratings, {approved_in_round} thumbs up",
                flush=True,
            )
            config = {"train": {"learning_rate": args.learning_rate, "epochs": args.epochs},
                      "gate": {"min_length_ratio": args.min_length_ratio}}  # fmt: skip
            run = client.post(f"{base}/v1/training/runs", json=config).json()
            while run["status"] in ("queued", "running"):
                time.sleep(5)
                run = client.get(f"{base}/v1/training/runs/{run['id']}").json()
            metrics = run["metrics"]
            print(f"round {round_index + 1}: {run['status']} {run['version'] or ''} "
                  f"gain {metrics.get('preference_gain', float('nan')):.4f} "
                  f"KL {metrics.get('kl_to_base', float('nan')):.4f} "
                  f"length ratio {metrics.get('length_ratio', float('nan')):.2f} "
                  f"{run['reason'] or ''}", flush=True)  # fmt: skip
            if run["status"] == "succeeded":
                deadline = time.monotonic() + 30
                while httpx.get(f"{base}/readyz").json().get("model") != run["version"]:
                    if time.monotonic() > deadline:
                        raise SystemExit("the new version was not served within 30 s")
                    time.sleep(0.5)
                rate, version = approval(client, base, heldout, args)
                rows.append(
                    {
                        "version": version,
                        "approval": rate,
                        "kl": metrics["kl_to_base"],
                        "run": run["id"],
                    }
                )
                print(f"{version}: held-out approval {rate:.1%}", flush=True)
        print(f"\n{'version':8} {'run':>4} {'approval':>9} {'KL to base':>11}")
        for row in rows:
            print(
                f"{row['version']:8} {row['run']!s:>4} {row['approval']:>9.1%} {row['kl']:>11.4f}"
            )
        gain = (rows[-1]["approval"] - rows[0]["approval"]) * 100
        print(f"\napproval change: {gain:+.1f} points after {args.rounds} rounds of "
              f"{args.ratings} ratings "
              f"({time.perf_counter() - started:.0f} s)")  # fmt: skip
    finally:
        for process in (api, worker):
            process.send_signal(signal.SIGTERM)
        for process in (api, worker):
            process.wait(timeout=60)


if __name__ == "__main__":
    main()
