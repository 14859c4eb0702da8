"""RigEditPipeline: code edits per mode, hand-set rigs, sampling, inversion, mean shape."""

import math
import pickle

import pytest
import torch
from kornia.geometry.conversions import axis_angle_to_rotation_matrix
from torch import nn

from diffrig import diffusion as D
from diffrig.deca.codes import CODE_SIZES, RigCodes
from diffrig.deca.render import sh_shading
from diffrig.errors import DataError, DiffrigError
from diffrig.models import DiffusionRigModel
from diffrig.pipeline import (EditResult, Portraits, RigEditPipeline, ddim_invert_loop, ddim_loop, edit_codes,
                              parse_modes, read_meanshape)
from diffrig.rigs import LIGHT_PRESETS, HandRig, head_angles, head_rotation, jaw_pose, light_preset, parse_light

S = 32


def random_codes(batch, seed):
    g = torch.Generator().manual_seed(seed)
    return RigCodes.from_flat(torch.randn(batch, sum(CODE_SIZES.values()), generator=g) * 0.3)


def changed_fields(before: RigCodes, after: RigCodes) -> set[str]:
    """Names of code fields (pose split into global/jaw) that differ."""
    out = {name for name in ("shape", "tex", "exp", "cam", "light")
           if not torch.equal(getattr(before, name), getattr(after, name))}
    if not torch.equal(before.pose[:, :3], after.pose[:, :3]):
        out.add("global_pose")
    if not torch.equal(before.pose[:, 3:], after.pose[:, 3:]):
        out.add("jaw_pose")
    return out


# --- modes and code edits ----------------------------------------------------------------------

def test_parse_modes_accepts_commas_spaces_lists_and_alias():
    assert parse_modes("pose,light exp") == ["pose", "light", "expression"]
    assert parse_modes(["pose", "light,expression", "exp"]) == ["pose", "light", "expression"]
    assert parse_modes(["LATENT"]) == ["latent"]
    with pytest.raises(DiffrigError, match="unknown edit mode 'smile'"):
        parse_modes("pose smile")


@pytest.mark.parametrize("mode, expected", [
    ("pose", {"global_pose"}),
    ("light", {"light"}),
    ("expression", {"exp", "jaw_pose"}),
    ("exp", {"exp", "jaw_pose"}),
    ("latent", set()),
])
def test_each_mode_changes_exactly_its_codes(mode, expected):
    source, target = random_codes(3, 0), random_codes(1, 1)
    kept = source.clone()
    edited = edit_codes(source, target, mode)
    assert changed_fields(source, edited) == expected
    assert changed_fields(kept, source) == set()  # the input is not modified
    if "global_pose" in expected:
        assert torch.equal(edited.pose[:, :3], target.pose[:, :3].expand(3, -1))
    if "light" in expected:
        assert torch.equal(edited.light, target.light.expand(3, -1, -1))
    if "exp" in expected:
        assert torch.equal(edited.exp, target.exp.expand(3, -1))
        assert torch.equal(edited.pose[:, 3:], target.pose[:, 3:].expand(3, -1))


def test_edit_needs_a_target_and_matching_batches():
    with pytest.raises(DiffrigError, match="target photo"):
        edit_codes(random_codes(2, 0), None, "pose")
    with pytest.raises(DiffrigError, match="one target, or one per source"):
        edit_codes(random_codes(3, 0), random_codes(2, 1), "light")
    per_source = edit_codes(random_codes(2, 0), random_codes(2, 1), "light")
    assert torch.equal(per_source.light, random_codes(2, 1).light)


# --- hand-set rigs -----------------------------------------------------------------------------

def nose_direction(axis_angle):
    return axis_angle_to_rotation_matrix(axis_angle) @ torch.tensor([0.0, 0.0, 1.0])


