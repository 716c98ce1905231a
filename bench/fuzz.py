"""Schemathesis, longer: tests/api/test_schema_fuzz.py with more examples per operation, new random
inputs each run, on PostgreSQL and SQLite. Prints, per operation and database, the cases sent,
the status codes answered and whether every check passed; then each failure in full (with the
curl command that reproduces it). Exits 1 when any operation failed.

    .venv/bin/python bench/fuzz.py                      # 100 examples per operation
    .venv/bin/python bench/fuzz.py --examples 500 --databases postgresql -k feedback
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class Summary:
    """A pytest plugin keeping each operation's outcome, duration and failure text."""

    def __init__(self) -> None:
        self.outcomes: dict[str, tuple[str, float]] = {}
        self.failures: dict[str, str] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Keep the call phase's result (and a setup error, which fails the whole operation)."""
        if report.when == "call" or report.failed:
            self.outcomes[report.nodeid] = (report.outcome, report.duration)
            if report.failed:
                self.failures[report.nodeid] = report.longreprtext


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=100, help="fuzzed examples per operation")
    parser.add_argument("--databases", default="postgresql,sqlite", help="comma-separated")
    parser.add_argument("--fixed", action="store_true", help="the test's fixed seed, not random")
    parser.add_argument("-k", dest="select", help="only operations matching (pytest -k)")
    args = parser.parse_args()

    os.environ["FUZZ_EXAMPLES"] = str(args.examples)
    os.environ["FUZZ_DATABASES"] = args.databases
    os.environ["FUZZ_RANDOM"] = "0" if args.fixed else "1"
    summary = Summary()
    command = ["tests/api/test_schema_fuzz.py", "-q", "-p", "no:cacheprovider", "--timeout", "0"]
    if args.select:
        command += ["-k", args.select]
    started = time.monotonic()
    os.chdir(ROOT)
    code = pytest.main(command, plugins=[summary])
    elapsed = time.monotonic() - started

    module = sys.modules.get("tests.api.test_schema_fuzz")
    statuses: Counter[tuple[str, int]] = getattr(module, "STATUSES", Counter())
    by_operation: dict[str, Counter[int]] = defaultdict(Counter)
    for (operation, status), count in statuses.items():
        by_operation[operation][status] += count

    print(f"\nschemathesis: {args.examples} fuzzed examples per operation, {args.databases}")
    print(f"{'operation':45} {'database':10} {'result':7} {'seconds':>7}")
    for nodeid, (outcome, duration) in sorted(summary.outcomes.items()):
        operation, database = _labels(nodeid)
        print(f"{operation:45} {database:10} {outcome:7} {duration:7.1f}")
    print("\nanswers by status code (all databases):")
    for operation, counts in sorted(by_operation.items()):
        shown = ", ".join(f"{status}: {n}" for status, n in sorted(counts.items()))
        print(f"  {operation:45} {sum(counts.values()):6} cases  {shown}")
    total = Counter[int]()
    for counts in by_operation.values():
        total.update(counts)
    server_errors = sum(n for status, n in total.items() if status >= 500)
    failed = [nodeid for nodeid, (outcome, _) in summary.outcomes.items() if outcome == "failed"]
    print(
        f"\n{sum(total.values())} cases in {elapsed:.0f} s; 5xx answers: {server_errors}; "
        f"operations failing a check: {len(failed)} of {len(summary.outcomes)}"
    )
    for nodeid, text in summary.failures.items():
        print(f"\n=== {nodeid}\n{text}")
    sys.exit(0 if code == 0 else 1)


def _labels(nodeid: str) -> tuple[str, str]:
    """('POST /v1/feedback', 'postgresql') from a test id."""
    parts = nodeid.split("[")
    operation = parts[1].rstrip("]") if len(parts) > 1 else nodeid
    database = parts[2].rstrip("]") if len(parts) > 2 else ""
    return operation, database


if __name__ == "__main__":
    main()
