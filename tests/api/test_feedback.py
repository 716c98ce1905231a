"""Ratings and comparisons: what is stored, one row per rater, bad input, and the TRL export."""

from __future__ import annotations

import json
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.models import ApiKey, Comparison, Feedback, Thumbs, Winner
from app.services.keys import hash_key

Sessions = sessionmaker[Session]
Headers = dict[str, str]


def generate(client: TestClient, headers: Headers, prompt: str, seed: int = 1) -> dict[str, Any]:
    """A short sampled generation; same prompt and different seed answer the same input."""
    body = {"prompt": prompt, "max_new_tokens": 8, "temperature": 1.0, "seed": seed}
    response = client.post("/v1/generate", json=body, headers=headers)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


def new_key(client: TestClient, admin: Headers, name: str) -> Headers:
    """Headers of a fresh rater key: it rates everyone's generations (a user key only its own)."""
    response = client.post("/v1/keys", json={"name": name, "role": "rater"}, headers=admin)
    assert response.status_code == 201, response.text
    return {"Authorization": f"Bearer {response.json()['key']}"}


def key_id(sessions: Sessions, headers: Headers) -> int:
    """The stored id of the key in these headers."""
    plaintext = headers["Authorization"].removeprefix("Bearer ")
    with sessions() as session:
        found = session.scalar(select(ApiKey.id).where(ApiKey.key_hash == hash_key(plaintext)))
    assert found is not None
    return found


def count(sessions: Sessions, table: type[Feedback] | type[Comparison]) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(table)) or 0


def stored_feedback(sessions: Sessions) -> list[dict[str, Any]]:
    """Every stored rating, oldest first, as plain values."""
    with sessions() as session:
        rows = session.scalars(select(Feedback).order_by(Feedback.id))
        return [
            {
                "id": r.id,
                "generation_id": r.generation_id,
                "api_key_id": r.api_key_id,
                "thumbs": r.thumbs,
                "stars": r.stars,
                "comment": r.comment,
                "correction": r.correction,
            }
            for r in rows
        ]


def stored_comparisons(sessions: Sessions) -> list[dict[str, Any]]:
    """Every stored comparison, oldest first, as plain values."""
    with sessions() as session:
        rows = session.scalars(select(Comparison).order_by(Comparison.id))
        return [
            {
                "id": r.id,
                "api_key_id": r.api_key_id,
                "generation_a_id": r.generation_a_id,
                "generation_b_id": r.generation_b_id,
                "low_generation_id": r.low_generation_id,
                "high_generation_id": r.high_generation_id,
                "winner": r.winner,
            }
            for r in rows
        ]


def export(client: TestClient, headers: Headers, fmt: str) -> list[dict[str, Any]]:
    """The export in one format, parsed line by line."""
    response = client.get("/v1/export", params={"format": fmt}, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].split(";")[0] == "application/x-ndjson"
    body = response.text
    assert body == "" or body.endswith("\n")
    return [json.loads(line) for line in body.splitlines()]


# --- feedback -------------------------------------------------------------------------------


def test_first_rating_is_created_and_stored_exactly(
    client: TestClient, user: Headers, sessions: Sessions
) -> None:
    """A first rating answers 201 with what was stored, and the row holds every field."""
    generation = generate(client, user, "Name a fruit.")
    body = {
        "generation_id": generation["id"],
        "thumbs": "down",
        "stars": 2,
        "comment": "too vague",
        "correction": "An apple.",
    }
    response = client.post("/v1/feedback", json=body, headers=user)
    assert response.status_code == 201, response.text
    data = response.json()
    assert {k: data[k] for k in body} == body
    assert set(data) == {*body, "id", "created_at", "updated_at"}
    assert stored_feedback(sessions) == [
        {
            "id": data["id"],
            "generation_id": generation["id"],
            "api_key_id": key_id(sessions, user),
            "thumbs": Thumbs.down,
            "stars": 2,
            "comment": "too vague",
            "correction": "An apple.",
        }
    ]


