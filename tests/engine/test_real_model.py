"""The real default model (SmolLM2-135M-Instruct from its wheel), prepared as `make run` does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.engine.loading import DEFAULT_SOURCE, prepare_default_model
from app.main import create_app
from app.migrate import upgrade
from tests.helpers import ADMIN_KEY, CACHE, IsolatedSettings

pytestmark = pytest.mark.real_model


def test_default_model_answers_the_capital_of_france(tmp_path: Path) -> None:
    """Downloaded, converted once, and served: it knows that Paris is the capital of France."""
    data_dir = CACHE / "real"
    path = prepare_default_model(data_dir / "models")
    assert path == data_dir / "models" / DEFAULT_SOURCE.name
    assert (path / "model.safetensors").is_file()
    database_url = f"sqlite:///{tmp_path / 'real.db'}"
    upgrade(database_url)
    settings = IsolatedSettings(
        data_dir=data_dir,
        database_url=database_url,
        admin_api_key=ADMIN_KEY,
    )
    with TestClient(create_app(settings)) as client:
        response = client.post(
            "/v1/qa",
            json={
                "question": "What is the capital of France?",
                "temperature": 0,
                "max_new_tokens": 24,
            },
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        )
    assert response.status_code == 200, response.text
    assert "Paris" in response.json()["output"]
    assert response.json()["finish_reason"] == "stop"


def test_batched_greedy_answers_match_answers_alone() -> None:
    """Continuous batching changes nothing in an answer: left padding, joins and leaves included.

    Prompts of different lengths, with different lengths to generate, joining at different
    steps, give the greedy answers each gives alone (on the real model, whose choices are not
    near-ties the way a random tiny model's are).
    """
    import torch

    from app.engine.chat import chat_prompt
    from app.engine.loading import load_model
    from app.engine.registry import ModelRegistry, ServingVersion
    from app.engine.requests import SamplingParams
    from app.engine.scheduler import Engine

    path = prepare_default_model(CACHE / "real" / "models")
    model, tokenizer = load_model(path, torch.float32)
    registry = ModelRegistry()
    registry.activate(ServingVersion(1, "v0", model, tokenizer))
    engine = Engine(registry)
    questions = [
        "What is the capital of France?",
        "Name three colours of the rainbow, then explain in two sentences why the sky is blue.",
        "Hi",
        "Write one sentence about autumn leaves.",
    ]
    lengths = [24, 40, 8, 32]

    def submit(i: int) -> Any:
        params = SamplingParams(max_new_tokens=lengths[i], temperature=0)
        with engine.lease() as lease:
            prompt = chat_prompt(lease.version.tokenizer, questions[i])
            return engine.submit(lease, prompt, params)

    engine.start()
    alone = [submit(i).result(120).text for i in range(len(questions))]
    first = submit(1)  # running for a while before the others join
    assert first.next_delta(60)
    together = [first, *(submit(i) for i in (0, 2, 3))]
    results = {i: s.result(120).text for i, s in zip((1, 0, 2, 3), together, strict=True)}
    engine.stop()
    assert [results[i] for i in range(len(questions))] == alone
