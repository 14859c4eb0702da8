import json
import shutil

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import load as st_load
from safetensors.torch import load_file, save_file

from diffrig.data.create import (
    MEAN_SHAPE_FILE,
    asset_fingerprint,
    build_parser,
    create_dataset,
    main,
    render_buffers,
)
from diffrig.data.crop import crop_images, crop_transform, resize_matrix, resize_transform
from diffrig.data.images import load_rgb
from diffrig.data.lmdb_store import META_KEY, RecordReader, RecordWriter
from diffrig.data.synthetic import PortraitTruth, read_sidecar, sidecar_path, write_sidecar
from diffrig.deca.assets import resolve_deca_dir
from diffrig.deca.codes import CODE_SIZES, RigCodes
from diffrig.errors import DataError

SMALL = 64
PORTRAITS = ("alfw1.png", "image02673.png", "alfw2.png")
SAMPLE_KEYS = {"image.png", "buffers.quant", "codes", "tform"}
pytestmark = pytest.mark.usefixtures("load_rig_once")


@pytest.fixture(scope="module")
def deca_dir(builtin_cache):
    return "builtin"


@pytest.fixture(scope="module")
def rig(deca_dir):
    from diffrig.deca.rig import DECA

    return DECA.from_dir(resolve_deca_dir(deca_dir), device="cpu")


def face_codes(seed: int) -> dict[str, torch.Tensor]:
    """Codes of a face that fills about half of DECA's crop, lit from the front."""
    g = torch.Generator().manual_seed(seed)
    light = torch.zeros(9, 3)
    light[0] = 3.0
    light[1:4] = 0.4 * torch.randn(3, 3, generator=g)
    return {"shape": 0.5 * torch.randn(100, generator=g), "tex": 0.5 * torch.randn(50, generator=g),
            "exp": 0.3 * torch.randn(50, generator=g), "pose": 0.05 * torch.randn(6, generator=g),
            "cam": torch.tensor([8.0, 0.0, 0.01]), "light": light}


def flat(codes: dict) -> torch.Tensor:
    return torch.cat([codes[key].reshape(-1) for key in CODE_SIZES])


def box_landmarks(left, top, right, bottom) -> np.ndarray:
    xs = np.linspace(left, right, 17)
    ys = np.linspace(top, bottom, 17)
    return np.concatenate([np.stack([xs, np.full(17, top)], 1), np.stack([xs, np.full(17, bottom)], 1),
                           np.stack([np.full(17, left), ys], 1), np.stack([np.full(17, right), ys], 1)])


def resized(path, size) -> torch.Tensor:
    image = load_rgb(path)
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def samples(path) -> list:
    reader = RecordReader(path)
    items = [reader[i] for i in range(len(reader))]
    reader.close()
    return items


@pytest.fixture(scope="module")
def album(faces_dir, tmp_path_factory):
    """Two portraits for dlib, a blank picture whose face box comes from a DECA .txt sidecar, and
    four files that must be rejected."""
    folder = tmp_path_factory.mktemp("album")
    for name in PORTRAITS[:2]:
        shutil.copy(faces_dir / "portraits" / name, folder / name)
    Image.new("RGB", (128, 128), (120, 110, 100)).save(folder / "blank_with_landmarks.png")
    np.savetxt(folder / "blank_with_landmarks.txt", box_landmarks(30.0, 40.0, 90.0, 110.0))
    (folder / "notes.jpg").write_text("not a picture")
    Image.new("RGB", (40, 40)).save(folder / "tiny.png")
    Image.new("RGB", (200, 100)).save(folder / "wide.png")
    Image.new("RGB", (96, 96), (128, 128, 128)).save(folder / "no_face.png")
    (folder / "readme.txt").write_text("a text file is taken for a landmark sidecar and ignored")
    return folder