def test_head_rotation_convention_and_round_trip():
    # yaw turns the nose towards +x (the picture's right), pitch down (-y), roll spins about the nose
    assert torch.allclose(nose_direction(head_rotation(30.0)), torch.tensor([[0.5, 0.0, math.sqrt(3) / 2]]), atol=1e-6)
    assert torch.allclose(nose_direction(head_rotation(0.0, 30.0)), torch.tensor([[0.0, -0.5, math.sqrt(3) / 2]]),
                          atol=1e-6)
    assert torch.allclose(nose_direction(head_rotation(0.0, 0.0, 40.0)), torch.tensor([[0.0, 0.0, 1.0]]), atol=1e-6)
    angles = torch.tensor([[30.0, 10.0, -15.0], [-60.0, -25.0, 40.0], [5.0, 70.0, 3.0]])
    recovered = head_angles(head_rotation(angles[:, 0], angles[:, 1], angles[:, 2]))
    assert torch.allclose(recovered, angles, atol=1e-3)


def test_hand_yaw_zero_is_frontal_and_keeps_other_angles():
    source = random_codes(4, 2)
    source.pose[:, :3] = head_rotation(torch.tensor([35.0, -50.0, 20.0, 0.0]), torch.tensor([0.0, 0.0, 10.0, 15.0]),
                                       torch.tensor([0.0, 5.0, -8.0, 0.0]))
    edited = HandRig(yaw=0.0).apply(source)
    assert changed_fields(source, edited) == {"global_pose"}
    nose = nose_direction(edited.pose[:, :3])
    assert nose[:, 0].abs().max() < 1e-5  # no left-right turn left
    assert torch.allclose(head_angles(edited.pose[:, :3])[:, 1:], head_angles(source.pose[:, :3])[:, 1:], atol=1e-3)
    assert torch.allclose(edited.pose[0, :3], torch.zeros(3), atol=1e-6)  # pure yaw -> identity rotation
    frontal = HandRig(yaw=0, pitch=0, roll=0).apply(source)
    assert frontal.pose[:, :3].abs().max() < 1e-6


def test_hand_rig_sets_only_what_it_names():
    source = random_codes(2, 3)
    assert changed_fields(source, HandRig(light="left").apply(source)) == {"light"}
    assert changed_fields(source, HandRig(jaw=20.0).apply(source)) == {"jaw_pose"}
    assert changed_fields(source, HandRig(expression=[1.0, -0.5]).apply(source)) == {"exp"}
    both = HandRig(yaw=10.0, jaw=15.0, expression="0.5, 0.25", light="top").apply(source)
    assert changed_fields(source, both) == {"global_pose", "jaw_pose", "exp", "light"}
    assert torch.allclose(both.pose[:, 3:], jaw_pose(15.0).expand(2, 3))
    assert torch.allclose(jaw_pose(15.0), torch.tensor([[math.radians(15.0), 0.0, 0.0]]))
    assert torch.equal(both.exp[:, :2], torch.tensor([[0.5, 0.25]] * 2))
    assert torch.count_nonzero(both.exp[:, 2:]) == 0
    assert HandRig().is_empty and not HandRig(roll=0.0).is_empty
    with pytest.raises(DiffrigError, match="50 expression coefficients"):
        HandRig(expression=[0.1] * 51).apply(source)


def test_light_presets_shade_positively_and_point_where_named():
    normals = torch.nn.functional.normalize(torch.randn(1, 3, 4000, 1, generator=torch.Generator().manual_seed(0)),
                                            dim=1)
    probe = torch.tensor([[1.0, 0, 0], [-1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0, 0, -1.0]]).T.reshape(1, 3, 5, 1)
    for name in LIGHT_PRESETS:
        light = light_preset(name)
        assert light.shape == (9, 3)
        assert torch.equal(light[:, 0], light[:, 2])  # white
        shading = sh_shading(normals, light[None])
        assert shading.min() > 0.15 and shading.max() < 1.4, name
    right, left, up, front, back = sh_shading(probe, light_preset("right")[None])[0, 0, :, 0]
    assert right > left + 0.5 and right > front
    right, left, up, front, back = sh_shading(probe, light_preset("left")[None])[0, 0, :, 0]
    assert left > right + 0.5
    right, left, up, front, back = sh_shading(probe, light_preset("top")[None])[0, 0, :, 0]
    assert up > max(left, right, back)
    right, left, up, front, back = sh_shading(probe, light_preset("rim")[None])[0, 0, :, 0]
    assert back > front + 0.5
    with pytest.raises(DiffrigError, match="unknown light preset 'sunset'"):
        light_preset("sunset")


