"""Produces events in the shapes Kafka shops write, with Confluent's own client.

Reads JSON lines from --events, one record each:
  {"topic": "t", "key": ..., "type": "shop.orders.OrderPlaced", "value": {...}}
--values decides how values are serialized (AvroSerializer in every case):
  records     one schema per type, TopicRecordNameStrategy (--schema NAME=FILE each)
  inline      one union of every --schema under the topic's subject (TopicNameStrategy,
              Confluent's default): the records' schemas inlined in the union
  references  the same union, as Confluent schema references: each record schema
              registered under its own full name, the union of references under
              `<topic>-value`; the serializer uses that latest version
--key-schema FILE serializes keys with AvroSerializer under `<topic>-key` (a
record's "key" is then the key's value); otherwise a key is UTF-8 text.
Logical types are given in their JSON meaning and converted for fastavro: decimal
as a string ("12.34"), date as "2026-01-21", time-millis as "13:45:00.250", bytes
as base64.
Prints {"produced": N}.
"""

import argparse
import base64
import datetime
import decimal
import json
import sys

from confluent_kafka import Producer
from confluent_kafka.schema_registry import (
    Schema,
    SchemaReference,
    SchemaRegistryClient,
    topic_record_subject_name_strategy,
)
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext


def full_name(schema):
    name = schema["name"]
    return name if "." in name else f"{schema.get('namespace', '')}.{name}".lstrip(".")


def convert(value, schema, named):
    """A JSON value in its meaning as fastavro wants it for `schema`."""
    if isinstance(schema, str):
        schema = named.get(schema, schema)
    if isinstance(schema, list):
        if value is None:
            return None
        branches = [b for b in schema if b != "null"]
        return convert(value, branches[0], named) if len(branches) == 1 else value
    if not isinstance(schema, dict):
        return base64.b64decode(value) if schema == "bytes" else value
    logical = schema.get("logicalType")
    kind = schema["type"]
    if logical == "decimal":
        return decimal.Decimal(value)
    if logical == "date":
        return datetime.date.fromisoformat(value)
    if logical == "time-millis":
        return datetime.time.fromisoformat(value)
    if kind == "record":
        named[full_name(schema)] = schema
        # Fields the value leaves out take their defaults in fastavro.
        return {f["name"]: convert(value[f["name"]], f["type"], named) for f in schema["fields"] if f["name"] in value}
    if kind == "array":
        return [convert(v, schema["items"], named) for v in value]
    if kind in ("bytes", "fixed"):
        return base64.b64decode(value)
    if isinstance(kind, (dict, list)):
        return convert(value, kind, named)
    return value


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--brokers", required=True)
    parser.add_argument("--registry", required=True)
    parser.add_argument("--events", required=True)
    parser.add_argument("--values", choices=["records", "inline", "references"], required=True)
    parser.add_argument("--schema", action="append", default=[], help="NAME=FILE")
    parser.add_argument("--key-schema")
    args = parser.parse_args()

    registry = SchemaRegistryClient({"url": args.registry})
    texts = {}
    for entry in args.schema:
        name, path = entry.split("=", 1)
        with open(path) as f:
            texts[name] = f.read()
    schemas = {name: json.loads(text) for name, text in texts.items()}

    serializers = {}
    if args.values == "records":
        for name, text in texts.items():
            serializers[name] = AvroSerializer(registry, text, conf={
                "auto.register.schemas": True,
                "subject.name.strategy": topic_record_subject_name_strategy,
            })
    elif args.values == "inline":
        union = "[" + ", ".join(texts[name] for name in texts) + "]"
        union_serializer = AvroSerializer(registry, union, conf={"auto.register.schemas": True})
    else:
        references = []
        for name, text in texts.items():
            registry.register_schema(name, Schema(text, "AVRO"))
            version = registry.get_latest_version(name).version
            references.append(SchemaReference(name, name, version))
        union = json.dumps(list(texts))
        topics = set()
        with open(args.events) as lines:
            for line in lines:
                topics.add(json.loads(line)["topic"])
        for topic in topics:
            registry.register_schema(f"{topic}-value", Schema(union, "AVRO", references))
        union_serializer = AvroSerializer(registry, None, conf={
            "auto.register.schemas": False,
            "use.latest.version": True,
        })

    key_serializer = None
    key_schema = None
    if args.key_schema:
        with open(args.key_schema) as f:
            key_text = f.read()
        key_schema = json.loads(key_text)
        key_serializer = AvroSerializer(registry, key_text, conf={"auto.register.schemas": True})

    producer = Producer({"bootstrap.servers": args.brokers, "linger.ms": 5, "enable.idempotence": False})
    failures = []

    def delivered(err, _msg):
        if err is not None:
            failures.append(str(err))

    produced = 0
    with open(args.events) as lines:
        for line in lines:
            record = json.loads(line)
            topic = record["topic"]
            name = record["type"]
            value = convert(record["value"], schemas[name], {})
            context = SerializationContext(topic, MessageField.VALUE)
            if args.values == "records":
                data = serializers[name](value, context)
            else:
                # fastavro's tuple notation names the union branch.
                data = union_serializer((name, value), context)
            key = record.get("key")
            if key_serializer is not None:
                key = key_serializer(convert(key, key_schema, {}), SerializationContext(topic, MessageField.KEY))
            elif key is not None:
                key = key.encode()
            while True:
                try:
                    producer.produce(topic, key=key, value=data, on_delivery=delivered)
                    break
                except BufferError:
                    producer.poll(0.05)
            produced += 1
            producer.poll(0)
    remaining = producer.flush(60)
    if remaining or failures:
        sys.exit(f"produce_shapes.py: {remaining} undelivered, failures: {failures[:5]}")
    print(json.dumps({"produced": produced}))


if __name__ == "__main__":
    main()
