"""Every generation the service produced, with what it was given and who asked."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Enum, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.db import Base, UTCDateTime, utcnow
from app.models.model_version import ModelVersion


class Task(enum.StrEnum):
    """What was asked of the model."""

    generate = "generate"
    translate = "translate"  # type: ignore[assignment]  # shadows str.translate, never used
    qa = "qa"
    chat = "chat"
    """OpenAI-style chat completion: input is the list of messages."""
    completion = "completion"
    """OpenAI-style text completion: the prompt is given to the model as is, without template."""


class Generation(Base):
    """One answer of the model: input, exact prompt, sampling parameters, output and version."""

    __tablename__ = "generations"
    __table_args__ = (Index("ix_generations_task_input_hash", "task", "input_hash"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    task: Mapped[Task] = mapped_column(Enum(Task, native_enum=False, length=16), index=True)
    input: Mapped[dict[str, Any]] = mapped_column(JSON)
    """The task's input fields as the client sent them (e.g. text, target_lang)."""
    input_hash: Mapped[str] = mapped_column(String(64))
    """SHA-256 of task and input: answers to the same question share it (comparisons need it)."""
    prompt: Mapped[str] = mapped_column(Text)
    """The exact text given to the model, chat template applied."""
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    output: Mapped[str] = mapped_column(Text)
    finish_reason: Mapped[str] = mapped_column(String(16))
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    latency_ms: Mapped[int] = mapped_column(Integer)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), index=True)
    api_key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    version: Mapped[ModelVersion] = relationship(lazy="joined")
