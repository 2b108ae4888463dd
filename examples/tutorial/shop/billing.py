"""The billing service: a member of group "billing" on `orders`, publishing to `invoices`.

Run it:  python -m eventbus run shop.billing:bus
"""

from __future__ import annotations

import logging

from eventbus import Delivery, EventBus

from .events import InvoiceDue, OrderPlaced, invoices, orders

log = logging.getLogger("shop.billing")

bus = EventBus()  # the URL comes from $EVENTBUS_URL (else redis://localhost:6379/0)


@bus.on(orders, group="billing", publish_to=invoices)
async def bill(order: OrderPlaced, delivery: Delivery) -> InvoiceDue:
    # At least once: after a crash this may run again for the same delivery.id.
    log.info("billing order %s (attempt %d)", order.order_id, delivery.attempt)
    return InvoiceDue(order.order_id, order.amount)  # published with the ack, atomically
