"""Live topics: Redis pub/sub.

* ``_push``: ``LiveConnection``, the bus's ONE push connection (subscribe with
  reference counts, read loop, PING watchdog, reconnect, gap reporting);
* ``_publisher``: ``OrderedPublisher``, concurrent ``PUBLISH`` calls sent in
  sequence order, pipelined under load;
* ``_feature``: ``LiveFeature``, the two above behind the feature protocol.
"""

from __future__ import annotations

__all__: list[str] = []
