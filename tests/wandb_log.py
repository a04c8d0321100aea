"""W&B's offline transaction log (``run-<id>.wandb``), read back for tests: records decoded with
wandb's own protobuf schema (``wandb.proto.wandb_internal_pb2.Record``)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any

# The log is LevelDB's log format: 32 KiB blocks of chunks, each with a 7-byte header
# (CRC-32 of type + data, length, type); a 7-byte file header (":W&B", magic 0xBEE1, version).
_BLOCK, _HEADER = 32 * 1024, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> list[Any]:
    """Every record of one ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:_HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (ident, magic, version)
    records, pending, pos = [], b"", _HEADER
    while pos + _HEADER <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _HEADER:  # block trailer: zero padding
            pos += left_in_block
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        if kind == 0 and length == 0:  # preallocated, unwritten tail
            break
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == checksum
        pos += _HEADER + length
        pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_key(item: Any) -> str:
    """The item's key (wandb writes ``key`` or ``nested_key``)."""
    return item.key or "/".join(item.nested_key)


def record_items(records: list[Any], kind: str) -> dict[str, Any]:
    """The items of every ``kind`` record ("history", "summary", "config"), merged in order;
    a media value (table, image) is split over nested keys ``[name, field]`` and rebuilt here."""
    import json

    merged: dict[str, Any] = {}
    for record in records:
        if record.WhichOneof("record_type") != kind:
            continue
        body = getattr(record, kind)
        for item in body.item if kind == "history" else body.update:
            path = [item.key] if item.key else list(item.nested_key)
            node = merged
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = json.loads(item.value_json)
    return merged


def settled_records(path: Path, record_type: str = "run", timeout: float = 30.0) -> list[Any]:
    """The file's records once it holds a ``record_type`` record. W&B's service process writes
    the offline file on its own schedule, so a reader right after ``run.finish()`` can find it
    short (or mid-chunk); the test waits for it, as ``wandb sync`` would."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            records = wandb_records(path)
            if any(r.WhichOneof("record_type") == record_type for r in records):
                return records
        except (AssertionError, struct.error):
            pass
        if time.monotonic() > deadline:
            return wandb_records(path)
        time.sleep(0.2)
