"""Durable topics: Redis Streams with consumer groups (see ``docs/architecture.md``)."""

__all__: list[str] = []
