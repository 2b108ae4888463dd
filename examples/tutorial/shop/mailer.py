"""The mailer service: a member of group "mailer" on `invoices`.

Run it:  python -m eventbus run shop.mailer:bus
"""

from __future__ import annotations

import logging

from eventbus import Delivery, EventBus

from .events import InvoiceDue, invoices

log = logging.getLogger("shop.mailer")

bus = EventBus()


@bus.on(invoices, group="mailer", concurrency=4)
async def send(invoice: InvoiceDue, delivery: Delivery) -> None:
    log.info("mailed invoice for %s: %.2f", invoice.order_id, invoice.amount / 100)