def test_repeat_by_the_same_key_updates_its_one_row(
    client: TestClient, user: Headers, sessions: Sessions
) -> None:
    """Rating again answers 200 and updates the row; fields not sent keep their stored values."""
    generation = generate(client, user, "Name a fruit.")
    gid = generation["id"]
    first = client.post(
        "/v1/feedback", json={"generation_id": gid, "thumbs": "up", "comment": "ok"}, headers=user
    )
    assert first.status_code == 201
    second = client.post("/v1/feedback", json={"generation_id": gid, "stars": 2}, headers=user)
    assert second.status_code == 200, second.text
    assert second.json()["id"] == first.json()["id"]
    assert (second.json()["thumbs"], second.json()["stars"], second.json()["comment"]) == (
        "up",
        2,
        "ok",
    )
    third = client.post(
        "/v1/feedback",
        json={"generation_id": gid, "thumbs": "down", "correction": "A pear."},
        headers=user,
    )
    assert third.status_code == 200, third.text
    assert stored_feedback(sessions) == [
        {
            "id": first.json()["id"],
            "generation_id": gid,
            "api_key_id": key_id(sessions, user),
            "thumbs": Thumbs.down,
            "stars": 2,
            "comment": "ok",
            "correction": "A pear.",
        }
    ]


def test_another_key_rating_the_same_generation_makes_a_second_row(
    client: TestClient, user: Headers, admin: Headers, sessions: Sessions
) -> None:
    """Each rater has their own rating of a generation; one rater never overwrites another's."""
    gid = generate(client, user, "Name a fruit.")["id"]
    other = new_key(client, admin, "second rater")
    mine = client.post("/v1/feedback", json={"generation_id": gid, "stars": 5}, headers=user)
    theirs = client.post("/v1/feedback", json={"generation_id": gid, "stars": 1}, headers=other)
    assert (mine.status_code, theirs.status_code) == (201, 201)
    assert mine.json()["id"] != theirs.json()["id"]
    rows = stored_feedback(sessions)
    assert [(r["api_key_id"], r["stars"]) for r in rows] == [
        (key_id(sessions, user), 5),
        (key_id(sessions, other), 1),
    ]


def test_a_rating_needs_thumbs_stars_or_correction(
    client: TestClient, user: Headers, sessions: Sessions
) -> None:
    """Without thumbs, stars or correction the rating is refused with a message saying so."""
    gid = generate(client, user, "Name a fruit.")["id"]
    extras: list[dict[str, Any]] = [
        {},
        {"comment": "nice"},
        {"thumbs": None, "stars": None, "correction": None},
    ]
    for extra in extras:
        response = client.post("/v1/feedback", json={"generation_id": gid, **extra}, headers=user)
        assert response.status_code == 422, (extra, response.text)
        messages = " ".join(d["msg"] for d in response.json()["detail"])
        assert "thumbs, stars or correction" in messages
    assert count(sessions, Feedback) == 0


def test_rating_an_unknown_generation_is_404(
    client: TestClient, user: Headers, sessions: Sessions
) -> None:
    """An id that names no generation is a 404 whose message names it; nothing is stored."""
    response = client.post(
        "/v1/feedback", json={"generation_id": 987654, "thumbs": "up"}, headers=user
    )
    assert response.status_code == 404
    assert "987654" in response.json()["detail"]
    assert count(sessions, Feedback) == 0


IMPOSSIBLE_IDS: list[Any] = [0, -1, 2**31, 2**63, 10**30, True, "1", 1.0]
"""No row can have these ids, or they are not JSON integers."""


