"""The synthetic portrait world: ground-truth sidecars, determinism, edit truth, CLI."""

import pytest
import torch

from diffrig.data.synthetic import GroundTruthCodes, PortraitTruth, read_sidecar, sidecar_path, write_sidecar
from diffrig.deca.codes import RigCodes
from diffrig.errors import DataError


def _truth(seed: int = 0) -> PortraitTruth:
    generator = torch.Generator().manual_seed(seed)
    codes = RigCodes.from_flat(torch.randn(1, 236, generator=generator))
    tform = torch.tensor([[3.5, 0.0, -20.0], [0.0, 3.5, -25.0], [0.0, 0.0, 1.0]])
    return PortraitTruth(codes, tform, size=64, identity=3, image=7, nuisance_seed=123456789, world_seed=5,
                         deca_dir="builtin")


def test_sidecar_round_trip(tmp_path):
    truth = _truth()
    path = sidecar_path(tmp_path / "00003_0007.png")
    assert path.name == "00003_0007.codes.safetensors"
    write_sidecar(path, truth)
    back = read_sidecar(path)
    assert torch.equal(back.codes.flat(), truth.codes.flat())
    assert back.codes.light.shape == (1, 9, 3)
    assert torch.equal(back.tform, truth.tform)
    assert (back.size, back.identity, back.image, back.nuisance_seed, back.world_seed, back.deca_dir) == (
        64, 3, 7, 123456789, 5, "builtin")


def test_ground_truth_codes_batch_and_resize(tmp_path):
    paths = []
    for index in range(2):
        path = tmp_path / f"p{index}.png"
        write_sidecar(sidecar_path(path), _truth(index))
        paths.append(path)
    codes, tform = GroundTruthCodes()(paths)
    assert codes.batch_size == 2 and tform.shape == (2, 3, 3)
    assert torch.equal(codes.flat()[1], _truth(1).codes.flat()[0])
    # the same point of the picture, in pixel centres of a 2x larger copy, lands on the same crop pixel
    _, tform_big = GroundTruthCodes()(paths, image_size=128)
    point_small = torch.tensor([10.0, 20.0, 1.0])
    point_big = torch.tensor([2 * 10.0 + 0.5, 2 * 20.0 + 0.5, 1.0])
    assert torch.allclose(tform[0] @ point_small, tform_big[0] @ point_big, atol=1e-4)


def test_missing_or_foreign_sidecar_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="make_synthetic"):
        GroundTruthCodes()([tmp_path / "photo.png"])
    from safetensors.torch import save_file

    save_file({"shape": torch.zeros(100)}, str(tmp_path / "x.codes.safetensors"), metadata={"format": "other"})
    with pytest.raises(DataError, match="not a synthetic-portrait sidecar"):
        read_sidecar(tmp_path / "x.codes.safetensors")
