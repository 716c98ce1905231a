"""The browser pages in a real headless Chromium (Debian's, driven by Playwright).

The app runs in a real uvicorn server on PostgreSQL; screenshots of each step are saved under
test-artifacts/screenshots/.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from sqlalchemy import select

from app.config import Settings
from app.models import Comparison, Feedback, Generation, ModelVersion, Thumbs, Winner
from tests.helpers import ADMIN_KEY, QUICK_GATE, reset_database

SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
HOSTILE = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2"><b>bold</b>'


@pytest.fixture
def db_url(pg_url: str) -> str:
    """The pages run against PostgreSQL; the API tests cover SQLite."""
    reset_database(pg_url)
    return pg_url


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's chromium, headless; `make browser` installs it."""
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.fail("Debian's chromium is not installed: run `make browser`")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=chromium, headless=True, args=["--no-sandbox"]
        )
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Page]:
    """A fresh browser tab; page errors and content-policy violations fail the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    tab.set_default_timeout(20_000)
    problems: list[str] = []
    tab.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    tab.on(
        "console",
        lambda message: (
            problems.append(message.text) if "Content Security Policy" in message.text else None
        ),
    )
    yield tab
    context.close()
    assert problems == []


def shot(page: Page, name: str) -> None:
    """Save a screenshot of the page as a test artifact."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def new_key(live: str, role: str = "user", name: str = "rater") -> str:
    response = httpx.post(f"{live}/v1/keys", json={"name": name, "role": role}, headers=ADMIN)
    assert response.status_code == 201, response.text
    return str(response.json()["key"])


def sign_in(page: Page, live: str, key: str, path: str = "/") -> None:
    page.goto(live + path)
    page.fill("#key", key)
    page.click("#sign-in-form button")
    expect(page.locator("#app")).to_be_visible()


def feedback_on(sessions: Any, generation_id: int) -> Feedback:
    with sessions() as session:
        row = session.scalar(select(Feedback).where(Feedback.generation_id == generation_id))
        assert row is not None, "no feedback stored"
        session.expunge(row)
        return row


def latest_generation(sessions: Any) -> Generation:
    with sessions() as session:
        row = session.scalar(select(Generation).order_by(Generation.id.desc()).limit(1))
        assert row is not None
        session.expunge(row)
        return row


