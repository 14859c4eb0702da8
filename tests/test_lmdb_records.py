"""LMDB records: round trip, compactness, no pickle, resume, corruption, datasets and sharding."""

import io
import pickle
import pickletools

import safetensors.torch

import lmdb
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from diffrig.data.datasets import AlbumDataset, LmdbDataset, ShardedInfiniteSampler
from diffrig.data.lmdb_store import DatasetMeta, RecordReader, RecordWriter, sample_key
from diffrig.data.records import Sample, decode_sample, encode_sample
from diffrig.errors import DataError

LAYOUT = {"shape": 100, "tex": 50, "exp": 50, "pose": 6, "cam": 3, "light": 27}


def sphere_sample(size=64, seed=0, name="a.png") -> Sample:
    """A lit sphere: buffers shaped like DECA's (masked, normals in [-1,1], rendered may exceed 1)."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    r2 = xs**2 + ys**2
    mask = (r2 < 0.8).float()
    normal = torch.stack([xs, -ys, (1 - r2).clamp_min(0).sqrt()]) * mask
    albedo = (torch.stack([0.8 + 0.1 * xs, 0.6 + 0.1 * ys, 0.5 + 0 * xs]) + 0.05 * torch.rand(1, generator=g)) * mask
    shading = (0.9 + 0.7 * normal[2:3] + 0.3 * normal[0:1])
    rendered = albedo * shading
    image = ((rendered.clamp(0, 1) * 0.8 + 0.1) * 255).round().to(torch.uint8)
    return Sample(name=name, image=image, buffers=torch.cat([rendered, normal, albedo]),
                  codes=torch.randn(236, generator=g), tform=torch.eye(3) * 1.5)


def is_pickle(data: bytes) -> bool:
    try:
        ops = [op.name for op, _, _ in pickletools.genops(io.BytesIO(data))]
    except Exception:
        return False
    return ops[-1] == "STOP"


def make_meta(**kw) -> DatasetMeta:
    base = dict(image_size=64, asset_fingerprint="abc123", codes_layout=LAYOUT, settings={"use_meanshape": False})
    base.update(kw)
    return DatasetMeta(**base)


def write_dataset(path, n=6, size=64, finish=True):
    with RecordWriter(path, make_meta(image_size=size)) as writer:
        writer.append([sphere_sample(size, seed=i, name=f"img{i:02d}.png") for i in range(n)])
        if finish:
            writer.finish()


def test_record_round_trip_within_quantisation():
    sample = sphere_sample(64)
    back = decode_sample(encode_sample(sample))
    assert back.name == "a.png"
    assert torch.equal(back.image, sample.image)
    assert torch.equal(back.codes, sample.codes) and torch.equal(back.tform, sample.tform)
    err = (back.buffers - sample.buffers).abs().amax(dim=(1, 2))
    assert err.max() <= 0.5 / 254 + 1e-6  # 8-bit channels: half a step of (span <= 1) / 254
    low = sample.buffers.amin(dim=(1, 2)).clamp(max=0)
    wide = sample.buffers.amax(dim=(1, 2)).clamp(min=0) - low > 1  # e.g. normal x, y in [-1, 1]
    assert wide.sum() >= 2 and err[wide].max() <= 1 / 2040 + 1e-6  # finer steps in a 16-bit PNG
    assert sample.buffers[:3].max() > 1.0  # rendered above 1 survives (no clipping)
    background = sample.buffers.abs().sum(0) == 0
    assert background.any() and (back.buffers[:, background] == 0).all()  # zero stays exactly zero


def test_record_is_compact_and_has_no_pickle():
    sample = sphere_sample(256)
    data = encode_sample(sample)
    png = io.BytesIO()
    Image.fromarray(sample.image.permute(1, 2, 0).numpy()).save(png, format="png")
    official = len(png.getvalue()) + sum(
        len(pickle.dumps(sample.buffers[i : i + 3].clone())) for i in (0, 3, 6)
    )
    assert len(data) <= 0.25 * official, (len(data), official)
    # a safetensors blob (JSON header + raw bytes) with PNG payloads: nothing for pickle to run
    assert set(safetensors.torch.load(data)) == {"image.png", "buffers8.png", "buffers16.png", "buffers.quant", "codes", "tform"}
    assert not is_pickle(data)


def test_writer_reader_and_metadata(tmp_path):
    path = tmp_path / "ds.lmdb"
    write_dataset(path, n=5)
    reader = RecordReader(path)
    assert len(reader) == 5 and reader.meta.complete and reader.meta.codes_layout == LAYOUT
    assert reader[3].name == "img03.png"
    with pytest.raises(IndexError, match="5"):
        reader[5]
    reader.close()
    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        for key, value in txn.cursor():
            assert not is_pickle(value), key


def test_resume_after_crash(tmp_path):
    path = tmp_path / "ds.lmdb"
    write_dataset(path, n=3, finish=False)  # "crash": never finished
    with pytest.raises(DataError, match="not finished"):
        RecordReader(path)
    with RecordWriter(path, make_meta()) as writer:
        assert writer.count == 3 and writer.has("img02.png") and not writer.has("img03.png")
        writer.append([sphere_sample(64, seed=i, name=f"img{i:02d}.png") for i in range(3, 6)])
        writer.finish()
    reader = RecordReader(path)
    assert [reader[i].name for i in range(len(reader))] == [f"img{i:02d}.png" for i in range(6)]


def test_a_full_disk_keeps_what_was_written_and_the_run_resumes(tmp_path, monkeypatch):
    from diffrig.data import lmdb_store

    path = tmp_path / "ds.lmdb"
    monkeypatch.setattr(lmdb_store, "MAP_SIZE", 256 * 1024)  # LMDB's own "disk full": the map is full
    batches = [[(f"img{b}{i}.png", bytes([b]) * 20_000) for i in range(2)] for b in range(20)]
    with RecordWriter(path, make_meta()) as writer:
        with pytest.raises(DataError, match=r"is the disk full\? The (\d+) samples written before are kept") as info:
            for batch in batches:
                writer.append_encoded(batch)
        committed = writer.count
    assert 0 < committed < 40 and committed % 2 == 0 and f"The {committed} samples" in str(info.value)
    monkeypatch.setattr(lmdb_store, "MAP_SIZE", 1 << 30)
    with RecordWriter(path, make_meta()) as writer:  # space freed: the same command continues
        assert writer.count == committed and writer.has(f"img{committed // 2 - 1}1.png")
        assert not writer.has(f"img{committed // 2}0.png")
        for batch in batches[committed // 2:]:
            writer.append_encoded(batch)
        assert writer.count == 40


def test_several_readers_of_one_file_in_one_process_share_it(tmp_path):
    path = tmp_path / "ds.lmdb"
    write_dataset(path, n=4)
    train, validation = LmdbDataset(path), LmdbDataset(path)  # e.g. a notebook cell run twice
    reader = RecordReader(path)
    assert train[1]["image"].shape == validation[1]["image"].shape and reader[2].name == "img02.png"
    train.close()
    assert validation[3]["image"].shape[0] == 3 and reader[0].name == "img00.png"  # still open for the others
    with pytest.raises(DataError, match="open for reading in this process"):
        RecordWriter(path, make_meta())
    validation.close()
    reader.close()
    reader.close()  # twice is harmless
    with RecordWriter(path, make_meta()) as writer:  # every reader closed: the file can be written again
        assert writer.count == 4


def test_resume_with_other_settings_is_refused(tmp_path):
    path = tmp_path / "ds.lmdb"
    write_dataset(path, n=1, finish=False)
    with pytest.raises(DataError, match="other settings"):
        RecordWriter(path, make_meta(settings={"use_meanshape": True}))


def test_missing_truncated_and_official_datasets_fail_clearly(tmp_path):
    with pytest.raises(DataError, match="not an LMDB dataset"):
        RecordReader(tmp_path / "nope.lmdb")
    path = tmp_path / "ds.lmdb"
    write_dataset(path, n=4)
    data = (path / "data.mdb").read_bytes()
    (path / "data.mdb").write_bytes(data[: len(data) // 3])
    with pytest.raises(DataError, match=r"ds.lmdb is truncated \(data.mdb is shorter than its own index says\); "
                                         "re-create it"):
        reader = RecordReader(path)
        [reader[i] for i in range(len(reader))]
    official = tmp_path / "official.lmdb"
    env = lmdb.open(str(official))
    with env.begin(write=True) as txn:
        txn.put(b"length", b"1")
    env.close()
    with pytest.raises(DataError, match="official DiffusionRig format"):
        RecordReader(official)


def test_corrupt_record_fails_clearly(tmp_path):
    path = tmp_path / "ds.lmdb"
    write_dataset(path, n=2)
    env = lmdb.open(str(path))
    with env.begin(write=True) as txn:
        txn.put(sample_key(1), b"garbage")
    env.close()
    reader = RecordReader(path)
    assert reader[0].name == "img00.png"  # the intact record still reads
    with pytest.raises(DataError, match="corrupt"):
        reader[1]


def test_datasets_yield_training_items(tmp_path):
    path = tmp_path / "ds.lmdb"
    write_dataset(path, n=4)
    ref = sphere_sample(64, seed=2)
    for dataset in (LmdbDataset(path), AlbumDataset(path)):
        assert len(dataset) == 4
        item = dataset[2]
        assert item["image"].shape == (3, 64, 64) and item["buffers"].shape == (9, 64, 64)
        # uint8 pixels mapped to [-1, 1] as the official loader does: x / 127.5 - 1
        torch.testing.assert_close(item["image"], ref.image.float() / 127.5 - 1, rtol=0, atol=1e-6)
        assert torch.equal(item["codes"], ref.codes)
        assert (item["buffers"] - ref.buffers).abs().max() < 1 / 255


def test_lmdb_dataset_with_worker_processes(tmp_path):
    path = tmp_path / "ds.lmdb"
    write_dataset(path, n=6)
    dataset = LmdbDataset(path)
    loader = DataLoader(dataset, batch_size=3, num_workers=2)
    batches = list(loader)
    assert len(batches) == 2 and batches[0]["buffers"].shape == (3, 9, 64, 64)
    # each worker opens its own handle and reads the right records, in order
    for key in ("image", "buffers", "codes"):
        expected = torch.stack([dataset[i][key] for i in range(6)])
        assert torch.equal(torch.cat([batch[key] for batch in batches]), expected), key
    assert not torch.equal(batches[0]["codes"][0], batches[0]["codes"][1])


def test_sharding_across_two_processes_has_no_duplicates():
    length = 11
    shards = [ShardedInfiniteSampler(length, r, 2, seed=3) for r in range(2)]
    for epoch in range(3):
        a, b = (s.epoch_indices(epoch) for s in shards)
        assert len(a) == len(b) == 5
        assert not set(a) & set(b)
    assert shards[0].epoch_indices(0) != shards[0].epoch_indices(1)  # reshuffled each epoch
    stream = iter(shards[1])
    first_two_epochs = [next(stream) for _ in range(10)]
    assert first_two_epochs == shards[1].epoch_indices(0) + shards[1].epoch_indices(1)
