"""Work queues: each job to exactly one worker, at least once (see ``_feature``)."""

from ._admin import JobDeadLetter
from ._feature import QueueFeature
from ._job import Job, JobSubscription
from ._queue import Queue
from ._worker import WorkerOptions

__all__ = ["Job", "JobDeadLetter", "JobSubscription", "Queue", "QueueFeature", "WorkerOptions"]