def wait_for(check: Any, what: str, timeout: float = 10) -> Any:
    """Poll until `check()` returns something truthy (the page saves asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except AssertionError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_sign_in_generate_and_rate_with_clicks_and_keys(
    page: Page, live: str, sessions: Any
) -> None:
    """The whole try-and-rate loop, as a rater does it, with the mouse and the keyboard."""
    page.goto(live + "/")
    expect(page.locator("#sign-in")).to_be_visible()
    page.fill("#key", "not-a-key")
    page.click("#sign-in-form button")
    expect(page.locator("#sign-in-error")).to_have_text("That key is unknown or revoked.")
    shot(page, "01-sign-in-refused")

    sign_in(page, live, new_key(live, name="alice"))
    expect(page.locator("#who")).to_have_text("alice (user)")
    page.fill("#prompt", "Say hello to the team.")
    page.fill("#max_new_tokens", "8")
    page.click("#run")
    expect(page.locator("#answer")).to_be_visible()
    generation = latest_generation(sessions)
    expect(page.locator("#output")).to_have_text(generation.output)
    expect(page.locator("#answer-version")).to_have_text("v0")
    shot(page, "02-answer")

    page.click("#thumb-up")  # a click
    expect(page.locator("#rating-status")).to_have_text("Saved: ✓ good")
    assert feedback_on(sessions, generation.id).thumbs is Thumbs.up
    expect(page.locator("#thumb-up")).to_have_attribute("aria-pressed", "true")

    page.keyboard.press("4")  # a key: stars, keeping the thumb
    expect(page.locator("#rating-status")).to_have_text("Saved: 4★")
    stored = feedback_on(sessions, generation.id)
    assert (stored.thumbs, stored.stars) == (Thumbs.up, 4)
    page.keyboard.press("d")
    wait_for(lambda: feedback_on(sessions, generation.id).thumbs is Thumbs.down, "thumb down")

    page.keyboard.press("e")  # edit a better answer, starting from the model's
    expect(page.locator("#correction")).to_be_focused()
    page.keyboard.press("Control+a")
    page.keyboard.type("Hello, team! Glad to work with you.")
    page.keyboard.press("Control+Enter")
    expect(page.locator("#rating-status")).to_have_text("Saved: better answer")
    stored = feedback_on(sessions, generation.id)
    assert stored.correction == "Hello, team! Glad to work with you."
    assert (stored.thumbs, stored.stars) == (Thumbs.down, 4)
    shot(page, "03-rated")

    # The key is kept across reloads, until sign-out.
    page.reload()
    expect(page.locator("#who")).to_have_text("alice (user)")
    page.click("#sign-out")
    expect(page.locator("#sign-in")).to_be_visible()
    assert page.evaluate("localStorage.length") == 0


def test_every_task_and_a_clear_error(page: Page, live: str, sessions: Any) -> None:
    """Translate and QA from the form; a bad language code shows the API's message."""
    sign_in(page, live, new_key(live))
    page.select_option("#task", "translate")
    page.fill("#text", "Good morning")
    page.fill("#target_lang", "zz")
    page.fill("#max_new_tokens", "6")
    page.click("#run")
    expect(page.locator("#status")).to_contain_text("target_lang")
    expect(page.locator("#answer")).to_be_hidden()

    page.fill("#target_lang", "fr")
    page.click("#run")
    expect(page.locator("#answer")).to_be_visible()
    assert latest_generation(sessions).input["target_lang"] == "fr"

    page.select_option("#task", "qa")
    page.fill("#question", "What colour is the sky?")
    page.keyboard.press("Control+Enter")
    wait_for(lambda: latest_generation(sessions).task.value == "qa", "a QA generation")
    expect(page.locator("#output")).to_have_text(latest_generation(sessions).output)
    shot(page, "04-qa")


def test_queue_shows_unrated_answers_as_text_one_after_another(
    page: Page, live: str, sessions: Any
) -> None:
    """Unrated answers from all traffic (a rater key's queue), newest first; markup in an answer
    is shown, never run."""
    ids = []
    for i in range(3):
        body = {"prompt": f"Tell me fact number {i}.", "max_new_tokens": 4, "seed": i}
        response = httpx.post(f"{live}/v1/generate", json=body, headers=ADMIN)
        ids.append(response.json()["id"])
    with sessions() as session:  # as if the model had answered with markup
        session.get(Generation, ids[-1]).output = HOSTILE
        session.commit()
    httpx.post(
        f"{live}/v1/feedback", json={"generation_id": ids[0], "thumbs": "up"}, headers=ADMIN
    )  # already rated: not in the queue

    sign_in(page, live, new_key(live, role="rater"))
    page.click("[data-mode=queue]")
    expect(page.locator("#answer-task")).to_contain_text(f"generation #{ids[2]}")
    expect(page.locator("#output")).to_have_text(HOSTILE)
    assert page.locator("#output script, #output img, #output b").count() == 0
    assert page.evaluate("window.pwned") is None
    shot(page, "05-queue-markup-as-text")

    page.keyboard.press("u")
    wait_for(lambda: feedback_on(sessions, ids[2]).thumbs is Thumbs.up, "queue rating")
    page.keyboard.press("n")
    expect(page.locator("#answer-task")).to_contain_text(f"generation #{ids[1]}")
    expect(page.locator("#answer-input-text")).to_have_text("Tell me fact number 1.")
    page.keyboard.press("n")  # skipped, not rated
    expect(page.locator("#status")).to_contain_text("Nothing left to rate")
    with sessions() as session:
        rated = set(session.scalars(select(Feedback.generation_id)))
    assert rated == {ids[0], ids[2]}