@pytest.fixture(scope="module")
def encoded(album, deca_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("out") / "album.lmdb"
    summary = create_dataset(album, output, image_size=SMALL, deca_dir=deca_dir, batch_size=2, device="cpu",
                             num_workers=0, progress=False)
    return output, summary


def test_encoder_run_writes_usable_images_and_lists_the_rest(encoded, deca_dir):
    output, summary = encoded
    assert summary.written == 3 and summary.existing == 0
    reasons = dict(summary.rejected)
    assert set(reasons) == {"notes.jpg", "tiny.png", "wide.png", "no_face.png"}
    assert reasons["notes.jpg"] == "not an image"
    assert "too small" in reasons["tiny.png"] and "not square" in reasons["wide.png"]
    assert reasons["no_face.png"] == "no face found"
    lines = (output / "rejected.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in lines) == sorted(reasons)
    assert all(line.count("\t") == 1 for line in lines)

    reader = RecordReader(output)
    meta, names = reader.meta, [reader[i].name for i in range(len(reader))]
    reader.close()
    assert meta.complete and meta.count == 3 and meta.image_size == SMALL
    assert meta.codes_layout == CODE_SIZES
    assert meta.settings["use_meanshape"] is False and meta.settings["codes"] == "deca"
    assert meta.settings["deca_dir"] == "builtin"
    assert meta.asset_fingerprint == asset_fingerprint(resolve_deca_dir(deca_dir))
    assert names == ["alfw1.png", "blank_with_landmarks.png", "image02673.png"]
    assert not (output / MEAN_SHAPE_FILE).exists()


def test_records_reproduce_crop_codes_and_buffers(encoded, album, rig):
    output, _ = encoded
    for sample in samples(output):
        image = resized(album / sample.name, SMALL)
        assert torch.equal(sample.image, image)  # the resized picture's exact pixels
        crop = crop_images(image[None].float() / 255, sample.tform[None])
        torch.testing.assert_close(sample.codes, rig.encode(crop).flat()[0], atol=1e-4, rtol=1e-4)
        fresh = render_buffers(rig, sample.codes[None], sample.tform[None], SMALL)[0]
        assert sample.buffers.shape == (9, SMALL, SMALL)
        assert (sample.buffers - fresh).abs().max() <= 1 / 255


def test_crop_comes_from_sidecar_landmarks_or_dlib(encoded, album):
    from diffrig.data.landmarks import detect_faces

    output, _ = encoded
    stored = {sample.name: sample.tform for sample in samples(output)}
    # the blank picture has no face for dlib: its crop is the sidecar's box, scaled 128 -> 64
    to_small = resize_matrix((128, 128), (SMALL, SMALL)).numpy()
    points = box_landmarks(30.0, 40.0, 90.0, 110.0) @ to_small[:2, :2].T + to_small[:2, 2]
    expected = crop_transform(torch.from_numpy(points)[None])[0].float()
    torch.testing.assert_close(stored["blank_with_landmarks.png"], expected)
    # a portrait without sidecar: dlib's landmarks on the full picture, scaled 224 -> 64
    face = detect_faces(load_rgb(album / "alfw1.png"))[0]
    to_small = resize_matrix((224, 224), (SMALL, SMALL)).numpy()
    points = face.landmarks @ to_small[:2, :2].T + to_small[:2, 2]
    torch.testing.assert_close(stored["alfw1.png"], crop_transform(torch.from_numpy(points)[None])[0].float())


def test_no_pickle_in_any_stored_value(encoded):
    output, _ = encoded
    kinds = []
    with lmdb.open(str(output), readonly=True, lock=False) as env, env.begin() as txn:
        for key, value in txn.cursor():
            if key == META_KEY:
                json.loads(value)
                kinds.append("meta")
            elif key.startswith(b"name:"):
                assert value.isdigit(), key
                kinds.append("name")
            else:
                # safetensors: an 8-byte header length, a JSON header, raw little-endian tensors
                tensors = st_load(value)
                assert SAMPLE_KEYS <= set(tensors) <= SAMPLE_KEYS | {"buffers8.png", "buffers16.png"}
                assert {str(t.dtype) for t in tensors.values()} <= {"torch.uint8", "torch.float32"}
                assert tensors["image.png"][:8].numpy().tobytes() == b"\x89PNG\r\n\x1a\n"
                for png in set(tensors) & {"buffers8.png", "buffers16.png"}:
                    assert tensors[png][:8].numpy().tobytes() == b"\x89PNG\r\n\x1a\n"
                kinds.append("sample")
    assert sorted(kinds) == ["meta"] + ["name"] * 3 + ["sample"] * 3


def test_rerun_of_a_complete_dataset_changes_nothing_and_other_settings_are_refused(encoded, album, deca_dir):
    output, _ = encoded
    before = (output / "data.mdb").read_bytes()
    again = create_dataset(album, output, image_size=SMALL, deca_dir=deca_dir, device="cpu", num_workers=0,
                           progress=False)
    assert again.already_complete and again.existing == 3 and again.written == 0
    assert (output / "data.mdb").read_bytes() == before
    grown = album.parent / "grown_album"
    shutil.copytree(album, grown)
    newcomer = next(p for p in sorted(grown.iterdir()) if p.suffix == ".png")
    shutil.copy(newcomer, grown / "newcomer.png")
    with pytest.raises(DataError, match=r"finished dataset of 3 samples and does not hold 1 photo.*newcomer.png"):
        create_dataset(grown, output, image_size=SMALL, deca_dir=deca_dir, device="cpu", num_workers=0,
                       progress=False)
    assert (output / "data.mdb").read_bytes() == before
    with pytest.raises(DataError, match="other settings"):
        create_dataset(album, output, image_size=32, deca_dir=deca_dir, device="cpu", num_workers=0, progress=False)


def write_truth(folder, name, seed, box, size=224):
    """A ground-truth sidecar as the synthetic world writes it, for the picture ``folder/name``."""
    codes = RigCodes(**{key: value[None] for key, value in face_codes(seed).items()})
    tform = crop_transform(torch.from_numpy(box_landmarks(*box))[None])[0]
    write_sidecar(sidecar_path(folder / name), PortraitTruth(codes=codes, tform=tform, size=size, identity=seed,
                                                             image=0, nuisance_seed=0, world_seed=0, deca_dir="builtin"))


TRUTH_BOXES = [(50.0, 40.0, 170.0, 190.0), (20.0, 30.0, 200.0, 210.0), (60.0, 60.0, 160.0, 160.0)]


@pytest.fixture(scope="module")
def truth(faces_dir, tmp_path_factory):
    """Three portraits with ground-truth sidecars (codes and crop transform)."""
    folder = tmp_path_factory.mktemp("truth")
    for i, name in enumerate(PORTRAITS):
        shutil.copy(faces_dir / "portraits" / name, folder / name)
        write_truth(folder, name, i, TRUTH_BOXES[i])
    return folder


def test_ground_truth_codes_round_trip_at_256_and_records_are_compact(truth, deca_dir, rig, tmp_path):
    output = tmp_path / "truth.lmdb"
    summary = create_dataset(truth, output, image_size=256, deca_dir=deca_dir, codes="ground_truth",
                             batch_size=3, device="cpu", num_workers=0, progress=False)
    assert summary.written == 3 and not summary.rejected
    items = {sample.name: sample for sample in samples(output)}
    for i, name in enumerate(PORTRAITS):  # the sidecar's crop, rescaled from 224² to 256²
        tform = read_sidecar(sidecar_path(truth / name)).tform.double()
        torch.testing.assert_close(items[name].tform, resize_transform(tform[None], (224, 224), (256, 256))[0].float())

    with lmdb.open(str(output), readonly=True, lock=False) as env, env.begin() as txn:
        records = {name: txn.get(b"sample:%08d" % i) for i, name in enumerate(items)}
    for i, name in enumerate(PORTRAITS):
        sample = items[name]
        assert torch.equal(sample.codes, flat(face_codes(i)))
        fresh = render_buffers(rig, sample.codes[None], sample.tform[None], 256)[0]
        assert (sample.buffers - fresh).abs().max() <= 1 / 255
        assert (fresh[6:].abs().sum(0) > 0).float().mean() > 0.1  # a face covers the picture
        # the official sample: the PNG plus three pickled float32 (3, 256, 256) tensors (counted
        # without pickle's overhead, so the bound is stricter than the real one)
        official = len(png_bytes(sample.image)) + 3 * 3 * 256 * 256 * 4
        assert len(records[name]) <= 0.25 * official, (name, len(records[name]), official)


def png_bytes(image: torch.Tensor) -> bytes:
    import io

    out = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(out, format="PNG")
    return out.getvalue()


def test_mean_shape_is_saved_used_and_reused_after_a_crash(truth, deca_dir, rig, tmp_path, monkeypatch):
    output = tmp_path / "mean.lmdb"
    real_append = RecordWriter.append_encoded
    calls = []

    def crash_on_second_batch(writer, records):
        calls.append(len(records))
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return real_append(writer, records)

    monkeypatch.setattr(RecordWriter, "append_encoded", crash_on_second_batch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        create_dataset(truth, output, image_size=32, use_meanshape=True, deca_dir=deca_dir, codes="ground_truth",
                       batch_size=1, device="cpu", num_workers=0, progress=False)
    with pytest.raises(DataError, match="not finished"):
        RecordReader(output)
    mean = load_file(output / MEAN_SHAPE_FILE)["shape"]
    expected = torch.stack([face_codes(i)["shape"] for i in range(3)]).mean(0, keepdim=True)
    torch.testing.assert_close(mean, expected)

    monkeypatch.setattr(RecordWriter, "append_encoded", real_append)
    summary = create_dataset(truth, output, image_size=32, use_meanshape=True, deca_dir=deca_dir,
                             codes="ground_truth", batch_size=1, device="cpu", num_workers=0, progress=False)
    assert summary.existing == 1 and summary.written == 2
    stored = samples(output)
    assert sorted(sample.name for sample in stored) == sorted(PORTRAITS)  # each exactly once
    for sample in stored:
        i = PORTRAITS.index(sample.name)
        assert torch.equal(sample.codes[:100], mean[0])
        assert torch.equal(sample.codes[100:], flat(face_codes(i))[100:])
        fresh = render_buffers(rig, sample.codes[None], sample.tform[None], 32)[0]
        assert (sample.buffers - fresh).abs().max() <= 1 / 255


def test_resume_without_the_mean_shape_file_is_refused(truth, deca_dir, tmp_path, monkeypatch):
    output = tmp_path / "lost.lmdb"
    real_append = RecordWriter.append_encoded
    state = {"calls": 0}

    def crash_after_first(writer, records):
        state["calls"] += 1
        if state["calls"] > 1:
            raise RuntimeError("simulated crash")
        return real_append(writer, records)

    monkeypatch.setattr(RecordWriter, "append_encoded", crash_after_first)
    with pytest.raises(RuntimeError, match="simulated crash"):
        create_dataset(truth, output, image_size=16, use_meanshape=True, deca_dir=deca_dir, codes="ground_truth",
                       batch_size=1, device="cpu", num_workers=0, progress=False)
    (output / MEAN_SHAPE_FILE).unlink()
    monkeypatch.setattr(RecordWriter, "append_encoded", real_append)
    with pytest.raises(DataError, match="mean_shape.safetensors is gone"):
        create_dataset(truth, output, image_size=16, use_meanshape=True, deca_dir=deca_dir, codes="ground_truth",
                       batch_size=1, device="cpu", num_workers=0, progress=False)


def test_missing_or_bad_codes_sidecars_are_rejected(faces_dir, deca_dir, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in PORTRAITS:
        shutil.copy(faces_dir / "portraits" / name, folder / name)
    write_truth(folder, "alfw1.png", 0, TRUTH_BOXES[0])
    write_truth(folder, "image02673.png", 1, TRUTH_BOXES[1])
    tensors = load_file(folder / "image02673.codes.safetensors")
    del tensors["light"]
    save_file(tensors, folder / "image02673.codes.safetensors", metadata={"format": "diffrig.synthetic.codes/1"})
    shutil.copy(faces_dir / "portraits" / "image03786.png", folder / "image03786.png")
    write_truth(folder, "image03786.png", 2, TRUTH_BOXES[2], size=256)
    summary = create_dataset(folder, tmp_path / "out.lmdb", image_size=16, deca_dir=deca_dir, codes="ground_truth",
                             device="cpu", num_workers=0, progress=False)
    assert summary.written == 1
    reasons = dict(summary.rejected)
    assert reasons["alfw2.png"] == "no ground-truth codes (alfw2.codes.safetensors is missing)"
    assert "light" in reasons["image02673.png"] and "image02673.codes.safetensors" in reasons["image02673.png"]
    assert str(folder) not in reasons["image02673.png"]
    assert reasons["image03786.png"] == ("the picture is 224x224 px but image03786.codes.safetensors "
                                         "describes a 256x256 one")


def test_nothing_usable_fails_and_leaves_the_dataset_unfinished(tmp_path, deca_dir):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jpg").write_text("text")
    with pytest.raises(DataError, match="no usable image"):
        create_dataset(folder, tmp_path / "out.lmdb", image_size=16, deca_dir=deca_dir, device="cpu",
                       num_workers=0, progress=False)
    assert (tmp_path / "out.lmdb" / "rejected.txt").read_text() == "a.jpg\tnot an image\n"
    with pytest.raises(DataError, match="not finished"):
        RecordReader(tmp_path / "out.lmdb")


def test_asset_fingerprint_follows_names_sizes_and_contents(tmp_path):
    (tmp_path / "generic_model.pkl").write_bytes(b"a" * 100)
    big = bytearray(b"b" * (3 << 20))
    (tmp_path / "deca_model.tar").write_bytes(bytes(big))
    (tmp_path / "unrelated.bin").write_bytes(b"x")
    first = asset_fingerprint(tmp_path)
    (tmp_path / "unrelated.bin").write_bytes(b"y")
    assert asset_fingerprint(tmp_path) == first
    big[-10] = ord("c")  # a change in the last MiB of a large file
    (tmp_path / "deca_model.tar").write_bytes(bytes(big))
    second = asset_fingerprint(tmp_path)
    assert second != first
    (tmp_path / "generic_model.pkl").write_bytes(b"a" * 101)
    assert asset_fingerprint(tmp_path) not in (first, second)


def test_cli_flags_and_errors(tmp_path, capsys):
    parser = build_parser()
    official = parser.parse_args(["--data_dir", "d", "--output_dir", "o", "--image_size", "128",
                                  "--use_meanshape", "True", "--batch_size", "8", "--deca_dir", "builtin"])
    dashed = parser.parse_args(["--data-dir", "d", "--output-dir", "o", "--image-size", "128",
                                "--use-meanshape", "--batch-size", "8", "--deca-dir", "builtin"])
    assert vars(official) == vars(dashed)
    assert official.use_meanshape is True and official.image_size == 128 and official.codes == "deca"
    assert parser.parse_args(["--data_dir", "d", "--output_dir", "o", "--use_meanshape", "False"]).use_meanshape is False
    with pytest.raises(SystemExit):
        parser.parse_args(["--data_dir", "d", "--output_dir", "o", "--use_meanshape", "maybe"])
    capsys.readouterr()

    assert main(["--data_dir", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "o.lmdb"), "-q"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: data folder") and err.count("\n") == 1 and "Traceback" not in err


def test_landmark_sidecars_mat_before_txt_and_bad_ones_named(tmp_path):
    from scipy.io import savemat

    from diffrig.data.create import sidecar_landmarks
    from diffrig.data.images import ImageRejected

    image = tmp_path / "face.png"
    assert sidecar_landmarks(image) is None
    points = box_landmarks(10.0, 20.0, 50.0, 70.0)
    np.savetxt(tmp_path / "face.txt", points + 1.0)
    np.testing.assert_allclose(sidecar_landmarks(image), points + 1.0)
    savemat(tmp_path / "face.mat", {"pt3d_68": np.concatenate([points, np.zeros((68, 1))], 1).T})  # AFLW2000's 3x68
    np.testing.assert_allclose(sidecar_landmarks(image), points)
    (tmp_path / "face.mat").unlink()
    (tmp_path / "face.txt").write_text("1 2\n3 nan\n")
    with pytest.raises(ImageRejected, match="face.txt must hold rows of finite"):
        sidecar_landmarks(image)
    (tmp_path / "face.txt").write_text("not numbers at all\n")
    with pytest.raises(ImageRejected, match="landmark file face.txt unreadable"):
        sidecar_landmarks(image)


def test_encoding_in_worker_threads_writes_the_same_records(truth, deca_dir, tmp_path):
    options = dict(image_size=32, use_meanshape=False, deca_dir=deca_dir, codes="ground_truth", batch_size=2,
                   device="cpu", num_workers=0, progress=False)
    create_dataset(truth, tmp_path / "inline.lmdb", encode_workers=0, **options)
    create_dataset(truth, tmp_path / "pool.lmdb", encode_workers=2, **options)
    inline, pooled = samples(tmp_path / "inline.lmdb"), samples(tmp_path / "pool.lmdb")
    assert [s.name for s in inline] == [s.name for s in pooled] and len(inline) == len(PORTRAITS)
    for a, b in zip(inline, pooled):
        assert torch.equal(a.image, b.image) and torch.equal(a.buffers, b.buffers)
        assert torch.equal(a.codes, b.codes) and torch.equal(a.tform, b.tform)
        assert torch.equal(a.codes, flat(face_codes(PORTRAITS.index(a.name))))

    def records(path):
        with lmdb.open(str(path), readonly=True, lock=False) as env, env.begin() as txn:
            return {key: value for key, value in txn.cursor() if key.startswith(b"sample:")}

    assert records(tmp_path / "inline.lmdb") == records(tmp_path / "pool.lmdb")  # byte for byte


def test_png_photos_of_the_right_size_are_stored_as_their_files(truth, deca_dir, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in PORTRAITS[:2]:
        shutil.copy(sidecar_path(truth / name), sidecar_path(folder / name))
    shutil.copy(truth / PORTRAITS[0], folder / PORTRAITS[0])  # IHDR, IDAT, IEND only
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "a text chunk may carry an orientation: not stored as it is")
    Image.open(truth / PORTRAITS[1]).save(folder / PORTRAITS[1], pnginfo=info)
    output = tmp_path / "out.lmdb"
    create_dataset(folder, output, image_size=224, deca_dir=deca_dir, codes="ground_truth", batch_size=2,
                   device="cpu", num_workers=0, encode_workers=2, progress=False)
    with lmdb.open(str(output), readonly=True, lock=False) as env, env.begin() as txn:
        stored = [st_load(txn.get(b"sample:%08d" % i))["image.png"].numpy().tobytes() for i in range(2)]
    assert stored[0] == (folder / PORTRAITS[0]).read_bytes()
    assert stored[1] != (folder / PORTRAITS[1]).read_bytes() and b"tEXt" not in stored[1]
    for sample in samples(output):
        assert torch.equal(sample.image, resized(folder / sample.name, 224))


def test_a_failed_batch_stops_the_threaded_writer_and_the_run_resumes(truth, deca_dir, tmp_path, monkeypatch):
    output = tmp_path / "threads.lmdb"
    options = dict(image_size=16, deca_dir=deca_dir, codes="ground_truth", batch_size=1, device="cpu",
                   num_workers=0, encode_workers=2, progress=False)
    real_append = RecordWriter.append_encoded
    calls = []

    def crash_on_second_batch(writer, records):
        calls.append([name for name, _ in records])
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return real_append(writer, records)

    monkeypatch.setattr(RecordWriter, "append_encoded", crash_on_second_batch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        create_dataset(truth, output, **options)
    assert calls == [[PORTRAITS[0]], [PORTRAITS[2]]]  # nothing tried after the failed batch
    monkeypatch.setattr(RecordWriter, "append_encoded", real_append)
    summary = create_dataset(truth, output, **options)
    assert summary.existing == 1 and summary.written == 2
    assert sorted(sample.name for sample in samples(output)) == sorted(PORTRAITS)
