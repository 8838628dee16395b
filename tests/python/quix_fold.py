"""The peer in `make bench`: Quix Streams folding the bench's order events into
its RocksDB state, per order (the same fold as Projector's `order_summary`).

Decodes the Confluent-framed Avro with the writer schema from the registry
(Quix's AvroDeserializer delegating to Confluent's), keeps one state per order key,
and stops after --events messages. Prints one JSON line:
{"events": N, "seconds": S, "events_per_second": R}, timed from the first message
to the last (group join and start-up excluded).
"""

import argparse
import json
import tempfile
import time
import uuid

from quixstreams import Application
from quixstreams.models import SchemaRegistryClientConfig
from quixstreams.models.serializers.avro import AvroDeserializer

STATUS_BY_FIELD = {"amountCents": "paid", "trackingId": "shipped", "deliveredAt": "delivered", "reason": "cancelled"}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--brokers", required=True)
    parser.add_argument("--registry", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--events", type=int, required=True)
    args = parser.parse_args()

    app = Application(
        broker_address=args.brokers,
        consumer_group=f"quix-bench-{uuid.uuid4()}",
        auto_offset_reset="earliest",
        state_dir=tempfile.mkdtemp(prefix="quix-bench-"),
        # Projector needs no changelog topic (offsets are stored with state); the
        # peer runs without one too, which only makes it faster.
        use_changelog_topics=False,
        consumer_extra_config={"session.timeout.ms": 6000, "heartbeat.interval.ms": 500},
    )
    topic = app.topic(
        args.topic,
        key_deserializer="str",
        value_deserializer=AvroDeserializer(
            schema_registry_client_config=SchemaRegistryClientConfig(url=args.registry)
        ),
    )
    seen = {"count": 0, "first": None, "last": None}

    def fold(value, state):
        order = state.get("order")
        if "customerId" in value:
            total = value.get("totalCents")
            if total is None:
                total = round(value["total"] * 100)
            order = {
                "customer_id": value["customerId"],
                "status": "placed",
                "total_cents": total,
                "tracking_id": order["tracking_id"] if order else None,
                "version": (order["version"] if order else 0) + 1,
            }
        elif order is not None:
            for field, status in STATUS_BY_FIELD.items():
                if field in value:
                    order["status"] = status
            if "trackingId" in value:
                order["tracking_id"] = value["trackingId"]
            order["version"] += 1
        if order is not None:
            state.set("order", order)
        now = time.monotonic()
        if seen["first"] is None:
            seen["first"] = now
        seen["count"] += 1
        seen["last"] = now
        if seen["count"] >= args.events:
            app.stop()

    app.dataframe(topic).update(fold, stateful=True)
    app.run()
    seconds = max(seen["last"] - seen["first"], 1e-9) if seen["first"] else 0.0
    print(json.dumps({
        "events": seen["count"],
        "seconds": seconds,
        "events_per_second": (seen["count"] - 1) / seconds if seconds else 0.0,
    }))


if __name__ == "__main__":
    main()
