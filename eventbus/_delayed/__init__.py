"""Delayed and recurring events: held in Redis, released on time, exactly once."""

from ._feature import DelayedFeature, due_args
from ._recurring import ScheduleInfo

__all__ = ["DelayedFeature", "ScheduleInfo", "due_args"]
