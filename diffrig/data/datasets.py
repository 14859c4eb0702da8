"""Training datasets over the LMDB records.

Both yield dicts with ``image`` float32 (3,H,W) in [-1,1], ``buffers`` float32 (9,H,W) in the
official order rendered|normal|albedo, and ``codes`` float32 (C,).

- :class:`LmdbDataset` (stage 1, FFHQ-sized): random access; each DataLoader worker opens its own
  LMDB environment on first use.
- :class:`AlbumDataset` (stage 2, ~20 photos): decoded once into memory.
- :class:`ShardedInfiniteSampler`: an endless stream of reshuffled epochs, each split across
  processes without duplicates (Accelerate's own dataloader sharding pads with repeats instead).
"""

import os

import torch
from torch.utils.data import Dataset, Sampler

from diffrig.data.lmdb_store import RecordReader
from diffrig.data.records import Sample


def training_item(sample: Sample) -> dict:
    return {
        "image": sample.image.float() / 127.5 - 1.0,
        "buffers": sample.buffers,
        "codes": sample.codes,
    }


class LmdbDataset(Dataset):
    def __init__(self, path):
        self.path = path
        reader = RecordReader(path)  # validate now, in the main process, for a clear early error
        self.meta = reader.meta
        reader.close()
        self._reader = None

    def __len__(self) -> int:
        return self.meta.count

    def __getitem__(self, index: int) -> dict:
        if self._reader is None or self._reader.pid != os.getpid():
            self._reader = RecordReader(self.path)
        return training_item(self._reader[index])

    def close(self) -> None:
        """Release this process's LMDB handle (LMDB allows one per file and process); reopened on use."""
        if self._reader is not None and self._reader.pid == os.getpid():
            self._reader.close()
        self._reader = None


class AlbumDataset(Dataset):
    def __init__(self, path):
        reader = RecordReader(path)
        self.meta = reader.meta
        self.items = [training_item(reader[i]) for i in range(len(reader))]
        reader.close()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


class ShardedInfiniteSampler(Sampler):
    """Indices for one process of ``num_processes``: epoch ``e`` is a permutation seeded by
    ``seed + e``; process ``r`` takes positions ``r, r + P, ...`` of it, all processes the same
    count (``len // P``, the remainder differs per epoch), so no index repeats within an epoch."""

    def __init__(self, length: int, process_index: int = 0, num_processes: int = 1, seed: int = 0,
                 shuffle: bool = True, start_epoch: int = 0):
        if length < num_processes:
            raise ValueError(f"{length} samples cannot feed {num_processes} processes")
        self.length, self.rank, self.world = length, process_index, num_processes
        self.seed, self.shuffle, self.epoch = seed, shuffle, start_epoch

    def epoch_indices(self, epoch: int) -> list[int]:
        if self.shuffle:
            order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            order = torch.arange(self.length)
        per_process = self.length // self.world
        return order[self.rank : per_process * self.world : self.world].tolist()

    def __iter__(self):
        while True:
            yield from self.epoch_indices(self.epoch)
            self.epoch += 1
