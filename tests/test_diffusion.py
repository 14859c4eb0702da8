"""Noise schedule, P2 loss, DDIM sampling/inversion and diffusers schedulers (diffrig.diffusion)."""

import math

import pytest
import torch
import torch.nn as nn
from diffusers import DDIMInverseScheduler, DDIMScheduler

from diffrig import diffusion as D
from diffrig.errors import DiffrigError

H = 8


class TinyDenoiser(nn.Module):
    """Stand-in with the model's call signature; records what it was called with."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(12, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 3, 3, padding=1))
        self.encoder = nn.Linear(3, 64)
        self.from_latent = nn.Linear(64, 8)
        self.calls = []

    def encode_latent(self, image):
        return self.encoder(image.mean(dim=(2, 3)))

    def forward(self, noisy, timesteps, buffers, latent=None, image=None):
        self.calls.append(dict(timesteps=timesteps.clone(), latent=latent, image=image))
        if latent is None:
            latent = self.encode_latent(image)
        h = self.body[0](torch.cat([noisy, buffers], 1)) + self.from_latent(latent)[:, :, None, None]
        h = h + torch.cos(timesteps.float() / 100.0)[:, None, None, None]
        return self.body[2](self.body[1](h))


class XIndependentEps(nn.Module):
    """ε that ignores x (a function of buffers and t): DDIM is then exactly invertible."""

    def forward(self, noisy, timesteps, buffers, latent=None, image=None):
        phase = torch.cos(timesteps.float() / 300.0)[:, None, None, None]
        return torch.sin(3 * buffers[:, :3]) + 0.5 * phase * buffers[:, 3:6]


class GaussianDataEps(nn.Module):
    """The exact ε = E[n | x_t] when every pixel of x₀ is N(mu, s²), mu given by the buffers."""

    def __init__(self, schedule, s):
        super().__init__()
        self.acp = schedule.alphas_cumprod
        self.s = s

    def forward(self, noisy, timesteps, buffers, latent=None, image=None):
        a = self.acp[timesteps.long().cpu()].to(noisy)[:, None, None, None]
        mu = 0.5 * torch.tanh(buffers[:, :3])
        return (1 - a).sqrt() * (noisy - a.sqrt() * mu) / (a * self.s**2 + 1 - a)


def batch(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(b, 3, H, H, generator=g) * 2 - 1
    buffers = torch.rand(b, 9, H, H, generator=g) * 2 - 1
    noise = torch.randn(b, 3, H, H, generator=g)
    return image, buffers, noise


def alpha_bar_closed_form(t, num_steps=1000):
    scale = 1000 / num_steps
    start, end = 1e-4 * scale, 0.02 * scale
    return math.prod(1 - (start + (end - start) * i / (num_steps - 1)) for i in range(t + 1))


def test_schedule_is_official_linear():
    s = D.make_schedule()
    assert s.num_train_timesteps == 1000
    assert s.betas.dtype == torch.float64
    assert s.betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert s.betas[-1].item() == pytest.approx(0.02, rel=1e-12)
    for t in (0, 1, 499, 950, 999):
        assert s.alpha_bar(t) == pytest.approx(alpha_bar_closed_form(t), rel=1e-12)
    assert s.alpha_bar(-1) == 1.0
    short = D.make_schedule(500)
    assert short.betas[0].item() == pytest.approx(2e-4) and short.betas[-1].item() == pytest.approx(0.04)
    assert short.alpha_bar(10) == pytest.approx(alpha_bar_closed_form(10, 500), rel=1e-12)
    with pytest.raises(DiffrigError, match="num_train_timesteps must be at least 2, got 1"):
        D.make_schedule(1)


def test_p2_weights_equal_closed_form():
    t = torch.tensor([0, 1, 10, 250, 500, 999])
    for gamma, k in ((1.0, 1.0), (0.5, 2.0)):
        s = D.make_schedule(p2_gamma=gamma, p2_k=k)
        weights = s.p2_weight(t)
        assert weights.dtype == torch.float32 and weights.shape == (6,)
        for w, ti in zip(weights.tolist(), t.tolist()):
            a = alpha_bar_closed_form(ti)
            assert w == pytest.approx((k + a / (1 - a)) ** -gamma, rel=1e-6)
    # γ = k = 1 (official) reduces to 1 - ᾱ_t
    ones = D.make_schedule().p2_weight(t).double()
    torch.testing.assert_close(ones, 1 - D.make_schedule().alphas_cumprod[t], rtol=1e-6, atol=0)


def test_add_noise_matches_closed_form():
    image, _, noise = batch()
    t = torch.tensor([3, 900])
    noisy = D.make_schedule().add_noise(image, noise, t)
    for i, ti in enumerate(t.tolist()):
        a = alpha_bar_closed_form(ti)
        torch.testing.assert_close(noisy[i], math.sqrt(a) * image[i] + math.sqrt(1 - a) * noise[i])


def test_training_loss_equals_manual_computation():
    model = TinyDenoiser()
    image, buffers, noise = batch(3)
    t = torch.tensor([0, 400, 999])
    loss = D.training_loss(model, image, buffers, t, noise)
    assert loss.shape == (3,)
    # without a latent the model encodes it from the clean image (the official x_start)
    assert model.calls[-1]["latent"] is None and torch.equal(model.calls[-1]["image"], image)
    assert torch.equal(model.calls[-1]["timesteps"], t)
    for i, ti in enumerate(t.tolist()):
        a = alpha_bar_closed_form(ti)
        x_t = math.sqrt(a) * image[i:i + 1] + math.sqrt(1 - a) * noise[i:i + 1]
        eps = model(x_t, t[i:i + 1], buffers[i:i + 1], image=image[i:i + 1])
        expected = (1 - a) * ((noise[i] - eps[0]) ** 2).mean()
        assert loss[i].item() == pytest.approx(expected.item(), rel=1e-5)
    loss.sum().backward()  # differentiable for training
    assert model.body[0].weight.grad is not None

    latent = torch.randn(3, 64)
    with torch.no_grad():
        with_latent = D.training_loss(model, image, buffers, t, noise, latent=latent)
    assert model.calls[-1]["latent"] is latent and model.calls[-1]["image"] is None
    assert not torch.allclose(with_latent, loss.detach())


def test_sample_timesteps_uniform_range():
    g = torch.Generator().manual_seed(0)
    t = D.sample_timesteps(4000, D.make_schedule(), generator=g)
    assert t.dtype == torch.long and t.shape == (4000,)
    assert t.min() >= 0 and t.max() <= 999
    assert 400 < t.float().mean() < 600


def test_ddim_timesteps_follow_official_rule():
    assert D.respaced_timesteps("ddim20") == [0, 50, 100, 150, 200, 250, 300, 350, 400, 450, 500, 550,
                                              600, 650, 700, 750, 800, 850, 900, 950]
    # smallest stride whose range(0, 1000, stride) has 30 entries is 34
    ddim30 = D.respaced_timesteps("ddim30")
    assert len(ddim30) == 30 and ddim30[:3] == [0, 34, 68] and ddim30[-1] == 986
    assert D.respaced_timesteps("ddim10", 100) == list(range(0, 100, 10))
    # section counts: first and last step of each section, rounded strides in between
    assert D.respaced_timesteps("4") == [0, 333, 666, 999]
    assert D.respaced_timesteps(10) == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert D.respaced_timesteps("2,3") == [0, 499, 500, 750, 999]
    for bad, reason in (("ddim999", "no integer stride splits 1000 timesteps into exactly 999 DDIM steps"),
                        ("ddimx", "cannot read timestep respacing 'ddimx'"),
                        ("fast", "cannot read timestep respacing 'fast'"),
                        ("5,600", "cannot take 600 steps from a section of 500 timesteps")):
        with pytest.raises(DiffrigError, match=reason):
            D.respaced_timesteps(bad)


def test_ddim_step_equals_closed_form_update():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, H, H, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 3, H, H, generator=g, dtype=torch.float64)
    s = D.make_schedule()
    for t, t_prev in ((950, 900), (500, 450), (50, 0), (0, -1)):
        a, a_prev = s.alpha_bar(t), s.alpha_bar(t_prev)
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)  # DDIM eq. 12 with η = 0
        expected = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
        got, got_x0 = D.ddim_step(x, eps, a, a_prev, clip_sample=False)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got_x0, x0, rtol=1e-10, atol=1e-10)
        # clipping: x₀ clamped, ε re-derived from the clamped x₀
        x0c = x0.clamp(-1, 1)
        eps_c = (x - math.sqrt(a) * x0c) / math.sqrt(1 - a)
        got_c, _ = D.ddim_step(x, eps, a, a_prev, clip_sample=True)
        torch.testing.assert_close(got_c, math.sqrt(a_prev) * x0c + math.sqrt(1 - a_prev) * eps_c)
    # the same update run upwards undoes a downward step when ε is unchanged
    down, _ = D.ddim_step(x, eps, s.alpha_bar(700), s.alpha_bar(650), clip_sample=False)
    up, _ = D.ddim_step(down, eps, s.alpha_bar(650), s.alpha_bar(700), clip_sample=False)
    torch.testing.assert_close(up, x, rtol=1e-10, atol=1e-10)


def test_ddim_step_matches_diffusers_scheduler():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, H, H, generator=g) * 2
    eps = torch.randn(2, 3, H, H, generator=g)
    s = D.make_schedule()
    sch = DDIMScheduler(**{k: v for k, v in s.diffusers_config().items() if k != "variance_type"},
                        set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
    sch.set_timesteps(20)
    for t in (950, 400, 0):
        ours, _ = D.ddim_step(x, eps, s.alpha_bar(t), s.alpha_bar(t - 50), clip_sample=True)
        theirs = sch.step(eps, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_sample_runs_official_ddim20_chain():
    model = TinyDenoiser()
    image, buffers, noise = batch()
    latent = torch.randn(2, 64)
    out = D.sample(model, buffers, latent, noise)
    assert out.shape == noise.shape and torch.isfinite(out).all()
    assert out.abs().max() <= 1.0 + 1e-6  # the last step lands on the clipped x₀
    called = [c["timesteps"].tolist() for c in model.calls]
    assert called == [[t, t] for t in range(950, -1, -50)]
    assert all(c["latent"] is latent for c in model.calls)
    # same chain as diffusers' DDIMScheduler ("leading" spacing equals ddim20 for 20 steps)
    sch = D.make_scheduler("DDIMScheduler")
    assert sch.config.timestep_spacing == "leading" and sch.config.steps_offset == 0
    sch.set_timesteps(20)
    x = noise
    with torch.no_grad():
        for t in sch.timesteps:
            x = sch.step(model(x, t.repeat(2), buffers, latent=latent), t, x, use_clipped_model_output=True).prev_sample
    torch.testing.assert_close(out, x, rtol=1e-4, atol=1e-4)
    model.calls.clear()
    torch.testing.assert_close(D.sample(model, buffers, latent, noise, scheduler="DDIM"), out, rtol=0, atol=0)
    # an explicit respacing overrides num_inference_steps
    model.calls.clear()
    D.sample(model, buffers, latent, noise, num_inference_steps=99, timestep_respacing="ddim4")
    assert [c["timesteps"][0].item() for c in model.calls] == [750, 500, 250, 0]


def test_inversion_then_sampling_reconstructs_exactly_for_x_independent_eps():
    image, buffers, _ = batch()
    image = image * 0.9
    model = XIndependentEps()
    x_T = D.ddim_invert(model, image, buffers, latent=None)
    recon = D.sample(model, buffers, None, x_T)
    torch.testing.assert_close(recon, image, rtol=0, atol=1e-4)
    # x_T carries the image: another start gives another result
    other = D.sample(model, buffers, None, D.seeded_noise(image.shape, seed=3))
    assert (other - image).abs().mean() > 0.1


def test_inversion_matches_diffusers_inverse_scheduler():
    model = TinyDenoiser()
    image, buffers, _ = batch()
    latent = torch.randn(2, 64)
    ours = D.ddim_invert(model, image, buffers, latent, clip_sample=False)
    sch = DDIMInverseScheduler(**{k: v for k, v in D.make_schedule().diffusers_config().items()
                                  if k not in ("variance_type", "clip_sample")},
                               clip_sample=False, set_alpha_to_one=True)
    sch.set_timesteps(20)
    assert sch.timesteps.tolist() == D.respaced_timesteps("ddim20")
    x = image
    with torch.no_grad():
        for t in sch.timesteps:
            x = sch.step(model(x, t.repeat(2), buffers, latent=latent), t, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


def test_inversion_then_sampling_beats_random_noise_for_gaussian_data():
    s = D.make_schedule()
    spread = 0.5
    model = GaussianDataEps(s, spread)
    _, buffers, z = batch(seed=4)
    image = (0.5 * torch.tanh(buffers[:, :3]) + spread * z).clamp(-1, 1)  # a draw from the model's data
    errors = []
    for steps in (20, 50):
        x_T = D.ddim_invert(model, image, buffers, latent=None, num_inference_steps=steps)
        recon = D.sample(model, buffers, None, x_T, num_inference_steps=steps)
        errors.append((recon - image).abs().mean().item())
    from_noise = D.sample(model, buffers, None, D.seeded_noise(image.shape, seed=5))
    assert errors[0] < 0.2 * (from_noise - image).abs().mean().item()
    assert errors[1] < 0.6 * errors[0]  # the ODE discretisation error shrinks with more steps


@pytest.mark.parametrize("name, class_name, stochastic", [
    ("ddpm", "DDPMScheduler", True), ("dpm++", "DPMSolverMultistepScheduler", False),
    ("euler", "EulerDiscreteScheduler", False), ("euler-a", "EulerAncestralDiscreteScheduler", True),
    ("heun", "HeunDiscreteScheduler", False), ("pndm", "PNDMScheduler", False),
    ("unipc", "UniPCMultistepScheduler", False), ("DDIMScheduler", "DDIMScheduler", False),
])
def test_diffusers_schedulers_by_name(name, class_name, stochastic):
    sch = D.make_scheduler(name)
    assert type(sch).__name__ == class_name
    torch.testing.assert_close(sch.betas.double(), D.make_schedule().betas, rtol=1e-5, atol=0)
    model = TinyDenoiser()
    _, buffers, noise = batch()
    latent = torch.randn(2, 64)
    out = D.sample(model, buffers, latent, noise, num_inference_steps=4, scheduler=name,
                   generator=torch.Generator().manual_seed(0))
    assert out.shape == noise.shape and out.dtype == noise.dtype and torch.isfinite(out).all()
    # the chain is the named scheduler's: the model is asked at exactly its timesteps
    sch.set_timesteps(4)
    assert [c["timesteps"].tolist() for c in model.calls] == [[t, t] for t in sch.timesteps.tolist()]
    again = D.sample(model, buffers, latent, noise, num_inference_steps=4, scheduler=name,
                     generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, again, rtol=0, atol=0)
    other_seed = D.sample(model, buffers, latent, noise, num_inference_steps=4, scheduler=name,
                          generator=torch.Generator().manual_seed(1))
    assert torch.equal(other_seed, out) != stochastic  # the generator drives the per-step noise, and only that


def test_scheduler_errors_are_typed():
    model = TinyDenoiser()
    _, buffers, noise = batch()
    with pytest.raises(DiffrigError, match="unknown scheduler"):
        D.sample(model, buffers, torch.zeros(2, 64), noise, scheduler="warp-drive")
    with pytest.raises(DiffrigError, match="unknown scheduler"):
        D.make_scheduler("UNet2DModel")  # a diffusers class that is not a scheduler
    with pytest.raises(DiffrigError, match="ddim"):
        D.sample(model, buffers, torch.zeros(2, 64), noise, scheduler="ddpm", timestep_respacing="ddim20")


def test_seeded_noise_reproducible():
    a = D.seeded_noise((1, 3, H, H), seed=7)
    b = D.seeded_noise((1, 3, H, H), seed=7)
    c = D.seeded_noise((1, 3, H, H), seed=8)
    assert a.shape == (1, 3, H, H) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert D.seeded_noise((2, 3), seed=0, dtype=torch.float64).dtype == torch.float64
