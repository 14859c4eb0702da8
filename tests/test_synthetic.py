"""The synthetic portrait world: ground-truth sidecars, determinism, edit truth, framing, CLI."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from diffrig.data.synthetic import GroundTruthCodes, PortraitTruth, read_sidecar, sidecar_path, write_sidecar
from diffrig.deca.codes import RigCodes
from diffrig.errors import DataError

SIZE = 64


def _truth(seed: int = 0) -> PortraitTruth:
    generator = torch.Generator().manual_seed(seed)
    codes = RigCodes.from_flat(torch.randn(1, 236, generator=generator))
    tform = torch.tensor([[3.5, 0.0, -20.0], [0.0, 3.5, -25.0], [0.0, 0.0, 1.0]])
    return PortraitTruth(codes, tform, size=64, identity=3, image=7, nuisance_seed=123456789, world_seed=5,
                         deca_dir="builtin")


# ----------------------------------------------------------------------------- sidecars (no rig needed)


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


# ----------------------------------------------------------------------------- priors


def test_sh_light_is_ambient_plus_clamped_cosine_and_its_direction_is_recovered():
    from diffrig.data.synthetic.priors import dominant_light, sh_light
    from diffrig.deca.render import sh_shading

    direction = torch.tensor([0.5, 0.4, 0.8])
    intensity = torch.tensor([0.6, 0.5, 0.4])
    light = sh_light(direction, intensity, 0.3)
    normals = torch.randn(1, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    normals = torch.nn.functional.normalize(normals, dim=1)
    shading = sh_shading(normals, light[None])
    cosine = (normals * (direction / direction.norm())[None, :, None, None]).sum(1, keepdim=True).clamp(min=0)
    target = 0.3 + intensity[None, :, None, None] * cosine
    assert (shading - target).abs().max() < 0.1 * intensity.max()  # second-order SH of a clamped cosine
    assert shading.min() > 0.2
    from diffrig.rigs import directional_light  # the hand-set lights: the same projection, by least squares

    assert torch.allclose(sh_light(direction, 0.8, 0.3), directional_light(direction.tolist(), 0.8, 0.3), atol=1e-4)
    found_direction, found_intensity = dominant_light(light[None])
    assert torch.allclose(found_direction[0], direction / direction.norm(), atol=1e-5)
    assert torch.allclose(found_intensity[0], intensity, atol=1e-5)


# ----------------------------------------------------------------------------- the world


@pytest.fixture(scope="module")
def rig(builtin_cache):
    from diffrig.data.synthetic.world import _load_rig

    return _load_rig("builtin")


@pytest.fixture(scope="module")
def world(rig):
    from diffrig.data.synthetic.world import SyntheticWorld

    return SyntheticWorld(rig=rig, size=SIZE, seed=0)


def test_identity_is_deterministic_and_identities_differ(world, rig):
    from diffrig.data.synthetic.world import Identity, SyntheticWorld

    first, again = world.identity(3), world.identity(3)
    assert torch.equal(first.shape, again.shape) and first.to_dict() == again.to_dict()
    assert Identity.from_dict(json.loads(json.dumps(first.to_dict()))).to_dict() == first.to_dict()
    people = [world.identity(i) for i in range(8)]
    assert len({tuple(p.hair.colour.tolist()) for p in people}) == 8
    assert len({round(p.hair.front, 6) for p in people}) == 8
    other_world = SyntheticWorld(rig=rig, size=SIZE, seed=1)
    assert not torch.equal(other_world.identity(3).shape, first.shape)


def test_identities_differ_in_hair_and_skin_under_the_same_codes(world):
    people = [world.identity(i) for i in range(4)]
    shot = world.sample(people[0], [0])
    layers = [world.render_layers(p, shot.codes, shot.tform, shot.nuisance_seed) for p in people]
    face = layers[0]["face"]
    assert all(torch.equal(layer["face"], face) for layer in layers)  # same codes: same mesh on screen
    maps = [world.albedo_map(p) for p in people]
    for a in range(len(people)):
        for b in range(a + 1, len(people)):
            hair_a = layers[a]["scalp_hair"] + layers[a]["hair_back"]
            hair_b = layers[b]["scalp_hair"] + layers[b]["hair_back"]
            assert (hair_a - hair_b).abs().amax() > 0.5  # hairlines and outlines differ
            assert (layers[a]["photo"] - layers[b]["photo"]).abs()[face.expand(-1, 3, -1, -1) > 0].mean() > 0.01
    # skin detail: moles (every identity has some) darken the albedo of its tex code at a few places
    for person, albedo_map in zip(people, maps):
        plain = world.albedo(person.tex[None])[0]
        darker = (plain - albedo_map).amax(0)
        assert 0.05 < float(darker.max()) and float((darker > 0.02).float().mean()) < 0.05
    # an identity's map is the same whether built alone (above) or with others in one batch
    world._maps.clear()
    world._albedo_groups(people[::-1])
    for person, albedo_map in zip(people, maps):
        assert torch.allclose(world.albedo_map(person), albedo_map, atol=1e-6)


def test_same_seed_same_bytes_other_seed_other_photos(tmp_path, world, rig):
    from diffrig.data.synthetic.world import SyntheticWorld

    first = world.write_folder(tmp_path / "a", [0, 5], 2)
    again = SyntheticWorld(rig=rig, size=SIZE, seed=0).write_folder(tmp_path / "b", [0, 5], 2)
    assert [p.name for p in first] == ["00000_0000.png", "00000_0001.png", "00005_0000.png", "00005_0001.png"]
    for path, twin in zip(first, again):
        assert path.read_bytes() == twin.read_bytes()
        assert sidecar_path(path).read_bytes() == sidecar_path(twin).read_bytes()
    # another order and batching draws the same photos (equal up to float rounding)
    shuffled = world.write_folder(tmp_path / "c", [5, 0], 2, batch_size=3)
    for path in first:
        twin = tmp_path / "c" / path.name
        difference = np.abs(np.asarray(Image.open(path), dtype=int) - np.asarray(Image.open(twin), dtype=int))
        assert difference.max() <= 1 and difference.mean() < 1e-3
        codes, twin_codes = (read_sidecar(sidecar_path(p)).codes.flat() for p in (path, twin))
        assert torch.allclose(codes, twin_codes)
    assert {p.name for p in shuffled} == {p.name for p in first}
    other = SyntheticWorld(rig=rig, size=SIZE, seed=1).write_folder(tmp_path / "d", [0], 1)
    assert other[0].read_bytes() != first[0].read_bytes()
    pixels = np.asarray(Image.open(first[0]))
    assert pixels.shape == (SIZE, SIZE, 3) and pixels.std() > 10


@pytest.mark.slow
def test_worker_processes_write_the_same_bytes(tmp_path, world):
    alone = world.write_folder(tmp_path / "one", [0, 1, 2], 2, batch_size=4)
    together = world.write_folder(tmp_path / "two", [0, 1, 2], 2, batch_size=4, workers=2)
    assert [p.name for p in together] == [p.name for p in alone]
    for path, twin in zip(alone, together):
        assert path.read_bytes() == twin.read_bytes()
        assert sidecar_path(path).read_bytes() == sidecar_path(twin).read_bytes()
    catalogue = [(folder / "world" / "identities.json").read_text() for folder in (tmp_path / "one", tmp_path / "two")]
    assert catalogue[0] == catalogue[1]


def test_photos_of_one_identity_share_it_and_vary_the_rest(tmp_path, world, rig):
    paths = world.write_folder(tmp_path, [2], 3, first_image=4)
    assert [p.name for p in paths] == ["00002_0004.png", "00002_0005.png", "00002_0006.png"]
    truths = [read_sidecar(sidecar_path(p)) for p in paths]
    for truth in truths[1:]:
        assert torch.equal(truth.codes.shape, truths[0].codes.shape)
        assert torch.equal(truth.codes.tex, truths[0].codes.tex)
        for name in ("exp", "pose", "light", "cam"):
            assert not torch.equal(getattr(truth.codes, name), getattr(truths[0].codes, name))
        assert truth.nuisance_seed != truths[0].nuisance_seed
    assert [t.image for t in truths] == [4, 5, 6] and {t.identity for t in truths} == {2}
    catalogue = json.loads((tmp_path / "world" / "identities.json").read_text())
    assert catalogue["00002"]["shape"] == pytest.approx(truths[0].codes.shape[0].tolist())
    world_file = json.loads((tmp_path / "world" / "world.json").read_text())
    assert world_file["seed"] == 0 and world_file["size"] == SIZE
    world.write_folder(tmp_path, [3], 1)  # more of the same world: the catalogue grows
    assert sorted(json.loads((tmp_path / "world" / "identities.json").read_text())) == ["00002", "00003"]
    from diffrig.data.synthetic.world import SyntheticWorld

    with pytest.raises(DataError, match="another synthetic world"):
        SyntheticWorld(rig=rig, size=SIZE, seed=9).write_folder(tmp_path, [3], 1)


def test_written_photo_is_the_truth_of_its_sidecar(tmp_path, world):
    """The PNG is exactly what render() gives for the sidecar's codes, crop and nuisance seed."""
    paths = world.write_folder(tmp_path, [1, 6], 1)
    truths = [read_sidecar(sidecar_path(p)) for p in paths]
    codes = RigCodes.cat([t.codes for t in truths])
    photos = world.render([world.identity(t.identity) for t in truths], codes, torch.stack([t.tform for t in truths]),
                          [t.nuisance_seed for t in truths])
    pixels = (photos * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for path, rendered in zip(paths, pixels):
        assert np.array_equal(np.asarray(Image.open(path)), rendered)


def test_edit_truth_swaps_what_the_codes_carry_and_keeps_the_rest(world):
    person = world.identity(4)
    shots = world.sample(person, [0, 1])
    source, target = shots.codes[0], shots.codes[1]
    seeds, tform = shots.nuisance_seed, shots.tform

    # a light edit changes the lit skin only: hair, clothes and backdrop stay put
    relit = world.render_layers(person, source.replace(light=target.light), tform[0], seeds[0])
    original = world.render_layers(person, source, tform[0], seeds[0])
    assert torch.equal(relit["face"], original["face"])
    skin = (original["face"] * (1 - original["scalp_hair"]) * (1 - original["clothes"]))[0, 0] > 0.99
    off_face = original["face"][0, 0] == 0
    difference = (relit["photo"] - original["photo"]).abs().amax(1)[0]
    assert difference[off_face].max() == 0
    assert difference[skin].mean() > 0.01

    # pose, expression and light of photo 1 in photo 0's frame: photo 1's head over photo 0's backdrop
    edited = source.replace(pose=target.pose, exp=target.exp, light=target.light)
    truth = world.render_layers(person, edited, tform[0], seeds[0])
    again = world.render_layers([person, person], RigCodes.cat([shots.codes[1], edited]), tform.flip(0),
                                [seeds[1], seeds[0]])  # another batch, another position in it
    assert torch.allclose(again["photo"][1], truth["photo"][0], atol=1e-5)
    assert not torch.equal(truth["face"], original["face"])
    background = (truth["face"] + original["face"] + truth["hair_back"] + original["hair_back"]
                  + truth["clothes"] + original["clothes"])[0, 0] == 0
    assert background.float().mean() > 0.1
    assert torch.equal(truth["photo"][0][:, background], original["photo"][0][:, background])
    # the same codes in photo 1's own frame and nuisance are photo 1
    assert torch.allclose(world.render(person, edited.replace(cam=target.cam), tform[1], seeds[1]),
                          world.render(person, target, tform[1], seeds[1]), atol=1e-6)


def test_face_matches_deca_buffers_and_framing_is_ffhq_like(world, rig):
    from diffrig.data.align import ffhq_quad
    from diffrig.deca.rig import DECA

    deca = DECA(torch.nn.Identity(), rig.flame, rig.albedo_space, rig.renderer)
    people = [world.identity(i) for i in range(6)]
    shots = world.sample(people, [0] * 6)
    layers = world.render_layers(people, shots.codes, shots.tform, shots.nuisance_seed)
    decoded = deca.decode(shots.codes, size=SIZE, tform=shots.tform)
    assert torch.equal(layers["face"], decoded.alpha)
    assert torch.allclose(layers["normal"], decoded.normal, atol=1e-5)
    # a centred FFHQ crop: the alignment rule on the true landmarks gives back the whole picture
    for landmarks in decoded.landmarks2d:
        pixels = ((landmarks + 1) * SIZE / 2 - 0.5).double().numpy()
        quad = ffhq_quad(pixels)
        centre, side = quad.mean(0), np.linalg.norm(quad[0] - quad[1])
        assert np.abs(centre - (SIZE - 1) / 2).max() < 0.08 * SIZE
        assert abs(math.log(side / SIZE)) < 0.15
    # DECA-like camera in the crop frame
    assert (shots.codes.cam[:, 0] > 5).all() and (shots.codes.cam[:, 0] < 15).all()


def test_edit_with_ffhq_centre_keeps_the_face_in_place(world, rig):
    from diffrig.deca.rig import DECA

    deca = DECA(torch.nn.Identity(), rig.flame, rig.albedo_space, rig.renderer)
    person = world.identity(7)
    shots = world.sample(person, [0, 1])
    centre = deca.ffhq_center(shots.codes[0])
    edited = shots.codes[0].replace(pose=shots.codes.pose[1:])
    layers = world.render_layers(person, edited, shots.tform[0], shots.nuisance_seed[0], ffhq_center=centre)
    decoded = deca.decode(edited, size=SIZE, tform=shots.tform[:1], ffhq_center=centre)
    assert torch.equal(layers["face"], decoded.alpha)


def test_uv_albedo_equals_the_albedo_space(world, rig):
    from diffrig.data.synthetic.world import UVAlbedo

    tex = torch.randn(2, 50, generator=torch.Generator().manual_seed(3))
    full = rig.albedo_space(tex)
    assert torch.allclose(UVAlbedo(rig.albedo_space)(tex), full, atol=1e-5)
    # 64² photos sample a 128² map: the space's map, nearest-neighbour resized
    assert world.albedo.size == world.atlas.size == 2 * SIZE
    smaller = torch.nn.functional.interpolate(full, size=2 * SIZE, mode="nearest")
    assert torch.allclose(world.albedo(tex), smaller, atol=1e-5)


def test_size_256_and_size_limits(rig):
    from diffrig.data.synthetic.world import SyntheticWorld

    big = SyntheticWorld(rig=rig, size=256, seed=0)
    person = big.identity(0)
    shot = big.sample(person, [0])
    layers = big.render_layers(person, shot.codes, shot.tform, shot.nuisance_seed)
    assert layers["photo"].shape == (1, 3, 256, 256)
    assert 0 <= float(layers["photo"].min()) and float(layers["photo"].max()) <= 1
    assert 0.2 < float(layers["face"].mean()) < 0.8
    for size in (32, 512):
        with pytest.raises(DataError, match="64 to 256"):
            SyntheticWorld(rig=rig, size=size)


def test_cli_writes_the_folder_and_reports_mistakes(tmp_path, world, capsys):
    from diffrig.data.synthetic.cli import main

    out = tmp_path / "album"
    assert main(["--identities", "1", "--first_identity", "9", "--per_identity", "3", "--size", "64",
                 "--output_dir", str(out), "--seed", "0", "--quiet"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["00009_0000.codes.safetensors", "00009_0000.png", "00009_0001.codes.safetensors",
                     "00009_0001.png", "00009_0002.codes.safetensors", "00009_0002.png", "world"]
    assert sorted(p.name for p in (out / "world").iterdir()) == ["identities.json", "world.json"]
    # the CLI's photos are the library's
    reference = world.write_folder(tmp_path / "lib", [9], 1)
    assert (out / "00009_0000.png").read_bytes() == reference[0].read_bytes()
    capsys.readouterr()
    assert main(["--identities", "1", "--size", "32", "--output_dir", str(tmp_path / "bad")]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error:") and "64 to 256" in error and error.count("\n") == 1
