"""Every route checks its role: the routes are read from the app, so a new one cannot slip by.
Who sees what: a user key reads and rates only its own generations, a rater key the shared
queue (everyone's), an admin key everything, and only admins see per-rater figures."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import insert, select
from sqlalchemy.orm import Session, sessionmaker

from app.models import ApiKey, Feedback, RunStatus, Thumbs, TrainingRun
from app.services.keys import hash_key
from tests.helpers import Route, routes, url

Headers = dict[str, str]
Sessions = sessionmaker[Session]

PUBLIC: set[Route] = {
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/"),  # the pages sign in with a key in the browser, then call /v1
    ("GET", "/dashboard"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/docs/oauth2-redirect"),
    ("GET", "/redoc"),
}
ADMIN: set[Route] = {
    ("POST", "/v1/keys"),
    ("GET", "/v1/keys"),
    ("DELETE", "/v1/keys/{key_id}"),
    ("POST", "/v1/models/{name}/activate"),
    ("POST", "/v1/training/runs"),
    ("GET", "/v1/set-aside"),
    ("POST", "/v1/feedback/{feedback_id}/restore"),
    ("POST", "/v1/comparisons/{comparison_id}/restore"),
}
USER: set[Route] = {
    ("POST", "/v1/generate"),
    ("POST", "/v1/translate"),
    ("POST", "/v1/qa"),
    ("GET", "/v1/generations"),
    ("GET", "/v1/generations/{generation_id}"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/feedback"),
    ("POST", "/v1/comparisons"),
    ("GET", "/v1/export"),
    ("GET", "/v1/models"),
    ("GET", "/v1/training/runs"),
    ("GET", "/v1/training/runs/{run_id}"),
    ("GET", "/v1/keys/me"),
    ("GET", "/v1/stats/versions"),
    ("GET", "/v1/stats/leaderboard"),
    ("GET", "/v1/stats/daily"),
}


def test_every_route_is_classified(client: TestClient) -> None:
    """A new route must be listed as public, admin or user here, so the tests below cover it."""
    unlisted = routes(client.app) - PUBLIC - ADMIN - USER  # type: ignore[arg-type]
    assert not unlisted, f"classify these routes in tests/api/test_roles.py: {sorted(unlisted)}"
    gone = (PUBLIC | ADMIN | USER) - routes(client.app)  # type: ignore[arg-type]
    assert not gone, f"no longer served, remove from tests/api/test_roles.py: {sorted(gone)}"


def test_no_key_or_a_bad_key_gets_401(client: TestClient) -> None:
    """Every non-public route refuses a request without a valid key, before anything else."""
    wrong = []
    for method, path in sorted(ADMIN | USER):
        for headers in ({}, {"Authorization": "Bearer flm_not-a-real-key"}, {"Authorization": "x"}):
            response = client.request(method, url(path), headers=headers)
            if response.status_code != 401 or response.headers.get("WWW-Authenticate") != "Bearer":
                wrong.append((method, path, headers, response.status_code))
    assert not wrong


def new_key(client: TestClient, admin: Headers, role: str, name: str = "someone") -> Headers:
    """Headers of a fresh key with this role."""
    response = client.post("/v1/keys", json={"name": name, "role": role}, headers=admin)
    assert response.status_code == 201, response.text
    assert response.json()["role"] == role
    return {"Authorization": f"Bearer {response.json()['key']}"}


@pytest.mark.parametrize("role", ["user", "rater"])
def test_admin_routes_refuse_a_user_or_rater_key(
    client: TestClient, admin: dict[str, str], role: str
) -> None:
    """A user or rater key gets 403 on every admin route; an admin key is let through."""
    key = new_key(client, admin, role)
    for method, path in sorted(ADMIN):
        refused = client.request(method, url(path), headers=key)
        assert refused.status_code == 403, (method, path, refused.text)
        assert "admin key" in refused.json()["detail"]
        allowed = client.request(method, url(path), headers=admin)
        assert allowed.status_code not in (401, 403), (method, path, allowed.text)


@pytest.mark.parametrize("role", ["user", "rater"])
def test_user_routes_let_a_user_or_rater_key_through(
    client: TestClient, admin: dict[str, str], role: str
) -> None:
    """Nothing listed for users answers 401 or 403 to a user or a rater key."""
    key = new_key(client, admin, role)
    for method, path in sorted(USER):
        response = client.request(method, url(path), headers=key)
        assert response.status_code not in (401, 403), (method, path, response.text)


def test_public_routes_need_no_key(client: TestClient) -> None:
    """Probes, pages and docs answer without a key."""
    for _, path in sorted(PUBLIC):
        assert client.get(path).status_code == 200, path


# --- Who sees what -------------------------------------------------------------------------------


def generate(client: TestClient, headers: Headers, prompt: str, seed: int) -> int:
    body = {"prompt": prompt, "max_new_tokens": 2, "temperature": 1.0, "seed": seed}
    response = client.post("/v1/generate", json=body, headers=headers)
    assert response.status_code == 200, response.text
    generation_id: int = response.json()["id"]
    return generation_id


def listed(client: TestClient, headers: Headers, **params: Any) -> set[int]:
    """The ids of every generation the key is shown, page after page."""
    ids: set[int] = set()
    cursor = None
    while True:
        query = {**params, "limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/generations", params=query, headers=headers)
        assert page.status_code == 200, page.text
        ids |= {item["id"] for item in page.json()["items"]}
        cursor = page.json()["next_cursor"]
        if cursor is None:
            return ids


def exported(client: TestClient, headers: Headers, kind: str) -> list[dict[str, Any]]:
    response = client.get("/v1/export", params={"format": kind}, headers=headers)
    assert response.status_code == 200, response.text
    return [json.loads(line) for line in response.text.splitlines()]


def test_a_user_key_sees_and_rates_only_its_own_generations(
    client: TestClient, admin: Headers, sessions: Sessions
) -> None:
    """List, get, the queue, export, feedback and comparisons: a user key's own only; another
    key's generation is a 404, as if it did not exist. Rater and admin keys: everyone's."""
    alice, bob = new_key(client, admin, "user", "alice"), new_key(client, admin, "user", "bob")
    carol = new_key(client, admin, "rater", "carol")
    prompt = "Name a bird."
    a1, a2 = generate(client, alice, prompt, 1), generate(client, alice, prompt, 2)
    b1 = generate(client, bob, prompt, 3)
    c1 = generate(client, carol, prompt, 4)
    x1 = generate(client, admin, prompt, 5)
    everyone = {a1, a2, b1, c1, x1}

    assert listed(client, alice) == {a1, a2}
    assert listed(client, bob) == {b1}
    assert listed(client, carol) == listed(client, admin) == everyone
    assert client.get(f"/v1/generations/{a1}", headers=alice).status_code == 200
    for other in (b1, c1, x1):
        hidden = client.get(f"/v1/generations/{other}", headers=alice)
        assert hidden.status_code == 404, hidden.text
        assert hidden.json()["detail"] == f"generation {other} does not exist"
        assert prompt not in hidden.text
    for key in (carol, admin):
        assert client.get(f"/v1/generations/{b1}", headers=key).status_code == 200

    # Rating: a user its own only; a rater or an admin anything.
    refused = client.post("/v1/feedback", json={"generation_id": b1, "thumbs": "up"}, headers=alice)
    assert refused.status_code == 404, refused.text
    pair = {"generation_a": a1, "generation_b": b1, "winner": "a"}
    assert client.post("/v1/comparisons", json=pair, headers=alice).status_code == 404
    swapped = {"generation_a": b1, "generation_b": a1, "winner": "a"}
    assert client.post("/v1/comparisons", json=swapped, headers=alice).status_code == 404
    own = {"generation_id": a1, "thumbs": "up", "correction": "A robin."}
    assert client.post("/v1/feedback", json=own, headers=alice).status_code == 201
    own_pair = {"generation_a": a1, "generation_b": a2, "winner": "b"}
    assert client.post("/v1/comparisons", json=own_pair, headers=alice).status_code == 201
    for key in (carol, admin):
        rating = {"generation_id": b1, "thumbs": "down"}
        assert client.post("/v1/feedback", json=rating, headers=key).status_code == 201
        assert client.post("/v1/comparisons", json=pair, headers=key).status_code == 201
    carol_on_a1 = {"generation_id": a2, "thumbs": "down", "correction": "Carol's bird."}
    assert client.post("/v1/feedback", json=carol_on_a1, headers=carol).status_code == 201
    with sessions() as session:  # an old rating of bob's answer by alice, from before roles
        alice_id = session.scalar(select(ApiKey.id).where(ApiKey.name == "alice"))
        session.add(Feedback(generation_id=b1, api_key_id=alice_id, thumbs=Thumbs.up))
        session.commit()

    # The queue (unrated answers): a user's own; a rater's and an admin's, everyone's.
    assert listed(client, alice, rated="false") == set()  # a1 rated by alice, a2 by carol
    assert listed(client, bob, rated="false") == set()
    assert listed(client, carol, rated="false") == {c1, x1}

    # Export: a user's own ratings of its own answers; a rater's and an admin's, all of them.
    assert exported(client, alice, "kto") == [{"prompt": ANY, "completion": ANY, "label": True}]
    assert exported(client, bob, "kto") == exported(client, bob, "dpo") == []
    alice_pairs = exported(client, alice, "dpo")
    assert [row["chosen"] for row in alice_pairs] == [ANY, "A robin."]  # her comparison, her fix
    assert "Carol's bird." not in json.dumps(exported(client, alice, "sft"))
    for key in (carol, admin):
        assert len(exported(client, key, "kto")) == 5
        assert "Carol's bird." in json.dumps(exported(client, key, "sft"))


class _AnyText:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, str)


ANY: Any = _AnyText()


def test_per_rater_figures_of_a_round_are_for_admin_keys_only(
    client: TestClient, admin: Headers, sessions: Sessions
) -> None:
    """Which raters a round left out, and their consensus figures, are shown to admins; user
    and rater keys see the round with the rest of its counts."""
    counts = {
        "train_kto": 12, "dropped_by_consensus": 3, "dropped_revoked": 2,
        "excluded_raters": {"revoked": [4], "consensus": [5]},
        "consensus": {"5": {"tested": 6, "disagreed": 6}},
    }  # fmt: skip
    with sessions() as session:
        run = TrainingRun(status=RunStatus.rejected, trigger="manual", counts=counts)
        session.add(run)
        session.commit()
        run_id = run.id
    public = {k: v for k, v in counts.items() if k not in ("excluded_raters", "consensus")}
    for role in ("user", "rater"):
        key = new_key(client, admin, role)
        (listed_run,) = client.get("/v1/training/runs", headers=key).json()
        assert listed_run["counts"] == public, role
        one = client.get(f"/v1/training/runs/{run_id}", headers=key)
        assert one.json()["counts"] == public, role
    (listed_run,) = client.get("/v1/training/runs", headers=admin).json()
    assert listed_run["counts"] == counts
    assert client.get(f"/v1/training/runs/{run_id}", headers=admin).json()["counts"] == counts


def test_existing_user_keys_keep_working_and_the_bootstrap_admin_sees_all(
    client: TestClient, admin: Headers, sessions: Sessions
) -> None:
    """A key stored as `user` before raters existed stays a user key: it generates, reads and
    rates its own; the bootstrap admin key still reads everyone's."""
    plaintext = "flm_a-key-made-before-raters-existed"
    with sessions() as session:  # the row as an older release wrote it: role 'user'
        session.execute(
            insert(ApiKey).values(
                name="old user", role="user", key_hash=hash_key(plaintext), prefix=plaintext[:8]
            )
        )
        session.commit()
    old = {"Authorization": f"Bearer {plaintext}"}
    assert client.get("/v1/keys/me", headers=old).json()["role"] == "user"
    mine = generate(client, old, "Name a fish.", 1)
    rating = {"generation_id": mine, "stars": 4}
    assert client.post("/v1/feedback", json=rating, headers=old).status_code == 201
    assert listed(client, old) == {mine}
    assert mine in listed(client, admin)
