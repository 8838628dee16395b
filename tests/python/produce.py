"""Produces events to Kafka with Confluent's own client, the way a real service would.

Reads JSON lines from --events. Each line is one record:
  {"topic": "orders", "key": "o-1", "type": "OrderPlaced", "value": {...}}
serialized with AvroSerializer (TopicRecordNameStrategy, auto-register, the schema
from --schemas <namespace>/<type>.v<N>.avsc, newest N unless "version" is given).
"namespace" overrides --namespace for one record; "schema_file" serializes with that schema file instead (a variant of a version).
"headers": {"k": "v"} adds record headers; "timestamp": ms sets the record's timestamp.
Corruptions for poison tests, applied to the serialized bytes:
  "raw_hex": "..."        write these bytes instead (no serializer)
  "null_value": true      a tombstone
  "truncate": N           drop the last N bytes
  "append_hex": "..."     add these bytes at the end
  "schema_id": N          rewrite the frame's schema id
  "schema_id_of": "Type"  rewrite it to the id another type was serialized with
  "corrupt": "text"       overwrite these UTF-8 bytes with invalid UTF-8
  "body_hex": "..."       keep the frame (magic byte, schema id), replace the Avro body
  "append_zeros": N       add N zero bytes at the end (an oversized value)
--record FILE writes what was produced (key, value and headers in hex), a line each.
--flush-each sends one record per batch.
--repeat-for SECONDS cycles through the records until that long has passed (with
--rate, a steady stream for a live benchmark; record timestamps are the send time).
--hold-until FILE serializes everything first (registering schemas), prints
"serialized", and sends only once FILE exists.
--transactional ID produces in transactions with that transactional.id: records
that carry the same "txn" number (consecutive) go in one transaction, which is
aborted when any of them says "abort": true and committed otherwise.
Prints one JSON line at the end: {"produced": N}.
"""

import argparse
import glob
import json
import os
import struct
import sys
import time

from confluent_kafka import Producer
from confluent_kafka.schema_registry import SchemaRegistryClient, topic_record_subject_name_strategy
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext


