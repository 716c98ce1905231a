"""The real default model (SmolLM2-135M-Instruct from its wheel), prepared as `make run` does."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from app.migrate import upgrade
from app.ml.loading import DEFAULT_SOURCE, prepare_default_model
from tests.conftest import ADMIN_KEY, CACHE

pytestmark = pytest.mark.real_model


def test_default_model_answers_the_capital_of_france(tmp_path: Path) -> None:
    """Downloaded, converted once, and served: it knows that Paris is the capital of France."""
    data_dir = CACHE / "real"
    path = prepare_default_model(data_dir / "models")
    assert path == data_dir / "models" / DEFAULT_SOURCE.name
    assert (path / "model.safetensors").is_file()
    database_url = f"sqlite:///{tmp_path / 'real.db'}"
    upgrade(database_url)
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
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
