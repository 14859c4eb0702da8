"""The LMDB dataset on disk: a metadata record, one record per sample, resumable writing.

Keys: ``__meta__`` (JSON, see :class:`DatasetMeta`), ``sample:00000042`` (a record from
:mod:`diffrig.data.records`), ``name:<source file>`` (its sample index, for resuming).
The dataset counts as usable only once the writer has marked it ``complete``.
"""

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import lmdb

from diffrig.data.records import Sample, decode_sample, encode_sample
from diffrig.errors import DataError

SCHEMA = "diffrig.lmdb/1"
META_KEY = b"__meta__"
MAP_SIZE = 1 << 40  # address space only: LMDB files grow with their content


@dataclass
class DatasetMeta:
    """What a reader needs to trust a dataset, and what a resumed writer must match."""

    image_size: int
    asset_fingerprint: str
    codes_layout: dict  # {"shape": 100, "tex": 50, ...} in storage order
    settings: dict = field(default_factory=dict)  # the options the data were made with
    count: int = 0
    complete: bool = False
    schema: str = SCHEMA

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "DatasetMeta":
        return cls(**json.loads(data))


def sample_key(index: int) -> bytes:
    return b"sample:%08d" % index


def _name_key(name: str) -> bytes:
    return b"name:" + name.encode("utf-8")


def _open(path: Path, readonly: bool) -> lmdb.Environment:
    try:
        return lmdb.open(str(path), map_size=MAP_SIZE, readonly=readonly, lock=not readonly,
                         readahead=False, meminit=False, max_readers=1024)
    except lmdb.Error as error:
        if "already open" in str(error):
            raise DataError(f"{path} is open for reading in this process: close its readers and datasets "
                            "before writing to it") from None
        raise DataError(f"{path} is not a readable LMDB dataset ({error}); it may be corrupt or truncated: "
                        "re-create it with scripts/create_data.py") from None


# LMDB refuses a second handle on one file within a process: readers of a file share one
# environment, counted, per process (a forked worker opens its own).
_SHARED: dict[tuple[str, int], list] = {}  # (real path, pid) -> [environment, readers]


def _open_shared(path: Path) -> lmdb.Environment:
    key = (os.path.realpath(path), os.getpid())
    if key not in _SHARED:
        _SHARED[key] = [_open(path, readonly=True), 0]
    _SHARED[key][1] += 1
    return _SHARED[key][0]


def _release_shared(path: Path, env: lmdb.Environment) -> None:
    key = (os.path.realpath(path), os.getpid())
    entry = _SHARED.get(key)
    if entry is None or entry[0] is not env:
        return
    entry[1] -= 1
    if entry[1] == 0:
        del _SHARED[key]
        env.close()