def test_compare_two_samples_then_the_active_version_against_another(
    page: Page, live: str, sessions: Any, settings: Settings
) -> None:
    """A/B choices with the keyboard; versions are revealed only after the choice."""
    from tests.helpers import publish_adapter

    other = publish_adapter(sessions, settings, seed=5)
    sign_in(page, live, ADMIN_KEY)
    page.click("[data-mode=compare]")
    page.fill("#prompt", "Name a fruit.")
    page.fill("#max_new_tokens", "6")
    page.click("#run")
    expect(page.locator("#pair")).to_be_visible()
    expect(page.locator("#version-a")).to_be_hidden()
    shot(page, "06-compare-two-samples")
    page.keyboard.press("a")
    expect(page.locator("#pair-status")).to_contain_text("Saved: A is better")
    expect(page.locator("#version-a")).to_have_text("v0")

    page.check("input[name=against][value=version]")
    page.select_option("#against-version", other)
    page.keyboard.press("Escape")  # leave the select, so keys go to the page again
    page.keyboard.press("n")  # a new pair with the same input
    expect(page.locator("#pair-status")).to_have_text("Which answer is better?")
    page.keyboard.press("t")
    expect(page.locator("#pair-status")).to_contain_text("Saved: a tie")
    shown = {page.inner_text("#version-a"), page.inner_text("#version-b")}
    assert shown == {"v0", other}
    shot(page, "07-compare-versions")

    with sessions() as session:
        comparisons = list(session.scalars(select(Comparison).order_by(Comparison.id)))
        assert [c.winner for c in comparisons] == [Winner.a, Winner.tie]
        last = comparisons[-1]
        versions = {
            session.get(ModelVersion, session.get(Generation, g).model_version_id).name
            for g in (last.generation_a_id, last.generation_b_id)
        }
        assert versions == {"v0", other}


def test_users_cannot_pick_a_version_to_compare(page: Page, live: str) -> None:
    """The version choice is for admins: the page hides it and the API refuses it."""
    sign_in(page, live, new_key(live))
    page.click("[data-mode=compare]")
    expect(page.locator("#against-version-row")).to_be_hidden()
    response = httpx.post(
        f"{live}/v1/generate",
        json={"prompt": "Hi", "model_version": "v0"},
        headers={"Authorization": f"Bearer {new_key(live, name='other')}"},
    )
    assert response.status_code == 403
    assert re.search("admin", response.json()["detail"])


def rate_down_with_corrections(live: str, count: int) -> list[int]:
    """`count` answers, each rated down and corrected: enough for a round on the tiny model."""
    ids = []
    for i in range(count):
        body = {"prompt": f"Question number {i}?", "max_new_tokens": 6, "seed": i}
        generation = httpx.post(f"{live}/v1/generate", json=body, headers=ADMIN).json()
        ids.append(generation["id"])
        rating = {"generation_id": generation["id"], "thumbs": "down", "correction": "Sure!"}
        assert httpx.post(f"{live}/v1/feedback", json=rating, headers=ADMIN).status_code == 201
    return ids


def compare_versions(live: str, winner_version: str, loser_version: str, times: int) -> None:
    """Answers from two versions to the same prompts, the first chosen each time."""
    for i in range(times):
        ids = []
        for version in (winner_version, loser_version):
            body = {"prompt": f"Pick {i}", "max_new_tokens": 4, "model_version": version}
            response = httpx.post(f"{live}/v1/generate", json=body, headers=ADMIN)
            assert response.status_code == 200, response.text
            ids.append(response.json()["id"])
        choice = {"generation_a": ids[0], "generation_b": ids[1], "winner": "a"}
        assert httpx.post(f"{live}/v1/comparisons", json=choice, headers=ADMIN).status_code == 201


def cell(page: Page, table: str, version: str, column: int) -> Any:
    return page.locator(f"#{table} tr[data-version='{version}'] td").nth(column)


