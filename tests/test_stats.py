"""The statistics records: counters declared once, snapshots frozen."""

from __future__ import annotations

import attrs
import pytest

from eventbus import ConsumerStatistics
from eventbus._stats import ConsumerCounters


def test_consumer_statistics_is_a_frozen_snapshot_of_the_counters() -> None:
    counters = ConsumerCounters()
    counters.handled += 3
    counters.group_recreated += 1
    stats = ConsumerStatistics(group="g", consumer="c", **attrs.asdict(counters))
    counters.handled += 1  # the snapshot does not follow
    assert stats.handled == 3
    assert stats.group_recreated == 1
    assert stats.failed == 0
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        stats.handled = 5  # type: ignore[misc]
    assert stats == ConsumerStatistics(group="g", consumer="c", handled=3, group_recreated=1)
    assert hash(stats) == hash(
        ConsumerStatistics(group="g", consumer="c", handled=3, group_recreated=1)
    )


def test_consumer_statistics_fields_are_the_counters_after_group_consumer_and_topic() -> None:
    names = [f.name for f in attrs.fields(ConsumerStatistics)]
    counters = [f.name for f in attrs.fields(ConsumerCounters)]
    assert names == ["group", "consumer", "topic", *counters]
    assert len(counters) == 12
    assert repr(ConsumerStatistics(group="g", consumer="c", topic="t")).startswith(
        "ConsumerStatistics(group='g', consumer='c', topic='t', handled=0,"
    )
