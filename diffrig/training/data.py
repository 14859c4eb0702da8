"""Training batches that can be resumed at any step.

Each process draws indices from its own shard of a :class:`ShardedInfiniteSampler` (reshuffled
epochs, no duplicates across processes). A step consumes a fixed number of indices per process, so
the data position after ``n`` steps is known from ``n`` alone: :class:`ResumableBatches` skips to it.
Large datasets are read by a DataLoader (workers decode the records); a small album lives on the
device once and batches are gathered there, with no per-step host work beyond the indices.
"""

from __future__ import annotations

import itertools
import signal
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from diffrig.data.datasets import AlbumDataset, LmdbDataset, ShardedInfiniteSampler
from diffrig.errors import DataError

TENSOR_KEYS = ("image", "buffers")


class ResumableBatches:
    """Lists of ``batch_size`` indices from ``sampler``, starting after the first ``consumed``
    indices this process has already trained on."""

    def __init__(self, sampler: ShardedInfiniteSampler, batch_size: int, consumed: int = 0):
        self.sampler, self.batch_size, self.consumed = sampler, batch_size, consumed

    def __iter__(self) -> Iterator[list[int]]:
        per_epoch = self.sampler.length // self.sampler.world
        self.sampler.epoch, offset = divmod(self.consumed, per_epoch)
        stream = itertools.islice(iter(self.sampler), offset, None)
        while True:
            yield list(itertools.islice(stream, self.batch_size))


def open_training_dataset(stage: int, data_dir: str, image_size: int) -> Dataset:
    """Stage 1 reads an LMDB of many faces record by record; stage 2 holds the album in memory."""
    dataset = LmdbDataset(data_dir) if stage == 1 else AlbumDataset(data_dir)
    if dataset.meta.image_size != image_size:
        raise DataError(f"{data_dir} holds {dataset.meta.image_size}² samples but the model is built for "
                        f"{image_size}²; re-create the dataset at {image_size} or set model.image_size")
    return dataset


def make_batches(dataset: Dataset, process_index: int, num_processes: int, batch_size: int, seed: int,
                 consumed: int = 0) -> ResumableBatches:
    if len(dataset) < num_processes:
        raise DataError(f"the dataset has {len(dataset)} samples, fewer than the {num_processes} training processes")
    sampler = ShardedInfiniteSampler(len(dataset), process_index, num_processes, seed=seed)
    return ResumableBatches(sampler, batch_size, consumed)


def _to_device(batch: dict, device: torch.device, memory_format: torch.memory_format) -> dict:
    return {key: batch[key].to(device, non_blocking=True).contiguous(memory_format=memory_format)
            for key in TENSOR_KEYS}


def stream_batches(dataset: Dataset, batches: ResumableBatches, device: torch.device, num_workers: int = 0,
                   channels_last: bool = False) -> Iterator[dict]:
    """Endless dicts of ``image`` (B,3,H,W) and ``buffers`` (B,9,H,W) on ``device``.

    Create the stream before restoring a checkpoint's random state: a DataLoader draws its worker
    seed from the torch generator when its iterator starts.
    """
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if isinstance(dataset, AlbumDataset):
        return _album_batches(dataset, batches, device, memory_format)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=num_workers > 0,
                        worker_init_fn=_leave_stop_signals_to_the_trainer if num_workers else None)
    return (_to_device(batch, device, memory_format) for batch in loader)


def _leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """A cluster's SIGTERM (or Ctrl-C) reaches the whole process group; a worker killed by it would
    crash the trainer before it could save. Workers ignore both and stop when the loader shuts down."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _album_batches(dataset: AlbumDataset, batches: ResumableBatches, device, memory_format) -> Iterator[dict]:
    stored = {key: torch.stack([item[key] for item in dataset.items]).to(device) for key in TENSOR_KEYS}
    pinned = device.type == "cuda"
    for indices in batches:
        index = torch.tensor(indices)
        if pinned:  # a copy from pageable memory would wait for the GPU to finish its queued steps
            index = index.pin_memory()
        index = index.to(device, non_blocking=True)
        yield {key: stored[key].index_select(0, index).contiguous(memory_format=memory_format) for key in TENSOR_KEYS}


def close_dataset(dataset: Dataset) -> None:
    """Release the dataset's LMDB handle now: LMDB refuses a second handle on a file in one process,
    so a later run in the same process (a notebook, a test) could not reopen it otherwise."""
    if hasattr(dataset, "close"):
        dataset.close()


def fixed_batch(dataset: Dataset, count: int, device: torch.device) -> dict:
    """The first ``count`` samples (fewer if the dataset is smaller): the sample grid's fixed inputs."""
    items = [dataset[i] for i in range(min(count, len(dataset)))]
    return {key: torch.stack([item[key] for item in items]).to(device) for key in TENSOR_KEYS}
