"""Drives `projector registry` with Confluent's own SchemaRegistryClient, unmodified.

Exits non-zero with a message on the first call whose answer is not what a
Confluent Schema Registry would give. Usage: registry_check.py URL
"""

import json
import sys

from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

V1 = {"type": "record", "name": "Thing", "namespace": "check",
      "fields": [{"name": "id", "type": "string"}]}
V2 = {"type": "record", "name": "Thing", "namespace": "check",
      "fields": [{"name": "id", "type": "string"}, {"name": "n", "type": "int", "default": 0}]}
BREAKING = {"type": "record", "name": "Thing", "namespace": "check",
            "fields": [{"name": "id", "type": "string"}, {"name": "m", "type": "int"}]}
SUBJECT = "things-check.Thing"


def expect(condition, what):
    if not condition:
        sys.exit(f"registry_check: {what}")


def main():
    client = SchemaRegistryClient({"url": sys.argv[1]})
    id1 = client.register_schema(SUBJECT, Schema(json.dumps(V1), "AVRO"))
    id2 = client.register_schema(SUBJECT, Schema(json.dumps(V2), "AVRO"))
    expect(id1 != id2, f"two schemas got one id {id1}")
    expect(client.register_schema(SUBJECT, Schema(json.dumps(V1), "AVRO")) == id1,
           "registering an existing schema returns its id")
    expect(client.get_subjects() == [SUBJECT], f"subjects: {client.get_subjects()}")
    expect(client.get_versions(SUBJECT) == [1, 2], f"versions: {client.get_versions(SUBJECT)}")
    latest = client.get_latest_version(SUBJECT)
    expect((latest.version, latest.schema_id) == (2, id2), f"latest: {latest}")
    expect(json.loads(latest.schema.schema_str) == V2, "latest schema text")
    first = client.get_version(SUBJECT, 1)
    expect(first.schema_id == id1, f"version 1: {first}")
    fresh = SchemaRegistryClient({"url": sys.argv[1]})
    expect(json.loads(fresh.get_schema(id1).schema_str) == V1, "schema by id")
    found = fresh.lookup_schema(SUBJECT, Schema(json.dumps(V2), "AVRO"))
    expect((found.version, found.schema_id) == (2, id2), f"lookup: {found}")

    expect(client.get_compatibility() == "BACKWARD", "default compatibility is BACKWARD")
    try:
        client.register_schema(SUBJECT, Schema(json.dumps(BREAKING), "AVRO"))
        sys.exit("registry_check: an incompatible schema was accepted")
    except SchemaRegistryError as e:
        expect(e.http_status_code == 409 and e.error_code == 409, f"incompatible: {e}")
    client.set_compatibility(SUBJECT, "NONE")
    expect(client.get_compatibility(SUBJECT) == "NONE", "subject compatibility")
    client.register_schema(SUBJECT, Schema(json.dumps(BREAKING), "AVRO"))

    for call, code in [(lambda: fresh.get_schema(424242), 40403),
                       (lambda: fresh.get_versions("no-such-subject"), 40401),
                       (lambda: fresh.get_version(SUBJECT, 99), 40402)]:
        try:
            call()
            sys.exit(f"registry_check: expected error {code}")
        except SchemaRegistryError as e:
            expect(e.error_code == code and e.http_status_code == 404, f"expected {code}: {e}")
    print("registry_check: ok")


if __name__ == "__main__":
    main()
