"""Preprocessed-slice cache in ArrayRecord shards: decode DICOM once, read records every epoch.

``write_cache(source, directory, fingerprint=...)`` stores every record of a
random-access source (dicts of numpy arrays, ints and strings: the slice index's
records) as ``.npz`` bytes in ArrayRecord shards, with a ``cache.json`` that
says how many records there are and which preprocessing made them.
``CachedRecords(directory)`` is a random-access source over them (Grain's
``ArrayRecordDataSource``), a drop-in replacement for the source it was built from.

A cache whose fingerprint differs from the requested preprocessing is refused,
so a changed intensity window or slice axis never reads stale data.

Shards are written by ``workers`` processes (each decodes its own run of volumes), appear
under their name only once complete, and ``cache.partial.json`` says which preprocessing
they hold: an interrupted write, run again, keeps the finished shards and writes the rest.
"""

from __future__ import annotations

import io
import json
import os

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from medjax.data.build_runner import Progress, run_items

_META = "cache.json"
_PARTIAL = "cache.partial.json"  # what an unfinished write's shards hold (see module)


def encode_record(record: dict) -> bytes:
    """A record dict -> npz bytes (no pickle: strings become numpy unicode scalars)."""
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v) for k, v in record.items()})
    return buffer.getvalue()


def decode_record(data: bytes, fields: tuple[str, ...] | None = None) -> dict:
    """npz bytes -> a record dict; ``fields``: only those entries (the others are not even decompressed)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        out = {}
        for key in npz.files if fields is None else fields:
            value = npz[key]
            if value.ndim == 0:  # scalars back to Python ints / floats / strings
                value = value.item()
            out[key] = value
    return out


class _ShardWriter:
    """Writes shard i (records i * per_shard ...) of ``source``; picklable, so a worker process runs it."""

    def __init__(self, source, directory: str, per_shard: int):
        self.source, self.directory, self.per_shard = source, directory, per_shard

    def __call__(self, shard: int) -> int:
        path = os.path.join(self.directory, _shard_name(shard))
        writer = ArrayRecordWriter(path + ".tmp", "group_size:1")
        end = min((shard + 1) * self.per_shard, len(self.source))
        for i in range(shard * self.per_shard, end):
            writer.write(encode_record(self.source[i]))
        writer.close()
        os.replace(path + ".tmp", path)  # complete, or not there under its name
        return end - shard * self.per_shard


def _shard_name(shard: int) -> str:
    return f"records-{shard:05d}.array_record"


def write_cache(source, directory: str, *, fingerprint: dict, records_per_shard: int = 2048,
                say=None, workers: int = 0) -> str:
    """Writes every record of ``source`` into ``directory`` (see module); returns the directory.

    ``workers``: processes writing shards (-1 = one per CPU core, 0 or 1 = this process); ``source``
    must then pickle (the slice index does, without its decoded volumes)."""
    os.makedirs(directory, exist_ok=True)
    n = len(source)
    shards = [_shard_name(k) for k in range((n + records_per_shard - 1) // records_per_shard)]
    plan = json.loads(json.dumps({"num_records": n, "records_per_shard": records_per_shard,
                                  "fingerprint": fingerprint}))
    partial = os.path.join(directory, _PARTIAL)
    kept = []
    if os.path.exists(partial):
        with open(partial) as f:
            same = json.load(f) == plan
        kept = [k for k, name in enumerate(shards) if same and os.path.exists(os.path.join(directory, name))]
    if os.path.exists(os.path.join(directory, _META)):
        os.remove(os.path.join(directory, _META))  # a cache being rewritten is not valid until it is complete
    for name in os.listdir(directory):  # shards of other preprocessing, or half-written ones
        if name.startswith("records-") and (name not in shards or name.endswith(".tmp")
                                            or shards.index(name) not in kept):
            os.remove(os.path.join(directory, name))
    with open(partial, "w") as f:
        json.dump(plan, f, indent=2, sort_keys=True)
    if say and kept:
        say(f"cache: {len(kept)} of {len(shards)} shards in {directory} were written by an earlier run; "
            "writing the others")
    todo = [k for k in range(len(shards)) if k not in kept]
    progress = Progress("cache", "records", n, done=min(n, len(kept) * records_per_shard),
                        say=say or (lambda message: None))
    for _, count in run_items(_ShardWriter(source, directory, records_per_shard), todo, workers=workers):
        progress.tick(count)  # in records, not shards
    meta = {"num_records": n, "shards": shards, "fingerprint": fingerprint}
    with open(os.path.join(directory, _META), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    os.remove(partial)
    if say:
        say(f"cache: wrote {n} records in {len(shards)} shards to {directory}")
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
    """Random-access source over a written cache; records are decoded on access, only ``fields`` of them
    when given (pretraining reads the image alone: a third of the decoding time of a whole record)."""

    def __init__(self, directory: str, *, fingerprint: dict | None = None, fields: tuple[str, ...] | None = None):
        self.fields = fields
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
        return decode_record(self._source[index], self.fields)