def test_an_impossible_generation_id_is_422_not_500(
    client: TestClient, user: Headers, sessions: Sessions
) -> None:
    """An id no database row can have, or one that is not a JSON integer, is a 422 naming it."""
    generate(client, user, "Name a fruit.")
    tolerant = TestClient(client.app, raise_server_exceptions=False)
    for gid in IMPOSSIBLE_IDS:
        body: dict[str, Any] = {"generation_id": gid, "thumbs": "up"}
        response = tolerant.post("/v1/feedback", json=body, headers=user)
        assert response.status_code == 422, (gid, response.text)
        assert response.json()["detail"][0]["loc"] == ["body", "generation_id"]
        for side in ("generation_a", "generation_b"):
            body = {"generation_a": 1, "generation_b": 1, "winner": "a", side: gid}
            response = tolerant.post("/v1/comparisons", json=body, headers=user)
            assert response.status_code == 422, (gid, side, response.text)
            assert response.json()["detail"][0]["loc"] == ["body", side]
    assert count(sessions, Feedback) == count(sessions, Comparison) == 0


OUTPUT = object()
"""Stands for the generation's own output in a bad body."""


BAD_RATINGS: list[tuple[dict[str, Any], str]] = [
    ({"stars": 0}, "stars"),
    ({"stars": 6}, "stars"),
    ({"stars": "five"}, "stars"),
    ({"stars": True}, "stars"),  # not silently stored as 1 star
    ({"stars": 4.0}, "stars"),
    ({"stars": "4"}, "stars"),
    ({"thumbs": "sideways"}, "thumbs"),
    ({"thumbs": "up", "rating": 5}, "rating"),
    ({"correction": ""}, "correction"),
    ({"correction": "  \n "}, "correction"),
    ({"thumbs": "up", "correction": "   "}, "correction"),
    ({"correction": OUTPUT}, "correction"),
    ({"thumbs": "down", "correction": OUTPUT}, "correction"),
    ({"thumbs": "up", "comment": "x" * 4001}, "comment"),
]


def test_bad_rating_fields_are_named_and_nothing_is_stored(
    client: TestClient, user: Headers, sessions: Sessions
) -> None:
    """Each bad field is named in a 422, on a first rating and on a repeat, and nothing changes."""
    generation = generate(client, user, "Name a fruit.")
    first = {"generation_id": generation["id"], "thumbs": "up", "stars": 4, "comment": "c"}
    for repeat in (False, True):
        if repeat:  # a bad repeat leaves the stored rating as it was
            assert client.post("/v1/feedback", json=first, headers=user).status_code == 201
        before = stored_feedback(sessions)
        for fields, field in BAD_RATINGS:
            body = {"generation_id": generation["id"]}
            body |= {k: generation["output"] if v is OUTPUT else v for k, v in fields.items()}
            response = client.post("/v1/feedback", json=body, headers=user)
            assert response.status_code == 422, (fields, response.text)
            locations = [d["loc"] for d in response.json()["detail"]]
            assert any(loc[-1] == field for loc in locations), (fields, locations)
            assert stored_feedback(sessions) == before, fields
        assert len(before) == repeat


def test_a_correction_with_only_surrounding_whitespace_changed_is_the_same_output(
    client: TestClient, user: Headers, sessions: Sessions
) -> None:
    """A correction that only pads the model's output is no correction: 422 naming it."""
    generation = generate(client, user, "Name a fruit.")
    body = {"generation_id": generation["id"], "correction": f"  {generation['output']}\n"}
    response = client.post("/v1/feedback", json=body, headers=user)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", "correction"]
    assert "same as the model's output" in response.json()["detail"][0]["msg"]
    assert count(sessions, Feedback) == 0


# --- comparisons ----------------------------------------------------------------------------