def schema_file(schemas_dir, namespace, event_type, version):
    pattern = os.path.join(schemas_dir, namespace, f"{event_type}.v*.avsc")
    files = glob.glob(pattern)
    if version is not None:
        files = [f for f in files if f.endswith(f".v{version}.avsc")]
    if not files:
        sys.exit(f"produce.py: no schema for {namespace}.{event_type} v{version} under {schemas_dir}")
    return max(files, key=lambda f: int(f.rsplit(".v", 1)[1].split(".")[0]))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--brokers", required=True)
    parser.add_argument("--registry", required=True)
    parser.add_argument("--schemas", required=True)
    parser.add_argument("--events", required=True)
    parser.add_argument("--namespace", default="shop.orders")
    parser.add_argument("--rate", type=float, default=0, help="events per second; 0 = as fast as possible")
    parser.add_argument("--record")
    parser.add_argument("--hold-until")
    parser.add_argument("--repeat-for", type=float, default=0)
    parser.add_argument("--transactional")
    parser.add_argument("--flush-each", action="store_true",
                        help="one record per batch (Tansu reports a multi-record last batch's high watermark short)")
    args = parser.parse_args()

    registry = SchemaRegistryClient({"url": args.registry})
    serializers = {}
    producer_config = {
        "bootstrap.servers": args.brokers,
        "linger.ms": 5,
        "enable.idempotence": False,
        "acks": "all",
        "message.max.bytes": 32 * 1024 * 1024,
    }
    if args.transactional:
        producer_config.update({"transactional.id": args.transactional, "enable.idempotence": True})
    producer = Producer(producer_config)
    failures = []

    def delivered(err, _msg):
        if err is not None:
            failures.append(str(err))

    def serializer(namespace, event_type, version, schema_path=None):
        cache_key = (namespace, event_type, version, schema_path)
        if cache_key not in serializers:
            path = schema_path or schema_file(args.schemas, namespace, event_type, version)
            with open(path) as f:
                schema = f.read()
            serializers[cache_key] = AvroSerializer(registry, schema, conf={
                "auto.register.schemas": True,
                "use.latest.version": False,
                "subject.name.strategy": topic_record_subject_name_strategy,
            })
        return serializers[cache_key]

    schema_ids = {}
    records = []
    transactions = []
    with open(args.events) as lines:
        for line in lines:
            record = json.loads(line)
            topic = record["topic"]
            key = record["key"].encode() if record.get("key") is not None else None
            if "raw_hex" in record:
                value = bytes.fromhex(record["raw_hex"])
            elif record.get("null_value"):
                value = None
            else:
                namespace = record.get("namespace", args.namespace)
                ser = serializer(namespace, record["type"], record.get("version"), record.get("schema_file"))
                value = ser(record["value"], SerializationContext(topic, MessageField.VALUE))
                schema_ids.setdefault(record["type"], value[1:5])
                if "schema_id" in record:
                    value = value[:1] + struct.pack(">I", record["schema_id"]) + value[5:]
                if "schema_id_of" in record:
                    value = value[:1] + schema_ids[record["schema_id_of"]] + value[5:]
                if "corrupt" in record:
                    text = record["corrupt"].encode()
                    assert text in value, "corrupt: text not in the serialized value"
                    value = value.replace(text, bytes([0xFF, 0xFE] * (len(text) // 2) + [0xFF] * (len(text) % 2)))
                if "truncate" in record:
                    value = value[: len(value) - record["truncate"]]
                if "append_hex" in record:
                    value = value + bytes.fromhex(record["append_hex"])
                if "body_hex" in record:
                    value = value[:5] + bytes.fromhex(record["body_hex"])
                if "append_zeros" in record:
                    value = value + bytes(record["append_zeros"])
            headers = [(k, v.encode()) for k, v in record.get("headers", {}).items()]
            records.append((topic, key, value, headers, record.get("timestamp")))
            transactions.append((record.get("txn"), bool(record.get("abort"))))

    if args.transactional:
        produce_in_transactions(producer, records, transactions)
        print(json.dumps({"produced": len(records)}))
        return

    if args.hold_until:
        print("serialized", flush=True)
        while not os.path.exists(args.hold_until):
            time.sleep(0.05)

    record_file = open(args.record, "w") if args.record else None
    produced = 0
    started = time.monotonic()
    def stream():
        while True:
            yield from records
            if time.monotonic() - started >= args.repeat_for:
                return

    for topic, key, value, headers, timestamp in stream():
        if args.repeat_for and time.monotonic() - started >= args.repeat_for:
            break
        while True:
            try:
                extra = {"timestamp": timestamp} if timestamp is not None else {}
                producer.produce(topic, key=key, value=value, headers=headers or None, on_delivery=delivered, **extra)
                break
            except BufferError:
                producer.poll(0.05)
        if record_file:
            record_file.write(json.dumps({
                "topic": topic,
                "key_hex": key.hex() if key is not None else None,
                "value_hex": value.hex() if value is not None else None,
                "headers": [[k, v.hex()] for k, v in headers],
            }) + "\n")
        produced += 1
        producer.poll(0)
        if args.flush_each:
            producer.flush(30)
        if args.rate > 0:
            ahead = produced / args.rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
    if record_file:
        record_file.close()
    remaining = producer.flush(60)
    if remaining or failures:
        sys.exit(f"produce.py: {remaining} undelivered, failures: {failures[:5]}")
    print(json.dumps({"produced": produced}))


def produce_in_transactions(producer, records, transactions):
    """Sends consecutive records with the same txn number in one transaction;
    aborts it when any of them asks to."""
    producer.init_transactions(30)
    index = 0
    while index < len(records):
        txn = transactions[index][0]
        end = index
        while end < len(records) and transactions[end][0] == txn:
            end += 1
        producer.begin_transaction()
        for topic, key, value, headers, timestamp in records[index:end]:
            extra = {"timestamp": timestamp} if timestamp is not None else {}
            producer.produce(topic, key=key, value=value, headers=headers or None, **extra)
        if any(abort for _, abort in transactions[index:end]):
            producer.abort_transaction(30)
        else:
            producer.commit_transaction(30)
        index = end


if __name__ == "__main__":
    main()
