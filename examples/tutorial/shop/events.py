"""The events the shop's services exchange, and the topics that carry them."""

from __future__ import annotations

import attrs

from eventbus import Topic


@attrs.frozen
class OrderPlaced:
    order_id: str
    amount: int  # cents


@attrs.frozen
class InvoiceDue:
    order_id: str
    amount: int


# Durable topics are Redis Streams: events wait there until each group handled them.
orders = Topic("orders", OrderPlaced, durable=True)
invoices = Topic("invoices", InvoiceDue, durable=True)
