"""Read back what the trackers wrote, with each tracker's own formats and readers.

W&B 0.19+ writes offline runs through its Go core and no longer ships a Python reader of the `.wandb`
transaction log (its `datastore` module is gone, and `wandb sync` has no --view). The file is
LevelDB's log format (32 KiB blocks of CRC + length + type framed chunks) behind a 7-byte W&B header,
and each record is W&B's own `wandb_internal_pb2.Record` protobuf: `read_wandb` decodes it with that.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1, f"{path}: not a W&B transaction log"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # the block's tail is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
            continue
        if kind in (FULL, FIRST):
            pending = chunk
        else:
            pending += chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def read_wandb(run_folder: Path) -> dict:
    """{"run_id", "project", "name", "tags", "config": {...}, "history": [{key: value}], "summary": {...}}."""
    (log,) = Path(run_folder).glob("run-*.wandb")
    out = {"config": {}, "history": [], "summary": {}, "tags": []}
    for r in wandb_records(log):
        which = r.WhichOneof("record_type")
        if which == "run":
            out.update(run_id=r.run.run_id, project=r.run.project, name=r.run.display_name, tags=list(r.run.tags))
            for item in r.run.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif which == "config":
            for item in r.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif which == "history":
            row = {}
            for item in r.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            out["history"].append(row)
        elif which == "summary":
            for item in r.summary.update:
                out["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out


def read_tensorboard(folder: Path) -> dict:
    """{"scalars": {tag: [(step, value)]}, "text": {tag: str}} through TensorBoard's EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags["scalars"]}
    text = {t: acc.Tensors(t)[0].tensor_proto.string_val[0].decode() for t in tags["tensors"]}
    return {"scalars": scalars, "text": text}