def test_parse_light_grey_rgb_and_bad_counts():
    grey = parse_light("3.5 0 0 0.4 0 0 0 0 0")
    assert grey.shape == (9, 3) and torch.equal(grey[:, 0], grey[:, 1]) and grey[3, 2] == pytest.approx(0.4)
    rgb = parse_light(list(range(27)))
    assert rgb[1].tolist() == [3.0, 4.0, 5.0]  # coefficient-major, as DECA's flat light code
    assert torch.equal(parse_light("FRONT"), light_preset("front"))
    with pytest.raises(DiffrigError, match="9 \\(grey\\) or 27"):
        parse_light([1.0, 2.0])


# --- mean shape ----------------------------------------------------------------------------------

def test_read_meanshape_official_pickle_safetensors_npy(tmp_path):
    shape = torch.randn(1, 100)
    official = tmp_path / "mean_shape.pkl"
    official.write_bytes(pickle.dumps(shape))  # what the official create_data.py writes
    assert torch.equal(read_meanshape(official), shape)
    from safetensors.torch import save_file
    save_file({"shape": shape[0]}, tmp_path / "mean_shape.safetensors")
    assert torch.equal(read_meanshape(tmp_path / "mean_shape.safetensors"), shape)
    import numpy as np
    np.save(tmp_path / "mean_shape.npy", shape.numpy())
    assert torch.equal(read_meanshape(tmp_path / "mean_shape.npy"), shape)
    with pytest.raises(DataError, match="not found"):
        read_meanshape(tmp_path / "missing.pkl")
    np.save(tmp_path / "short.npy", shape[:, :50].numpy())
    with pytest.raises(DataError, match="100 FLAME shape"):
        read_meanshape(tmp_path / "short.npy")


def test_read_meanshape_refuses_code_in_pickles(tmp_path):
    from diffrig.errors import UnsafePickleError

    class Evil:
        def __reduce__(self):
            return (print, ("never run",))

    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(UnsafePickleError, match=r"evil.pkl names the global 'builtins.print'"):
        read_meanshape(evil)


# --- a stand-in rig: buffers as a smooth function of the codes -----------------------------------

class FieldRig(nn.Module):
    """DECA's interface (encode / ffhq_center / decode) with buffers computed from the codes."""

    def __init__(self):
        super().__init__()
        self.register_buffer("anchor", torch.zeros(1))
        self.centres = []

    def ffhq_center(self, codes):
        return codes.shape[:, :3] * 0.1 + codes.pose[:, :3] * 0.01

    def decode(self, codes, size, tform=None, ffhq_center=None, render=True):
        self.centres.append(ffhq_center)
        h, w = size
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        yaw, pitch = codes.pose[:, 0, None, None], codes.pose[:, 1, None, None]
        alpha = ((xx - 0.5 * yaw) ** 2 + (yy - 0.5 * pitch) ** 2 < 0.4).float()[:, None]
        shade = (codes.light[:, 0, :, None, None] * 0.3 + 0.5 + 0.1 * codes.exp[:, :3, None, None] * yy)
        normal = torch.stack([xx - 0.5 * yaw, yy - 0.5 * pitch, torch.ones_like(xx + yaw)], 1)
        albedo = 0.5 + 0.2 * torch.tanh(codes.shape[:, :3, None, None] + codes.tex[:, :3, None, None])
        albedo = albedo.expand(-1, 3, h, w)
        out = type("Out", (), {})()
        out.alpha = alpha
        out.buffers = torch.cat([shade * albedo * alpha, normal * alpha, albedo * alpha], 1)
        return out


def tiny_model(seed=0, latent_dim=16):
    torch.manual_seed(seed)
    return DiffusionRigModel(image_size=S, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                             attention_resolutions="", dropout=0.0, latent_dim=latent_dim).eval()


