"""Writes a stream of demo order events as JSON lines for produce.py (stdout)."""

import argparse
import json
import random


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--orders", type=int, default=1000)
    parser.add_argument("--topic", default="orders")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    pending = []
    for i in range(args.orders):
        order_id = f"order-{i:06d}"
        at = 1_700_000_000_000 + i * 1000
        items = [{"sku": f"sku-{n}", "qty": rng.randint(1, 4), "priceCents": rng.randint(100, 9999)}
                 for n in range(rng.randint(1, 3))]
        total = sum(item["qty"] * item["priceCents"] for item in items)
        events = [
            ("OrderPlaced", {"orderId": order_id, "customerId": f"customer-{rng.randint(0, 99)}",
                             "items": items, "totalCents": total, "currency": "EUR", "placedAt": at}),
            ("PaymentCharged", {"orderId": order_id, "amountCents": total, "card": "visa"}),
        ]
        if rng.random() < 0.8:
            events.append(("OrderShipped", {"orderId": order_id, "trackingId": f"T-{i}", "shippedAt": at + 60_000}))
            events.append(("OrderDelivered", {"orderId": order_id, "deliveredAt": at + 86_400_000}))
        else:
            events.append(("OrderCancelled", {"orderId": order_id, "reason": "changed mind", "cancelledAt": at + 1000}))
        pending.append([order_id, list(reversed(events))])
    while pending:
        index = rng.randrange(len(pending))
        order_id, events = pending[index]
        event_type, value = events.pop()
        print(json.dumps({"topic": args.topic, "key": order_id, "type": event_type, "value": value}))
        if not events:
            pending[index] = pending[-1]
            pending.pop()


if __name__ == "__main__":
    main()
