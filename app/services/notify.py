"""Telling every API process that the active version changed: Redis pub/sub where there is Redis.

Processes also poll the database, so a lost message (or no Redis) only delays a swap.
"""

from __future__ import annotations

import logging

import redis

CHANNEL = "feedback-lm:active-version"
log = logging.getLogger(__name__)


def announce_activation(redis_url: str | None, version_id: int) -> None:
    """Publish the newly active version's id; failures are logged, never raised."""
    if not redis_url:
        return
    try:
        client = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        client.publish(CHANNEL, str(version_id))
        client.close()
    except redis.RedisError as exc:
        log.warning(
            "could not announce version %s over Redis (%s); processes will poll", version_id, exc
        )