def test_comparison_is_stored_once_per_key_and_unordered_pair(
    client: TestClient, user: Headers, admin: Headers, sessions: Sessions
) -> None:
    """Choosing again, either way round, answers 200 and updates the row; another key adds one."""
    one = generate(client, user, "Name a colour.", seed=1)["id"]
    two = generate(client, user, "Name a colour.", seed=2)["id"]
    first = client.post(
        "/v1/comparisons", json={"generation_a": one, "generation_b": two, "winner": "a"},
        headers=user,
    )  # fmt: skip
    assert first.status_code == 201, first.text
    data = first.json()
    assert (data["generation_a"], data["generation_b"], data["winner"]) == (one, two, "a")
    me = key_id(sessions, user)
    assert stored_comparisons(sessions) == [
        {"id": data["id"], "api_key_id": me, "generation_a_id": one, "generation_b_id": two,
         "low_generation_id": one, "high_generation_id": two, "winner": Winner.a},
    ]  # fmt: skip

    swapped = client.post(
        "/v1/comparisons", json={"generation_a": two, "generation_b": one, "winner": "a"},
        headers=user,
    )  # fmt: skip
    assert swapped.status_code == 200, swapped.text
    assert swapped.json()["id"] == data["id"]
    assert (swapped.json()["generation_a"], swapped.json()["winner"]) == (two, "a")
    assert stored_comparisons(sessions) == [
        {"id": data["id"], "api_key_id": me, "generation_a_id": two, "generation_b_id": one,
         "low_generation_id": one, "high_generation_id": two, "winner": Winner.a},
    ]  # fmt: skip

    again = client.post(
        "/v1/comparisons", json={"generation_a": one, "generation_b": two, "winner": "tie"},
        headers=user,
    )  # fmt: skip
    assert again.status_code == 200
    assert [c["winner"] for c in stored_comparisons(sessions)] == [Winner.tie]

    other = new_key(client, admin, "second rater")
    theirs = client.post(
        "/v1/comparisons", json={"generation_a": one, "generation_b": two, "winner": "b"},
        headers=other,
    )  # fmt: skip
    assert theirs.status_code == 201
    rows = stored_comparisons(sessions)
    assert [(r["api_key_id"], r["winner"]) for r in rows] == [
        (me, Winner.tie),
        (key_id(sessions, other), Winner.b),
    ]


def test_comparison_of_different_inputs_names_generation_b(
    client: TestClient, user: Headers, sessions: Sessions
) -> None:
    """Two answers to different prompts, or to different tasks, cannot be compared: 422."""
    colour = generate(client, user, "Name a colour.")["id"]
    fruit = generate(client, user, "Name a fruit.")["id"]
    qa = client.post(
        "/v1/qa", json={"question": "Name a colour.", "max_new_tokens": 4}, headers=user
    ).json()["id"]
    for other in (fruit, qa):
        response = client.post(
            "/v1/comparisons", json={"generation_a": colour, "generation_b": other, "winner": "a"},
            headers=user,
        )  # fmt: skip
        assert response.status_code == 422, response.text
        (detail,) = response.json()["detail"]
        assert detail["loc"] == ["body", "generation_b"]
        assert "same task and input" in detail["msg"]
    assert count(sessions, Comparison) == 0


def test_comparison_of_a_generation_with_itself_is_422(
    client: TestClient, user: Headers, sessions: Sessions
) -> None:
    """The same id on both sides is refused, naming generation_b."""
    gid = generate(client, user, "Name a colour.")["id"]
    response = client.post(
        "/v1/comparisons", json={"generation_a": gid, "generation_b": gid, "winner": "a"},
        headers=user,
    )  # fmt: skip
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "generation_b"]
    assert count(sessions, Comparison) == 0


def test_comparison_with_an_unknown_generation_is_404(
    client: TestClient, user: Headers, sessions: Sessions
) -> None:
    """An unknown id on either side is a 404 naming it."""
    gid = generate(client, user, "Name a colour.")["id"]
    for side in ("generation_a", "generation_b"):
        body = {"generation_a": gid, "generation_b": gid, "winner": "b", side: 424242}
        response = client.post("/v1/comparisons", json=body, headers=user)
        assert response.status_code == 404, side
        assert "424242" in response.json()["detail"]
    assert count(sessions, Comparison) == 0


