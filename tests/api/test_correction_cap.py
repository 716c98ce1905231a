"""A correction is capped in tokens at the API, so that training never cuts it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import select
from transformers import AutoTokenizer

from app.config import Settings
from app.main import create_app
from app.models import Feedback
from app.training_config import TokenBudget


def text_of(tokenizer: object, tokens: int) -> str:
    """A text the serving tokenizer counts as exactly `tokens` tokens."""
    text = "word" + " word" * (tokens - 1)
    assert len(tokenizer(text, add_special_tokens=False).input_ids) == tokens  # type: ignore[operator]
    return text


def test_a_correction_longer_than_the_training_answer_budget_is_a_422(
    client: TestClient,
    admin: dict[str, str],
    settings: Settings,
    sessions: Any,
    tiny_model_dir: Path,
) -> None:
    """At the budget's answer room (255 tokens by default) a correction is stored; one token more
    is a 422 that says the limit and the setting behind it, and nothing is stored."""
    limit = TokenBudget.from_settings(settings).max_answer_tokens
    assert limit == 255
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    body = {"prompt": "Tell me a story.", "max_new_tokens": 4}
    generation = client.post("/v1/generate", json=body, headers=admin).json()["id"]

    too_long = {"generation_id": generation, "correction": text_of(tokenizer, limit + 1)}
    response = client.post("/v1/feedback", json=too_long, headers=admin)
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"][-1] == "correction"
    assert f"is {limit + 1} tokens long; at most {limit} tokens" in error["msg"]
    assert "TRAINING_MAX_LENGTH - TRAINING_MAX_PROMPT_TOKENS" in error["msg"]
    with sessions() as session:
        assert session.scalars(select(Feedback)).all() == []

    fits = {"generation_id": generation, "correction": text_of(tokenizer, limit)}
    response = client.post("/v1/feedback", json=fits, headers=admin)
    assert response.status_code == 201, response.text


def test_the_cap_follows_the_training_settings(
    settings: Settings, admin: dict[str, str], tiny_model_dir: Path
) -> None:
    """TRAINING_MAX_LENGTH 128 and TRAINING_MAX_PROMPT_TOKENS 100 leave 27 tokens; a thumb with no
    correction is never counted."""
    smaller = settings.model_copy(
        update={"training_max_length": 128, "training_max_prompt_tokens": 100}
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    with TestClient(create_app(smaller)) as client:
        generation = client.post(
            "/v1/generate", json={"prompt": "Hi", "max_new_tokens": 2}, headers=admin
        ).json()["id"]
        rating = {"generation_id": generation, "correction": text_of(tokenizer, 28)}
        response = client.post("/v1/feedback", json=rating, headers=admin)
        assert response.status_code == 422 and "at most 27 tokens" in response.text
        rating["correction"] = text_of(tokenizer, 27)
        assert client.post("/v1/feedback", json=rating, headers=admin).status_code == 201
        thumb = {"generation_id": generation, "thumbs": "up"}
        assert client.post("/v1/feedback", json=thumb, headers=admin).status_code == 200
