"""Reads a W&B run file (`run-<id>.wandb`) without wandb's own reader (it has none in Python).

The file is a LevelDB log: a 7-byte header (":W&B", magic 0xBEE1, version), then 32 KiB blocks
of chunks, each `crc32 (4) | length (2, little-endian) | type (1: full, 2: first, 3: middle,
4: last) | payload`; a block tail shorter than a chunk header is zero padding. The payloads
are `wandb_internal_pb2.Record` protobufs.
"""
import struct

BLOCK = 32768
HEADER = 7


def records(path):
    from wandb.proto import wandb_internal_pb2
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        payload = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0:  # preallocated, never written
            break
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