def test_bad_comparison_fields_are_named(
    client: TestClient, user: Headers, sessions: Sessions
) -> None:
    """A winner other than a, b or tie, or an unknown field, is a 422 naming it."""
    one = generate(client, user, "Name a colour.", seed=1)["id"]
    two = generate(client, user, "Name a colour.", seed=2)["id"]
    bad: list[tuple[dict[str, Any], str]] = [
        ({"winner": "both"}, "winner"),
        ({"winner": "A"}, "winner"),
        ({"winner": None}, "winner"),
        ({"loser": "b"}, "loser"),
    ]
    for fields, field in bad:
        body = {"generation_a": one, "generation_b": two, "winner": "a", **fields}
        response = client.post("/v1/comparisons", json=body, headers=user)
        assert response.status_code == 422, fields
        assert any(d["loc"][-1] == field for d in response.json()["detail"]), fields
    assert count(sessions, Comparison) == 0


# --- export ---------------------------------------------------------------------------------


def test_export_turns_ratings_into_exact_trl_rows(
    client: TestClient, user: Headers, admin: Headers
) -> None:
    """Each format holds exactly the rows the documented rules give, in rating order (exported by
    a rater key, which sees every rating)."""
    other = new_key(client, admin, "second rater")
    g = {
        "colour1": generate(client, user, "Name a colour.", seed=1),
        "colour2": generate(client, user, "Name a colour.", seed=2),
        "count1": generate(client, user, "Count to three.", seed=1),
        "count2": generate(client, user, "Count to three.", seed=2),
        "city": generate(client, user, "Name a city."),
        "poem": generate(client, user, "Write a line of poetry."),
        "joke": generate(client, user, "Tell a joke."),
    }

    def rate(headers: Headers, name: str, status: int, **fields: Any) -> None:
        body = {"generation_id": g[name]["id"], **fields}
        response = client.post("/v1/feedback", json=body, headers=headers)
        assert response.status_code == status, response.text

    def compare(headers: Headers, a: str, b: str, winner: str, status: int) -> None:
        body = {"generation_a": g[a]["id"], "generation_b": g[b]["id"], "winner": winner}
        response = client.post("/v1/comparisons", json=body, headers=headers)
        assert response.status_code == status, response.text

    rate(user, "colour1", 201, stars=1)
    rate(user, "colour1", 200, thumbs="up")  # thumbs decides over the stored 1 star
    rate(user, "colour2", 201, stars=2, comment="dull")
    rate(user, "count1", 201, stars=5)
    rate(user, "count1", 200, stars=3)  # 3 stars: no signal, so no row any more
    rate(user, "city", 201, thumbs="down", stars=5, correction="Paris.")
    rate(other, "city", 201, stars=4)
    rate(user, "poem", 201, correction="Roses are red.")  # a correction alone: no KTO row
    rate(other, "joke", 201, thumbs="up", stars=1)
    compare(user, "colour1", "colour2", "a", 201)
    compare(user, "colour2", "colour1", "a", 200)  # swapped and updated: colour2 wins
    compare(other, "colour1", "colour2", "tie", 201)  # ties say nothing
    compare(other, "count1", "count2", "b", 201)

    def p(name: str) -> str:
        return str(g[name]["model_prompt"])

    def out(name: str) -> str:
        return str(g[name]["output"])

    assert export(client, other, "kto") == [
        {"prompt": p("colour1"), "completion": out("colour1"), "label": True},
        {"prompt": p("colour2"), "completion": out("colour2"), "label": False},
        {"prompt": p("city"), "completion": out("city"), "label": False},
        {"prompt": p("city"), "completion": out("city"), "label": True},
        {"prompt": p("joke"), "completion": out("joke"), "label": True},
    ]
    assert export(client, other, "dpo") == [
        {"prompt": p("colour1"), "chosen": out("colour2"), "rejected": out("colour1")},
        {"prompt": p("count1"), "chosen": out("count2"), "rejected": out("count1")},
        {"prompt": p("city"), "chosen": "Paris.", "rejected": out("city")},
        {"prompt": p("poem"), "chosen": "Roses are red.", "rejected": out("poem")},
    ]
    assert export(client, other, "sft") == [
        {"prompt": p("colour1"), "completion": out("colour1")},
        {"prompt": p("city"), "completion": out("city")},
        {"prompt": p("joke"), "completion": out("joke")},
        {"prompt": p("city"), "completion": "Paris."},
        {"prompt": p("poem"), "completion": "Roses are red."},
    ]


