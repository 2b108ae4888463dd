"""Place a few orders: what the shop's web front would do, here as a script.

Run it:  python place_orders.py 3
"""

from __future__ import annotations

import sys

import anyio
from shop.events import OrderPlaced, orders

from eventbus import EventBus


async def main(count: int) -> None:
    async with EventBus() as bus:  # publish-only: no handlers declared
        for n in range(1, count + 1):
            receipt = await bus.publish(orders, OrderPlaced(f"o-{n}", 1000 * n))
            print(f"placed o-{n} as {receipt.stream_id}")  # returns once Redis stored it


if __name__ == "__main__":
    anyio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 3)
