"""Preprocessed-slice cache in ArrayRecord shards: decode DICOM once, read records every epoch.

``write_cache(source, directory, fingerprint=...)`` stores every record of a
random-access source (dicts of numpy arrays, ints and strings: the slice index's
records) as ``.npz`` bytes in ArrayRecord shards, with a ``cache.json`` that
says how many records there are and which preprocessing made them.
``CachedRecords(directory)`` is a random-access source over them (Grain's
``ArrayRecordDataSource``), a drop-in replacement for the source it was built from.

A cache whose fingerprint differs from the requested preprocessing is refused,
so a changed intensity window or slice axis never reads stale data.
"""

from __future__ import annotations

import io
import json
import os

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

_META = "cache.json"


def encode_record(record: dict) -> bytes:
    """A record dict -> npz bytes (no pickle: strings become numpy unicode scalars)."""
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v) for k, v in record.items()})
    return buffer.getvalue()


def decode_record(data: bytes) -> dict:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        out = {}
        for key in npz.files:
            value = npz[key]
            if value.ndim == 0:  # scalars back to Python ints / floats / strings
                value = value.item()
            out[key] = value
    return out


def write_cache(source, directory: str, *, fingerprint: dict, records_per_shard: int = 2048,
                say=None) -> str:
    """Writes every record of ``source`` into ``directory``; returns the directory."""
    os.makedirs(directory, exist_ok=True)
    n = len(source)
    shards = []
    for start in range(0, n, records_per_shard):
        name = f"records-{len(shards):05d}.array_record"
        writer = ArrayRecordWriter(os.path.join(directory, name), "group_size:1")
        for i in range(start, min(start + records_per_shard, n)):
            writer.write(encode_record(source[i]))
        writer.close()
        shards.append(name)
        if say:
            say(f"cache: wrote {min(start + records_per_shard, n)}/{n} records to {directory}")
    meta = {"num_records": n, "shards": shards, "fingerprint": fingerprint}
    with open(os.path.join(directory, _META), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    return directory


def cache_is_valid(directory: str, fingerprint: dict) -> bool:
    """True if ``directory`` holds a complete cache made with the same preprocessing."""
    path = os.path.join(directory, _META)
    if not os.path.exists(path):
        return False
    with open(path) as f:
        meta = json.load(f)
    return meta.get("fingerprint") == json.loads(json.dumps(fingerprint))


class CachedRecords:
    """Random-access source over a written cache; records are decoded on access."""

    def __init__(self, directory: str, *, fingerprint: dict | None = None):
        path = os.path.join(directory, _META)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"No slice cache in {directory} ({_META} is missing); write it with "
                "medjax.data.cache.write_cache or set config.data.cache_dir to an empty folder."
            )
        with open(path) as f:
            self.meta = json.load(f)
        if fingerprint is not None and self.meta["fingerprint"] != json.loads(json.dumps(fingerprint)):
            raise ValueError(
                f"The slice cache in {directory} was made with different preprocessing "
                f"({self.meta['fingerprint']}); delete it or point config.data.cache_dir elsewhere."
            )
        paths = [os.path.join(directory, name) for name in self.meta["shards"]]
        self._source = grain.sources.ArrayRecordDataSource(paths)
        if len(self._source) != self.meta["num_records"]:
            raise ValueError(
                f"The slice cache in {directory} is incomplete ({len(self._source)} of "
                f"{self.meta['num_records']} records); delete it and write it again."
            )

    def __len__(self) -> int:
        return self.meta["num_records"]

    def __getitem__(self, index: int) -> dict:
        return decode_record(self._source[index])