class RecordWriter:
    """Appends samples to a (possibly partly written) dataset. Re-opening a dataset made with the
    same settings continues it; other settings are refused rather than mixed."""

    def __init__(self, path, meta: DatasetMeta):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.env = _open(self.path, readonly=False)
        with self.env.begin() as txn:
            stored = txn.get(META_KEY)
        if stored is None:
            self.meta = meta
            self._put_meta()
            return
        self.meta = DatasetMeta.from_bytes(stored)
        mine = (meta.schema, meta.image_size, meta.asset_fingerprint, meta.codes_layout, meta.settings)
        theirs = (self.meta.schema, self.meta.image_size, self.meta.asset_fingerprint,
                  self.meta.codes_layout, self.meta.settings)
        if mine != theirs:
            raise DataError(f"{self.path} holds a dataset made with other settings; choose another output "
                            "folder or delete it to start over")

    @property
    def count(self) -> int:
        return self.meta.count

    def has(self, name: str) -> bool:
        with self.env.begin() as txn:
            return txn.get(_name_key(name)) is not None

    def append(self, samples: list[Sample]) -> None:
        """Encodes and writes the samples and the new count in one transaction."""
        self.append_encoded([(sample.name, encode_sample(sample)) for sample in samples])

    def append_encoded(self, records: list[tuple[str, bytes]]) -> None:
        """Writes ``(name, encode_sample bytes)`` records and the new count in one transaction: a
        crash keeps all or none of them."""
        count = self.meta.count
        with self._writing() as txn:
            for name, data in records:
                txn.put(sample_key(count), data)
                txn.put(_name_key(name), str(count).encode())
                count += 1
            txn.put(META_KEY, replace(self.meta, count=count).to_bytes())
        self.meta.count = count

    def finish(self) -> None:
        self._put_meta(complete=True)
        try:
            self.env.sync(True)
        except lmdb.Error as error:
            raise self._write_failed(error) from None

    def _put_meta(self, **changes) -> None:
        meta = replace(self.meta, **changes)
        with self._writing() as txn:
            txn.put(META_KEY, meta.to_bytes())
        self.meta = meta

    @contextlib.contextmanager
    def _writing(self):
        """A write transaction whose failure (a full disk, mostly) becomes a :class:`DataError`;
        LMDB keeps the last committed state, so nothing written before is lost."""
        try:
            with self.env.begin(write=True) as txn:
                yield txn
        except lmdb.Error as error:
            raise self._write_failed(error) from None

    def _write_failed(self, error: lmdb.Error) -> DataError:
        return DataError(f"writing to {self.path} failed ({error}); is the disk full? The {self.meta.count} "
                         "samples written before are kept: free some space and run the same command again "
                         "to continue")

    def close(self) -> None:
        self.env.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RecordReader:
    """Random access to a complete dataset. Readers of one file in one process share its LMDB
    handle; a forked process opens its own (handles do not survive fork)."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_dir() or not (self.path / "data.mdb").is_file():
            raise DataError(f"{self.path} is not an LMDB dataset folder; make one with scripts/create_data.py")
        self.env = _open_shared(self.path)
        self.pid = os.getpid()
        try:
            self.meta = self._checked_meta()
        except BaseException:
            self.close()
            raise

    def _checked_meta(self) -> DatasetMeta:
        # A truncated file would crash the process (SIGBUS) on the first read of a missing page.
        needed = (self.env.info()["last_pgno"] + 1) * self.env.stat()["psize"]
        if (self.path / "data.mdb").stat().st_size < needed:
            raise DataError(f"{self.path} is truncated (data.mdb is shorter than its own index says); "
                            "re-create it with scripts/create_data.py")
        try:
            with self.env.begin() as txn:
                stored = txn.get(META_KEY)
                official = stored is None and txn.get(b"length") is not None
        except lmdb.Error as error:
            raise DataError(f"{self.path} is corrupt or truncated ({error}); re-create it with "
                            "scripts/create_data.py") from None
        if official:
            raise DataError(f"{self.path} is in the official DiffusionRig format (pickled tensors), which "
                            "diffrig does not unpickle; re-create it with scripts/create_data.py")
        if stored is None:
            raise DataError(f"{self.path} has no diffrig metadata; re-create it with scripts/create_data.py")
        meta = DatasetMeta.from_bytes(stored)
        if meta.schema != SCHEMA:
            raise DataError(f"{self.path} has schema {meta.schema!r}; this diffrig reads {SCHEMA!r}")
        if not meta.complete:
            raise DataError(f"{self.path} was not finished ({meta.count} samples so far); re-run "
                            "scripts/create_data.py with the same arguments to complete it")
        return meta

    def __len__(self) -> int:
        return self.meta.count

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.meta.count:
            raise IndexError(index)
        try:
            with self.env.begin(buffers=False) as txn:
                data = txn.get(sample_key(index))
        except lmdb.Error as error:
            raise DataError(f"{self.path}: reading sample {index} failed ({error}); the dataset is corrupt") from None
        if data is None:
            raise DataError(f"{self.path} lacks sample {index}; the dataset is truncated: re-create it")
        return decode_sample(data, where=f"{self.path} sample {index}")

    def close(self) -> None:
        """Release this reader's handle (the file closes when no reader of it is left in the process)."""
        if self.env is not None:
            _release_shared(self.path, self.env)
            self.env = None
