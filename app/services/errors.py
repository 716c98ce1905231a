"""Errors services raise; the web layer maps each to a status code."""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error a caller can fix."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Forbidden(ServiceError):
    """The caller's key may not do this (403)."""


class NotFound(ServiceError):
    """The thing asked for does not exist (404)."""


class Conflict(ServiceError):
    """The request clashes with the current state (409)."""


class Unavailable(ServiceError):
    """A service the request needs is down (503); retrying later can succeed."""


class ClientGone(ServiceError):
    """The client went away before its answer was ready (499, nginx's code): the partial answer
    is recorded, and nothing is kept for an Idempotency-Key to replay."""


class Busy(ServiceError):
    """Too many requests are waiting (429); retrying shortly can succeed."""


class InvalidInput(ServiceError):
    """A field's value is not acceptable (422); `field` names it, `location` says where it was."""

    def __init__(self, field: str, message: str, location: str = "body") -> None:
        super().__init__(message)
        self.field = field
        self.location = location