def portraits(batch, seed):
    g = torch.Generator().manual_seed(seed)
    return Portraits(torch.rand(batch, 3, S, S, generator=g), random_codes(batch, seed),
                     torch.eye(3).repeat(batch, 1, 1),
                     [f"p{seed}_{i}" for i in range(batch)])


@pytest.fixture(scope="module")
def pipeline():
    return RigEditPipeline(tiny_model(), FieldRig())


def test_edit_renders_each_mode_at_the_source_centre_and_batches_exactly(pipeline):
    sources, target = portraits(3, 0), portraits(1, 7)
    pipeline.deca.centres.clear()
    result = pipeline.edit(sources, target, modes="pose light exp latent", rig=HandRig(yaw=0.0),
                           num_inference_steps=2, batch_size=4, invert=False)
    assert result.modes == ["pose", "light", "expression", "latent", "rig"]
    own_centre = pipeline.deca.ffhq_center(sources.codes)
    assert all(torch.equal(c, own_centre) for c in pipeline.deca.centres)
    for mode in result.modes:
        assert result.edits[mode].shape == (3, 3, S, S)
        assert 0 <= result.edits[mode].min() and result.edits[mode].max() <= 1
        assert result.buffers[mode].shape == (3, 9, S, S) and result.masks[mode].shape == (3, 1, S, S)
    # the buffers change only where the edit changes codes
    assert torch.equal(result.buffers["latent"], pipeline.render(sources.codes, sources.tforms, own_centre)[0])
    assert not torch.equal(result.buffers["pose"], result.buffers["latent"])
    # each edit equals raw sampling from the shared seeded noise (batching changes nothing)
    latent = pipeline.encode_latent(sources.images)
    alone = pipeline.generate(result.buffers["light"][1:2], latent[1:2], num_inference_steps=2)
    assert torch.allclose(result.edits["light"][1:2], ((alone + 1) / 2).clamp(0, 1), atol=1e-5)
    target_latent = pipeline.encode_latent(target.images).expand(3, -1)
    latent_edit = pipeline.generate(result.buffers["latent"], target_latent, num_inference_steps=2)
    assert torch.allclose(result.edits["latent"], ((latent_edit + 1) / 2).clamp(0, 1), atol=1e-5)
    grid = result.grid()
    assert grid.shape == (3, 3 * (S + 2) + 2, 12 * (S + 2) + 2)


def test_edit_uses_the_mean_shape_but_centres_with_the_own_shape():
    meanshape = torch.full((1, 100), 0.7)
    pipeline = RigEditPipeline(tiny_model(), FieldRig(), meanshape=meanshape)
    sources, target = portraits(2, 1), portraits(1, 2)
    result = pipeline.edit(sources, target, modes=["light"], num_inference_steps=2, invert=False)
    assert torch.equal(result.codes["light"].shape, meanshape.expand(2, -1))
    assert torch.equal(pipeline.deca.centres[-1], pipeline.deca.ffhq_center(sources.codes))


def test_edit_reports_missing_inputs(pipeline):
    sources = portraits(1, 0)
    with pytest.raises(DiffrigError, match="nothing to edit"):
        pipeline.edit(sources)
    with pytest.raises(DiffrigError, match="target photo"):
        pipeline.edit(sources, modes="light")
    with pytest.raises(DiffrigError, match="inversion is DDIM"):
        pipeline.edit(sources, rig=HandRig(jaw=5.0), invert=True, scheduler="euler")


# --- sampling -------------------------------------------------------------------------------------

