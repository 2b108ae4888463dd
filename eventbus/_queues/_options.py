"""The arguments of ``enqueue``, ``worker`` and ``jobs``, checked in one place before
any I/O (as ``_streams/_options`` does for consumer groups)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from .._config import Limits, RetryPolicy, seconds
from .._topic import Topic, within_limits
from ..errors import ConfigurationError
from ._queue import Queue
from ._worker import WorkerOptions

__all__ = ["check_job_id", "check_priority", "check_queue", "worker_options"]

MAX_JOB_ID: int = 256


def check_queue(queue: object, limits: Limits) -> Queue[Any]:
    """``queue`` if it is a :class:`Queue` whose name fits the bus's ``limits``."""
    if not isinstance(queue, Queue):
        raise ConfigurationError(f"expected a Queue, got {queue!r}")
    if len(queue.name) > limits.max_topic_len:
        within_limits(Topic(queue.name), limits)
    return queue


def check_priority(queue: Queue[Any], priority: object) -> int:
    """``priority`` if it is a level of ``queue`` (0 to ``priorities - 1``)."""
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise ConfigurationError(f"priority must be an int, got {priority!r}")
    if not 0 <= priority < queue.priorities:
        raise ConfigurationError(
            f"queue {queue.name!r}: priority must be from 0 to {queue.priorities - 1}"
            f" (Queue(..., priorities={queue.priorities})), got {priority}"
        )
    return priority


def check_job_id(queue: Queue[Any], job_id: object) -> str | None:
    """``job_id`` if it is ``None`` or a str of 1 to 256 characters."""
    if job_id is None:
        return None
    if not isinstance(job_id, str) or not job_id or len(job_id) > MAX_JOB_ID:
        raise ConfigurationError(
            f"queue {queue.name!r}: job_id must be a str of 1 to {MAX_JOB_ID} characters,"
            f" got {job_id!r}"
        )
    return job_id


def worker_options(
    *,
    concurrency: object,
    max_attempts: object,
    timeout: float | timedelta | None,
    retry: object,
    heartbeat: float | timedelta,
    block: float | timedelta,
) -> WorkerOptions:
    """A worker's options (``worker``, ``jobs``), checked."""
    if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
        raise ConfigurationError(f"concurrency must be a positive int, got {concurrency!r}")
    if not isinstance(retry, RetryPolicy):
        raise ConfigurationError(f"retry must be a RetryPolicy, got {retry!r}")
    attempts = retry.max_attempts if max_attempts is None else max_attempts
    if not isinstance(attempts, int) or isinstance(attempts, bool) or attempts < 1:
        raise ConfigurationError(f"max_attempts must be a positive int, got {max_attempts!r}")
    limit = None if timeout is None else seconds(timeout, name="timeout")
    if limit is not None and limit <= 0:
        raise ConfigurationError(f"timeout must be positive, got {timeout!r}")
    beat = seconds(heartbeat, name="heartbeat")
    if beat < 0.3:
        raise ConfigurationError(f"heartbeat must be at least 0.3 s, got {heartbeat!r}")
    wait = seconds(block, name="block")
    if not 0 < wait <= 60:
        raise ConfigurationError(f"block must be within (0, 60] seconds, got {block!r}")
    return WorkerOptions(
        concurrency=concurrency,
        max_attempts=attempts,
        timeout=limit,
        retry=retry,
        heartbeat=beat,
        block=wait,
    )