def test_export_prompt_is_the_exact_model_prompt(client: TestClient, user: Headers) -> None:
    """The exported prompt is the chat-templated text the model saw, as shown in model_prompt."""
    generation = generate(client, user, "Name a fruit.")
    client.post("/v1/feedback", json={"generation_id": generation["id"], "stars": 5}, headers=user)
    (row,) = export(client, user, "kto")
    assert row["prompt"] == generation["model_prompt"]
    assert row["prompt"].startswith("<|im_start|>")
    assert row["prompt"].endswith("<|im_start|>assistant\n")
    assert "Name a fruit." in row["prompt"]


# TRL's dataset formats, by column names: KTO is unpaired preference (prompt, completion,
# label: bool), DPO is preference (prompt, chosen, rejected), SFT is prompt-completion.
TRL_COLUMNS: dict[str, dict[str, type]] = {
    "kto": {"prompt": str, "completion": str, "label": bool},
    "dpo": {"prompt": str, "chosen": str, "rejected": str},
    "sft": {"prompt": str, "completion": str},
}


def test_export_rows_have_trl_columns_and_types(client: TestClient, user: Headers) -> None:
    """Every row has exactly TRL's columns for its format, with the types TRL expects."""
    one = generate(client, user, "Name a colour.", seed=1)
    two = generate(client, user, "Name a colour.", seed=2)
    client.post(
        "/v1/feedback", json={"generation_id": one["id"], "thumbs": "down", "correction": "Red."},
        headers=user,
    )  # fmt: skip
    client.post("/v1/feedback", json={"generation_id": two["id"], "stars": 5}, headers=user)
    client.post(
        "/v1/comparisons", json={"generation_a": one["id"], "generation_b": two["id"],
                                 "winner": "b"}, headers=user,
    )  # fmt: skip
    for fmt, columns in TRL_COLUMNS.items():
        rows = export(client, user, fmt)
        assert rows, fmt
        for row in rows:
            assert set(row) == set(columns), (fmt, row)
            for column, kind in columns.items():
                assert type(row[column]) is kind, (fmt, column, row)


def test_export_with_nothing_rated_is_empty(client: TestClient, user: Headers) -> None:
    """With no ratings every format answers 200 with no rows."""
    generate(client, user, "Name a fruit.")
    for fmt in TRL_COLUMNS:
        assert export(client, user, fmt) == []


def test_export_rejects_an_unknown_format(client: TestClient, user: Headers) -> None:
    """A missing or unknown format is a 422 naming the format parameter."""
    for params in [{"format": "csv"}, {"format": "KTO"}, {"format": ""}, {}]:
        response = client.get("/v1/export", params=params, headers=user)
        assert response.status_code == 422, params
        assert response.json()["detail"][0]["loc"] == ["query", "format"]


def test_rating_and_export_need_a_key(
    client: TestClient, user: Headers, sessions: Sessions
) -> None:
    """Without a key, rating, comparing and exporting are all 401, and nothing is stored."""
    one = generate(client, user, "Name a colour.", seed=1)["id"]
    two = generate(client, user, "Name a colour.", seed=2)["id"]
    client.post("/v1/feedback", json={"generation_id": one, "thumbs": "up"}, headers=user)
    assert client.get("/v1/export", params={"format": "kto"}).status_code == 401
    rated = client.post("/v1/feedback", json={"generation_id": two, "thumbs": "up"})
    assert rated.status_code == 401
    compared = client.post(
        "/v1/comparisons", json={"generation_a": one, "generation_b": two, "winner": "a"}
    )
    assert compared.status_code == 401
    assert count(sessions, Feedback) == 1
    assert count(sessions, Comparison) == 0