def test_dashboard_shows_quality_runs_and_the_leaderboard_and_admins_act(
    page: Page, live: str, sessions: Any, settings: Settings
) -> None:
    """Per-version figures, a real round's curves, Bradley-Terry ranks; activate and train."""
    from app.services.training import request_run
    from worker.training.rounds import run_round

    rate_down_with_corrections(live, 10)
    with sessions() as session:
        run, _ = request_run(
            session, trigger="manual",
            config={"train": {"learning_rate": 1e-2, "epochs": 1}, "gate": QUICK_GATE},
        )  # fmt: skip
        run_id = run.id
    round_settings = settings.model_copy(update={"training_min_items": 4})
    run_round(sessions, round_settings, run_id)
    with sessions() as session:
        names = [v.name for v in session.scalars(select(ModelVersion).order_by(ModelVersion.id))]
    assert names == ["v0", "v1"]
    compare_versions(live, "v1", "v0", 3)

    sign_in(page, live, ADMIN_KEY, "/dashboard")
    expect(cell(page, "versions", "v0", 2)).to_have_text("13")  # 10 rated + 3 compared
    expect(cell(page, "versions", "v0", 4)).to_contain_text("0.0% (0.0–27.8) · n=10")  # noqa: RUF001
    expect(cell(page, "versions", "v1", 6)).to_have_text("100.0% of 3")
    expect(page.locator("#leaderboard tbody tr").first).to_have_attribute("data-version", "v1")
    expect(page.locator(f"#runs tr[data-run='{run_id}']")).to_contain_text("v0 → v1")
    expect(page.locator("#chart-run canvas")).to_have_count(1)
    expect(page.locator("#chart-daily canvas")).to_have_count(1)
    expect(page.locator("#chart-approval canvas")).to_have_count(1)
    expect(page.locator("#run-gate")).to_contain_text("preference_gain")
    expect(page.locator("#run-gate")).to_contain_text("rm_heldout_accuracy")
    for version in ("v0", "v1"):  # the round evaluated its parent and its candidate
        expect(cell(page, "evaluations", version, 1)).to_have_text(re.compile(r"^0\.\d{3}$"))
    shot(page, "08-dashboard")

    # Roll back: one click arms, the second confirms.
    button = cell(page, "versions", "v0", 7).locator("button")
    button.click()
    expect(button).to_have_text("Confirm: serve v0")
    button.click()
    expect(page.locator("#status")).to_have_text("v0 is now the active version.")
    expect(cell(page, "versions", "v0", 1)).to_have_text("active")
    models = httpx.get(f"{live}/v1/models", headers=ADMIN).json()["data"]
    assert [(m["name"], m["status"]) for m in models] == [("v0", "active"), ("v1", "retired")]

    page.click("#start-round")
    expect(page.locator("#status")).to_contain_text(f"Training round #{run_id + 1} is queued")
    expect(page.locator(f"#runs tr[data-run='{run_id + 1}']")).to_contain_text("queued")
    shot(page, "09-dashboard-after-actions")


def test_the_dashboard_changes_as_people_rate(page: Page, live: str) -> None:
    """A user sees figures move after a rating (on refresh) and no admin controls."""
    generation = httpx.post(
        f"{live}/v1/generate", json={"prompt": "Hi", "max_new_tokens": 4}, headers=ADMIN
    ).json()
    sign_in(page, live, new_key(live), "/dashboard")
    expect(cell(page, "versions", "v0", 3)).to_have_text("0")
    expect(page.locator("#start-round")).to_be_hidden()
    assert cell(page, "versions", "v0", 7).count() == 0
    expect(page.locator("#leaderboard")).to_contain_text("No comparisons between different")

    rating = {"generation_id": generation["id"], "stars": 5}
    assert httpx.post(f"{live}/v1/feedback", json=rating, headers=ADMIN).status_code == 201
    page.click("#refresh")
    expect(cell(page, "versions", "v0", 3)).to_have_text("1")
    expect(cell(page, "versions", "v0", 4)).to_contain_text("100.0%")
    expect(cell(page, "versions", "v0", 5)).to_have_text("5.00")
    shot(page, "10-dashboard-user")