class RecordingDenoiser(nn.Module):
    """ε that depends on x, t and the buffers; records every call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, noisy, timesteps, buffers, latent=None, image=None):
        eps = torch.tanh(noisy * 0.7 + buffers[:, :3]) * (1 + timesteps.float()[:, None, None, None] / 1000)
        self.calls.append((noisy.clone(), timesteps.clone(), eps.clone()))
        return eps


def test_ddim20_steps_follow_the_closed_form_update():
    denoiser = RecordingDenoiser()
    pipeline = RigEditPipeline(tiny_model(), None)
    pipeline.denoiser = denoiser
    g = torch.Generator().manual_seed(3)
    buffers, noise = torch.randn(2, 9, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    out = pipeline.generate(buffers, torch.zeros(2, 16), noise, timestep_respacing="ddim20")
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alpha_bar = torch.cumprod(1 - betas, 0)
    assert [int(c[1][0]) for c in denoiser.calls] == list(range(950, -1, -50))
    x = noise.double()
    for noisy, t, eps in denoiser.calls:
        assert torch.allclose(noisy.double(), x, atol=1e-5)
        a, a_prev = alpha_bar[int(t[0])], (alpha_bar[int(t[0]) - 50] if t[0] > 0 else torch.tensor(1.0))
        x0 = ((x - (1 - a).sqrt() * eps.double()) / a.sqrt()).clamp(-1, 1)
        eps_clipped = (x - a.sqrt() * x0) / (1 - a).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps_clipped
    assert torch.allclose(out.double(), x, atol=1e-5)


def test_ddim_loop_equals_diffusion_sample_and_noise_is_shared(pipeline):
    g = torch.Generator().manual_seed(4)
    buffers, latent = torch.randn(3, 9, S, S, generator=g), torch.randn(3, 16, generator=g)
    noise = pipeline.noise(3, seed=5)
    assert torch.equal(noise[0], noise[2]) and torch.equal(noise[:1], D.seeded_noise((1, 3, S, S), 5))
    steps = D.respaced_timesteps("ddim5")
    ours = ddim_loop(pipeline.model, noise, buffers, latent, steps, pipeline.schedule)
    reference = D.sample(pipeline.model, buffers, latent, noise, timestep_respacing="ddim5")
    assert torch.equal(ours, reference)
    assert torch.equal(pipeline.generate(buffers, latent, num_inference_steps=5, seed=5), reference)
    image = torch.rand(3, 3, S, S, generator=g) * 2 - 1
    inverted = ddim_invert_loop(pipeline.model, image, buffers, latent, steps, pipeline.schedule)
    assert torch.equal(inverted, D.ddim_invert(pipeline.model, image, buffers, latent, timestep_respacing="ddim5"))


def test_generate_with_a_diffusers_scheduler_and_the_fast_sampling_denoisers():
    pipeline = RigEditPipeline(tiny_model(), None)
    with torch.no_grad():  # an output layer that is not zero: ε depends on the weights' precision
        for parameter in pipeline.model.unet.conv_out.parameters():
            parameter.normal_(0, 0.05)
    g = torch.Generator().manual_seed(6)
    buffers, latent = torch.randn(2, 9, S, S, generator=g), torch.randn(2, 16, generator=g)
    euler = pipeline.generate(buffers, latent, num_inference_steps=3, scheduler="euler")
    ddim = pipeline.generate(buffers, latent, num_inference_steps=3)
    assert euler.shape == ddim.shape == (2, 3, S, S) and not torch.allclose(euler, ddim)
    pipeline.enable_fast_sampling(dtype=None, channels_last=True, cuda_graphs=False)
    assert torch.allclose(pipeline.generate(buffers, latent, num_inference_steps=3), ddim, atol=1e-5)
    pipeline.enable_fast_sampling(dtype=torch.bfloat16, cuda_graphs=False)  # a bf16 copy of the UNet samples
    fast = pipeline.generate(buffers, latent, num_inference_steps=3)
    assert fast.dtype == torch.float32 and 0 < (fast - ddim).abs().mean() < 0.01
    assert all(p.dtype == torch.float32 for p in pipeline.model.parameters())  # the model itself is untouched


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_fast_sampling_refuses_a_compile_mode_with_graphs_of_its_own_inside_the_loop_graph(mode):
    pipeline = RigEditPipeline(tiny_model(), None)
    with pytest.raises(DiffrigError, match="max-autotune-no-cudagraphs"):
        pipeline.enable_fast_sampling(compile=True, compile_mode=mode)
    pipeline.enable_fast_sampling(compile=True, compile_mode=mode, cuda_graphs=False)  # compiled on first use
    assert hasattr(pipeline.denoiser.unet, "_orig_mod")  # a torch.compile wrapper
    with pytest.raises(DiffrigError, match="unknown compile_mode 'turbo'"):
        pipeline.enable_fast_sampling(compile=True, compile_mode="turbo")


def train_tiny(steps=30):
    """A tiny model trained for a few dozen steps on four smooth pictures with matching buffers."""
    torch.manual_seed(0)
    model = tiny_model().train()
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, S), torch.linspace(-1, 1, S), indexing="ij")
    images, buffers = [], []
    for k in range(4):
        c = torch.rand(3, 3, generator=torch.Generator().manual_seed(k)) * 2 - 1
        disc = ((xx - 0.3 * c[0, 0]) ** 2 + (yy - 0.3 * c[1, 1]) ** 2 < 0.3).float()
        image = torch.stack([torch.tanh(c[i, 0] * 2 * xx + c[i, 1] * 2 * yy + c[i, 2]) for i in range(3)])
        image = (0.6 * image + 0.4 * disc).clamp(-1, 1)
        images.append(image)
        buffers.append(torch.cat([disc.expand(3, -1, -1), torch.stack([xx * disc, yy * disc, disc]), image * disc]))
    images, buffers = torch.stack(images), torch.stack(buffers)
    latent = torch.zeros(4, 16)
    optimizer = torch.optim.AdamW(model.unet.parameters(), lr=2e-3)
    schedule = D.make_schedule()
    for _ in range(steps):
        t = D.sample_timesteps(4, schedule)
        loss = D.training_loss(model, images, buffers, t, torch.randn_like(images), latent=latent, schedule=schedule)
        optimizer.zero_grad()
        loss.mean().backward()
        optimizer.step()
    return model.eval(), (images + 1) / 2, buffers, latent


def test_inversion_reconstructs_better_than_fixed_noise():
    model, images, buffers, latent = train_tiny()
    pipeline = RigEditPipeline(model, None)
    start = pipeline.invert(images, buffers, latent, num_inference_steps=10)
    inverted = (pipeline.generate(buffers, latent, start, num_inference_steps=10) + 1) / 2
    fixed = (pipeline.generate(buffers, latent, seed=0, num_inference_steps=10) + 1) / 2
    error_inverted = (inverted - images).pow(2).mean()
    error_fixed = (fixed - images).pow(2).mean()
    assert error_inverted < 0.1 * error_fixed, (error_inverted, error_fixed)


def test_edit_result_grid_without_target():
    sources = portraits(2, 3)
    result = EditResult(sources=sources, target=None, edits={"rig": torch.zeros(2, 3, S, S)},
                        buffers={"rig": torch.full((2, 9, S, S), 0.5)}, masks={}, codes={})
    grid = result.grid()
    assert grid.shape == (3, 2 * (S + 2) + 2, 4 * (S + 2) + 2)
    target_tile = grid[:, 2:2 + S, S + 4:2 * S + 4]
    assert torch.equal(target_tile, torch.ones_like(target_tile))  # blank target column
    buffer_tile = grid[:, 2:2 + S, 2 * S + 6:3 * S + 6]
    assert torch.allclose(buffer_tile, torch.full_like(buffer_tile, 0.5))


def test_pipeline_is_exported_lazily_from_the_package():
    import diffrig

    assert diffrig.RigEditPipeline is RigEditPipeline
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        diffrig.Nope  # noqa: B018


def test_inverted_edit_starts_from_the_inversion_under_the_own_buffers(pipeline):
    sources, target = portraits(2, 4), portraits(1, 5)
    result = pipeline.edit(sources, target, modes="pose", num_inference_steps=2, invert=True)
    centre = pipeline.deca.ffhq_center(sources.codes)
    own_buffers, _ = pipeline.render(sources.codes, sources.tforms, centre)
    latent = pipeline.encode_latent(sources.images)
    start = pipeline.invert(sources.images, own_buffers, latent, num_inference_steps=2)
    expected = pipeline.generate(result.buffers["pose"], latent, start, num_inference_steps=2)
    assert torch.allclose(result.edits["pose"], ((expected + 1) / 2).clamp(0, 1), atol=1e-5)
    fixed = pipeline.edit(sources, target, modes="pose", num_inference_steps=2, invert=False)
    assert not torch.allclose(fixed.edits["pose"], result.edits["pose"], atol=1e-3)


# --- what a Python caller gets for inputs of the wrong kind ----------------------------------------

def test_ancestral_sampling_is_reproducible_by_seed():
    pipeline = RigEditPipeline(tiny_model(), None)
    g = torch.Generator().manual_seed(8)
    buffers, latent = torch.randn(2, 9, S, S, generator=g), torch.randn(2, 16, generator=g)
    first = pipeline.generate(buffers, latent, scheduler="ddpm", num_inference_steps=3, seed=5)
    again = pipeline.generate(buffers, latent, scheduler="ddpm", num_inference_steps=3, seed=5)
    other = pipeline.generate(buffers, latent, scheduler="ddpm", num_inference_steps=3, seed=6,
                              noise=pipeline.noise(2, 5))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)  # same x_T, other per-step noise


def test_photos_of_the_wrong_type_or_range_are_refused_by_name(pipeline):
    images = torch.rand(2, 3, S, S)
    buffers, latent = torch.zeros(2, 9, S, S), torch.zeros(2, 16)
    with pytest.raises(TypeError, match="images.*uint8"):
        pipeline.encode_latent((images * 255).to(torch.uint8))
    with pytest.raises(TypeError, match="images.*uint8"):
        pipeline.invert((images * 255).to(torch.uint8), buffers, latent)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pipeline.invert(images * 2 - 1, buffers, latent)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pipeline.encode_latent(images * 255)
    with pytest.raises(ValueError, match="shape"):
        pipeline.encode_latent(images[0])
    with pytest.raises(TypeError, match="ndarray"):
        pipeline.encode_latent(images.numpy())


def test_sampling_inputs_that_do_not_fit_are_refused_by_name(pipeline):
    buffers, latent = torch.zeros(3, 9, S, S), torch.zeros(3, 16)
    with pytest.raises(ValueError, match="noise"):
        pipeline.generate(buffers, latent, noise=torch.zeros(2, 3, S, S))
    with pytest.raises(ValueError, match="latent"):
        pipeline.generate(buffers, torch.zeros(3, 64))
    with pytest.raises(ValueError, match="buffers"):
        pipeline.generate(buffers[:, :8], latent)
    with pytest.raises(ValueError, match="images"):
        pipeline.invert(torch.rand(3, 3, 2 * S, 2 * S), buffers, latent)
    assert pipeline.generate(buffers, latent[:1], num_inference_steps=2).shape == (3, 3, S, S)


def test_edit_and_call_arguments_of_the_wrong_kind(pipeline):
    with pytest.raises(DiffrigError, match="batch_size"):
        pipeline.edit(portraits(1, 0), rig=HandRig(yaw=10), batch_size=0)
    with pytest.raises(TypeError, match="Portraits"):
        pipeline(torch.rand(1, 3, S, S), rig=HandRig(yaw=10))
    with pytest.raises(TypeError, match="Portraits"):
        pipeline.edit(torch.rand(1, 3, S, S), rig=HandRig(yaw=10))


def test_mean_shape_given_in_memory():
    import numpy as np

    values = np.linspace(-1, 1, 100)  # float64: stored as the float32 codes use
    pipeline = RigEditPipeline(tiny_model(), None, meanshape=values)
    assert pipeline.meanshape.dtype == torch.float32
    assert torch.equal(pipeline.meanshape, torch.from_numpy(values).float()[None])
    codes = pipeline.with_meanshape(random_codes(2, 0))
    assert torch.equal(codes.shape, pipeline.meanshape.expand(2, -1))
    with pytest.raises(ValueError, match="100"):
        RigEditPipeline(tiny_model(), None, meanshape=torch.zeros(50))
