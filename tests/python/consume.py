"""Reads a topic from the beginning with Confluent's consumer and prints each record
as a JSON line (partition, offset, key, value and headers in hex), until --count
records were read or --timeout seconds passed. Usage: consume.py BROKERS TOPIC"""

import argparse
import json
import time
import uuid

from confluent_kafka import Consumer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("brokers")
    parser.add_argument("topic")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=60)
    args = parser.parse_args()
    consumer = Consumer({
        "bootstrap.servers": args.brokers,
        "group.id": f"consume-py-{uuid.uuid4()}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 500,
    })
    consumer.subscribe([args.topic])
    seen = 0
    deadline = time.monotonic() + args.timeout
    while seen < args.count and time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is None or message.error():
            continue
        print(json.dumps({
            "partition": message.partition(),
            "offset": message.offset(),
            "key_hex": message.key().hex() if message.key() is not None else None,
            "value_hex": message.value().hex() if message.value() is not None else None,
            "headers": [[k, (v or b"").hex()] for k, v in (message.headers() or [])],
        }), flush=True)
        seen += 1
    consumer.close()


if __name__ == "__main__":
    main()
