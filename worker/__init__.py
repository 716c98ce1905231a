"""Celery workers: the background side of the service."""
