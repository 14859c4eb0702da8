"""The trainer on CPU with the tiny 32² config: learning, exact resume, stage 2 freezing, stop signals,
checkpoint and conversion round trips, non-finite losses, configuration and command line."""

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from PIL import Image

from diffrig.data.datasets import ShardedInfiniteSampler
from diffrig.data.lmdb_store import DatasetMeta, RecordWriter
from diffrig.data.records import Sample
from diffrig.diffusion import make_schedule, training_loss
from diffrig.errors import CheckpointError, DiffrigError
from diffrig.models import DiffusionRigModel, to_official_state_dict
from diffrig.training import NonFiniteLossError, list_checkpoints, load_checkpoint, load_config, resolve_resume, train
from diffrig.training import trainer as trainer_module
from diffrig.training.checkpoint import save_checkpoint
from diffrig.training.cli import run as cli_run
from diffrig.training.data import ResumableBatches, close_dataset
from diffrig.training.model_source import load_model
from diffrig.training.objective import DiffusionObjective
from diffrig.training.serialization import load_tree, save_tree
from diffrig.training.step import (FAST_COMPILE_OPTIONS, STEP_COMPILE_OPTIONS, GraphedStep, StepStats, TrainStep,
                                   build_training, compile_options)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
LAYOUT = {"shape": 100, "tex": 50, "exp": 50, "pose": 6, "cam": 3, "light": 27}
SIZE = 32


def lit_disc(index: int) -> Sample:
    """A lit disc on a plain background, with buffers made the way DECA's are (masked, normals in [-1,1])."""
    g = torch.Generator().manual_seed(index)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, SIZE), torch.linspace(-1, 1, SIZE), indexing="ij")
    cx, cy = (torch.rand(2, generator=g) * 0.4 - 0.2).tolist()
    radius = float(torch.rand(1, generator=g)) * 0.3 + 0.5
    d2 = ((xs - cx) ** 2 + (ys - cy) ** 2) / radius**2
    mask = (d2 < 1).float()
    normal = torch.stack([(xs - cx) / radius, (cy - ys) / radius, (1 - d2).clamp_min(0).sqrt()]) * mask
    albedo = (torch.rand(3, 1, 1, generator=g) * 0.6 + 0.3) * mask
    light = torch.rand(3, 1, 1, generator=g)
    rendered = albedo * (0.5 + 0.5 * (normal * light).sum(0, keepdim=True)).clamp_min(0)
    image = rendered + (torch.rand(3, 1, 1, generator=g) * 0.5) * (1 - mask)
    return Sample(name=f"disc{index:03d}.png", image=(image.clamp(0, 1) * 255).round().to(torch.uint8),
                  buffers=torch.cat([rendered, normal, albedo]), codes=torch.randn(236, generator=g),
                  tform=torch.eye(3))


def write_dataset(path: Path, count: int) -> Path:
    with RecordWriter(path, DatasetMeta(image_size=SIZE, asset_fingerprint="test", codes_layout=LAYOUT)) as writer:
        writer.append([lit_disc(i) for i in range(count)])
        writer.finish()
    return path


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "discs.lmdb", 16)


@pytest.fixture(scope="module")
def album_dir(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("album") / "album.lmdb", 6)


def tiny(data_dir, output_dir, **overrides):
    settings = dict(data_dir=str(data_dir), output_dir=str(output_dir), tracker="none", sample_every=0,
                    checkpoint_every=0, batch_size=2)
    return load_config(CONFIGS / "tiny_cpu.yaml", {**settings, **overrides})


def tiny_model(seed=0, **options) -> DiffusionRigModel:
    torch.manual_seed(seed)
    return DiffusionRigModel(**{**load_config(CONFIGS / "tiny_cpu.yaml").model, **options})


def weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- learning, logs, samples, final model


def test_loss_decreases_over_50_steps_and_writes_logs_samples_and_model(dataset_dir, tmp_path):
    config = tiny(dataset_dir, tmp_path / "run", max_steps=50, tracker="tensorboard",
                  sample_every=50, sample_count=3, sample_steps=2)
    result = train(config)
    assert result.step == 50 and len(result.losses) == 50 and not result.interrupted
    assert all(math.isfinite(x) for x in result.losses)
    first, last = np.mean(result.losses[:10]), np.mean(result.losses[-10:])
    assert last < 0.3 * first, (first, last)

    run = tmp_path / "run"
    assert list((run / "logs").rglob("events.out.tfevents.*"))
    grid = Image.open(run / "samples" / "step-000050.png")
    assert grid.size == (3 * (SIZE + 2) + 2, 3 * (SIZE + 2) + 2)  # rows: buffers, photos, samples
    assert (run / "config.yaml").is_file()
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["checkpoint-000050"]
    model = DiffusionRigModel.from_pretrained(result.model_dir)
    assert model.config.image_size == SIZE
    # the exported model predicts noise better than a fresh one on a fixed batch
    torch.manual_seed(123)
    image = torch.stack([lit_disc(i).image for i in range(4)]).float() / 127.5 - 1
    buffers = torch.stack([lit_disc(i).buffers for i in range(4)])
    t, noise = torch.full((4,), 600), torch.randn(4, 3, SIZE, SIZE)
    with torch.no_grad():
        trained = training_loss(model.eval(), image, buffers, t, noise).mean()
        fresh = training_loss(tiny_model(seed=1).eval(), image, buffers, t, noise).mean()
    assert trained < 0.2 * fresh, (trained, fresh)


def test_objective_equals_diffusion_training_loss():
    model = tiny_model()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    schedule = make_schedule(p2_gamma=0.5, p2_k=2.0)
    g = torch.Generator().manual_seed(0)
    image, buffers = torch.rand(3, 3, SIZE, SIZE, generator=g) * 2 - 1, torch.rand(3, 9, SIZE, SIZE, generator=g)
    t, noise = torch.tensor([0, 417, 999]), torch.randn(3, 3, SIZE, SIZE, generator=g)
    model.eval()
    assert torch.equal(DiffusionObjective(model, schedule)(image, buffers, t, noise),
                       training_loss(model, image, buffers, t, noise, schedule=schedule))


# ---------------------------------------------------------------- exact resume


def test_resume_reproduces_the_uninterrupted_run(dataset_dir, tmp_path):
    # dropout, EMA and gradient accumulation all draw on or carry state that resume must restore;
    # steps 3 to 6 (2 micro-batches of 2 samples each) cross the 16-sample epoch boundary
    settings = dict(ema=True, ema_decay=0.9, gradient_accumulation_steps=2, model={"dropout": 0.1})
    straight = train(tiny(dataset_dir, tmp_path / "a", max_steps=6, **settings))
    first = train(tiny(dataset_dir, tmp_path / "b", max_steps=3, **settings))
    second = train(tiny(dataset_dir, tmp_path / "b", max_steps=6, resume="latest", **settings))
    assert second.step == 6 and len(second.losses) == 3
    assert first.losses + second.losses == straight.losses
    a, b = (DiffusionRigModel.from_pretrained(p / "model") for p in (tmp_path / "a", tmp_path / "b"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    ema_a, ema_b = (DiffusionRigModel.from_pretrained(p / "model_ema") for p in (tmp_path / "a", tmp_path / "b"))
    assert all(torch.equal(x, y) for x, y in zip(ema_a.parameters(), ema_b.parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), ema_a.parameters()))


def test_resumable_batches_continue_the_stream_and_shard_without_overlap():
    def stream(rank, world, consumed, n):
        batches = iter(ResumableBatches(ShardedInfiniteSampler(10, rank, world, seed=3), 3, consumed))
        return [i for _ in range(n) for i in next(batches)]

    whole = stream(0, 1, 0, 10)
    for consumed in (0, 3, 9, 12, 21):
        assert stream(0, 1, consumed, 3) == whole[consumed:consumed + 9]
    for epoch in range(3):
        assert sorted(whole[10 * epoch:10 * epoch + 10]) == list(range(10))
    rank0, rank1 = stream(0, 2, 0, 5), stream(1, 2, 0, 5)  # 5 per process per epoch
    for epoch in range(3):
        assert not set(rank0[5 * epoch:5 * epoch + 5]) & set(rank1[5 * epoch:5 * epoch + 5])


# ---------------------------------------------------------------- stage 2


@pytest.mark.parametrize("freeze_batchnorm", [False, True])
def test_stage2_leaves_the_encoder_untouched(album_dir, tmp_path, freeze_batchnorm):
    start = tiny_model(seed=4)
    start.save_pretrained(tmp_path / "stage1")
    config = tiny(album_dir, tmp_path / "run", stage=2, init_from=str(tmp_path / "stage1"), max_steps=4,
                  lr=1e-3, freeze_encoder=True, freeze_encoder_batchnorm=freeze_batchnorm)
    result = train(config)
    tuned = DiffusionRigModel.from_pretrained(result.model_dir)
    before, after = start.state_dict(), tuned.state_dict()
    encoder_params = [name for name, _ in start.named_parameters() if name.startswith("encoder.")]
    assert encoder_params and all(torch.equal(before[n], after[n]) for n in encoder_params)
    unet = [n for n in before if n.startswith("unet.")]
    assert sum(not torch.equal(before[n], after[n]) for n in unet) > len(unet) // 2
    running = [n for n in before if n.startswith("encoder.") and "running_mean" in n]
    # the official stage 2 keeps BatchNorm in training mode: its statistics follow the album
    assert all(torch.equal(before[n], after[n]) for n in running) == freeze_batchnorm
    state = json.loads((result.checkpoint / "trainer_state.json").read_text())
    assert state["config"]["stage"] == 2


def test_official_checkpoint_converts_in_and_out_of_stage2(album_dir, tmp_path):
    start = tiny_model(seed=5)
    official = tmp_path / "model000100.pt"
    torch.save(to_official_state_dict(start), official)  # the official format is a torch.save'd dict
    options = load_config(CONFIGS / "tiny_cpu.yaml").model
    loaded = load_model(str(official), options)
    assert all(torch.equal(a, b) for a, b in zip(start.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(CheckpointError, match="not found"):
        load_model(str(tmp_path / "missing.pt"), options)

    result = train(tiny(album_dir, tmp_path / "run", stage=2, init_from=str(official), max_steps=2,
                        freeze_encoder=True))
    tuned = DiffusionRigModel.from_pretrained(result.model_dir)
    exported = tmp_path / "tuned.pt"
    torch.save(to_official_state_dict(tuned), exported)
    back = load_model(str(exported), options)
    assert all(torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), back.state_dict().values()))


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_restores_every_part(dataset_dir, tmp_path):
    config = tiny(dataset_dir, tmp_path, ema=True, channels_last=True)
    accelerator = Accelerator(cpu=True)
    parts = build_training(config, accelerator, tiny_model(seed=0))
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        parts.step([{"image": torch.rand(2, 3, SIZE, SIZE, generator=g) * 2 - 1,
                     "buffers": torch.rand(2, 9, SIZE, SIZE, generator=g)}])
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    path = save_checkpoint(tmp_path / "ckpt", 2, accelerator=accelerator, model=parts.model,
                           optimizer=parts.optimizer, ema=parts.ema, trainer_state={"consumed": 4})
    expected_draws = (random.random(), np.random.rand(), torch.rand(3))

    assert path.name == "checkpoint-000002" and not list((tmp_path / "ckpt").glob("*.tmp"))
    files = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    assert files == {"model/config.json", "model/diffusion_pytorch_model.safetensors", "optimizer.safetensors",
                     "ema.safetensors", "rng-0.safetensors", "trainer_state.json"}

    fresh = build_training(config, accelerator, tiny_model(seed=9))
    state = load_checkpoint(path, accelerator=accelerator, model=fresh.model, optimizer=fresh.optimizer, ema=fresh.ema)
    assert state["step"] == 2 and state["consumed"] == 4
    assert (random.random(), np.random.rand()) == expected_draws[:2] and torch.equal(torch.rand(3), expected_draws[2])
    for a, b in zip(parts.model.state_dict().values(), fresh.model.state_dict().values()):
        assert torch.equal(a, b)
    saved, loaded = parts.optimizer.state_dict(), fresh.optimizer.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    for index, entry in saved["state"].items():
        assert all(torch.equal(entry[k], loaded["state"][index][k]) for k in entry)
    for p in fresh.model.parameters():  # channels_last layouts survive, as the fused kernels need
        assert all(v.stride() == p.stride() for v in fresh.optimizer.state[p].values() if v.shape == p.shape)
    assert fresh.ema.optimization_step == parts.ema.optimization_step == 2
    assert all(torch.equal(a, b) for a, b in zip(parts.ema.shadow_params, fresh.ema.shadow_params))


def test_gradient_scaler_backs_off_on_nonfinite_steps_and_is_checkpointed(dataset_dir, tmp_path):
    # Accelerate makes a GradScaler for fp16 on GPUs only; give the CPU accelerator one to drive that path
    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    parts = build_training(tiny(dataset_dir, tmp_path), accelerator, tiny_model())
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(2, 3, SIZE, SIZE, generator=g) * 2 - 1, "buffers": torch.rand(2, 9, SIZE, SIZE, generator=g)}
    before = weights(parts.model)
    stats = parts.step([{**batch, "image": torch.full_like(batch["image"], float("nan"))}])
    assert stats.nonfinite and accelerator.scaler.get_scale() == 512.0
    assert all(torch.equal(before[k], v) for k, v in parts.model.state_dict().items())  # BatchNorm statistics too
    assert not parts.step([batch]).nonfinite
    path = save_checkpoint(tmp_path / "ckpt", 2, accelerator=accelerator, model=parts.model,
                           optimizer=parts.optimizer, trainer_state={"consumed": 4})
    assert (path / "scaler.safetensors").is_file()
    fresh = Accelerator(cpu=True)
    fresh.scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    other = build_training(tiny(dataset_dir, tmp_path), fresh, tiny_model())
    load_checkpoint(path, accelerator=fresh, model=other.model, optimizer=other.optimizer)
    assert fresh.scaler.state_dict() == accelerator.scaler.state_dict()


def test_latest_skips_incomplete_checkpoints_and_old_ones_are_pruned(dataset_dir, tmp_path):
    config = tiny(dataset_dir, tmp_path)
    accelerator = Accelerator(cpu=True)
    parts = build_training(config, accelerator, tiny_model())
    root = tmp_path / "ckpt"
    for step in (1, 2, 3):
        save_checkpoint(root, step, accelerator=accelerator, model=parts.model, optimizer=parts.optimizer,
                        trainer_state={"consumed": 0}, keep=2)
    (root / "checkpoint-000009.tmp" / "model").mkdir(parents=True)  # a save cut short
    (root / "checkpoint-000008").mkdir()  # no trainer_state.json: not complete
    assert [p.name for p in list_checkpoints(root)] == ["checkpoint-000002", "checkpoint-000003"]
    assert resolve_resume(root, "latest").name == "checkpoint-000003"
    assert resolve_resume(tmp_path / "nothing", "latest") is None
    assert resolve_resume(root, "") is None
    with pytest.raises(CheckpointError, match="latest"):
        resolve_resume(root, str(root / "checkpoint-000008"))


def test_a_second_run_into_the_same_folder_must_resume(dataset_dir, tmp_path):
    run = tmp_path / "run"
    train(tiny(dataset_dir, run, max_steps=2))
    with pytest.raises(DiffrigError, match="already holds an earlier run .newest: checkpoint-000002.; continue"):
        train(tiny(dataset_dir, run, max_steps=4))
    with pytest.raises(CheckpointError, match=r"checkpoints found there: .*checkpoint-000002"):
        train(tiny(dataset_dir, run, max_steps=4, resume=str(run)))  # the run folder, not a checkpoint
    assert train(tiny(dataset_dir, run, max_steps=4, resume="latest")).step == 4


def test_a_final_model_that_cannot_be_written_points_to_the_checkpoint(dataset_dir, tmp_path, monkeypatch):
    real_save = DiffusionRigModel.save_pretrained

    def disk_full_for_the_export(self, directory, **kwargs):
        if Path(directory).name == "model.tmp":
            (Path(directory)).mkdir(parents=True)
            raise OSError(28, "No space left on device")
        return real_save(self, directory, **kwargs)

    monkeypatch.setattr(DiffusionRigModel, "save_pretrained", disk_full_for_the_export)
    run = tmp_path / "run"
    with pytest.raises(CheckpointError, match=r"No space left.*weights are in .*checkpoint-000003.model"):
        train(tiny(dataset_dir, run, max_steps=3))
    assert not (run / "model").exists() and not (run / "model.tmp").exists()
    monkeypatch.undo()
    assert DiffusionRigModel.from_pretrained(run / "checkpoints" / "checkpoint-000003" / "model").config.image_size == SIZE


@pytest.mark.parametrize("failing_file", ["optimizer.safetensors", "rng-0.safetensors"])
def test_a_full_disk_fails_cleanly_and_keeps_the_previous_checkpoint(dataset_dir, tmp_path, monkeypatch, failing_file):
    from diffrig.training import checkpoint as checkpoint_module

    config = tiny(dataset_dir, tmp_path)
    accelerator = Accelerator(cpu=True)
    parts = build_training(config, accelerator, tiny_model())
    root = tmp_path / "ckpt"
    save_checkpoint(root, 1, accelerator=accelerator, model=parts.model, optimizer=parts.optimizer,
                    trainer_state={"consumed": 2}, keep=1)
    before = {p.name: p.read_bytes() for p in (root / "checkpoint-000001").rglob("*") if p.is_file()}
    real_save_tree = checkpoint_module.save_tree

    def disk_full(path, tree):
        if Path(path).name == failing_file:
            Path(path).write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        real_save_tree(path, tree)

    monkeypatch.setattr(checkpoint_module, "save_tree", disk_full)
    with pytest.raises(CheckpointError, match=r"step 2 .*No space left on device.*checkpoint-000001, is untouched"):
        save_checkpoint(root, 2, accelerator=accelerator, model=parts.model, optimizer=parts.optimizer,
                        trainer_state={"consumed": 4}, keep=1)
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-000001"]  # no partial folder left
    assert {p.name: p.read_bytes() for p in (root / "checkpoint-000001").rglob("*") if p.is_file()} == before
    assert resolve_resume(root, "latest").name == "checkpoint-000001"


def test_tree_serialization_round_trip_has_no_pickle(tmp_path):
    tree = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}},
            "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0], "fused": None, "x": float("inf")}],
            "$odd": [True, "text", (1, 2)]}
    save_tree(tmp_path / "t.safetensors", tree)
    back = load_tree(tmp_path / "t.safetensors")
    assert back["param_groups"] == tree["param_groups"] and back["$odd"] == tree["$odd"]
    assert set(back["state"]) == {0} and torch.equal(back["state"][0]["exp_avg"], tree["state"][0]["exp_avg"])
    # a plain safetensors file: 8-byte header length, a JSON header (the tree's structure as JSON
    # metadata), then raw tensor bytes and nothing else, so no pickle anywhere
    data = (tmp_path / "t.safetensors").read_bytes()
    header_length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_length])
    tensors = {key: entry for key, entry in header.items() if key != "__metadata__"}
    assert set(header["__metadata__"]) == {"diffrig.tree"} and json.loads(header["__metadata__"]["diffrig.tree"])
    assert len(data) == 8 + header_length + max(entry["data_offsets"][1] for entry in tensors.values())
    assert sorted(entry["shape"] for entry in tensors.values()) == [[], [2, 3]]
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="damaged"):
        load_tree(tmp_path / "bad.safetensors")


# ---------------------------------------------------------------- stop signals


def test_sigterm_leaves_a_loadable_checkpoint(dataset_dir, tmp_path):
    output = tmp_path / "run"
    command = [sys.executable, str(ROOT / "scripts" / "train_stage1.py"), "--config", str(CONFIGS / "tiny_cpu.yaml"),
               "--data_dir", str(dataset_dir), "--output_dir", str(output), "--max_steps", "100000",
               "--checkpoint_every", "2", "--keep_checkpoints", "0", "--batch_size", "2", "--tracker", "none",
               "--sample_every", "0", "--num_workers", "1"]
    # a cluster signals the whole process group, DataLoader workers included. Output goes to files: a
    # pipe nobody reads could block the child, and a stuck child must never hang the test run.
    with open(tmp_path / "stdout", "w") as out, open(tmp_path / "stderr", "w") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, text=True,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not list_checkpoints(output / "checkpoints") and time.time() < deadline and process.poll() is None:
            time.sleep(0.2)
        assert list_checkpoints(output / "checkpoints"), (tmp_path / "stderr").read_text()[-2000:]
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    stdout, stderr = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    assert process.returncode == 0, stderr[-2000:]
    assert "SIGTERM received" in stderr and "stopped at step" in stdout
    latest = resolve_resume(output / "checkpoints", "latest")
    step = int(stdout.split("stopped at step ")[1].split(";")[0])
    assert latest.name == f"checkpoint-{step:06d}" and not list((output / "checkpoints").glob("*.tmp"))
    assert not (output / "model").exists()  # interrupted: no final model
    config = tiny(dataset_dir, output)
    accelerator = Accelerator(cpu=True)
    parts = build_training(config, accelerator, DiffusionRigModel.from_pretrained(latest / "model"))
    state = load_checkpoint(latest, accelerator=accelerator, model=parts.model, optimizer=parts.optimizer)
    assert state["step"] == step and state["consumed"] == 2 * step


# ---------------------------------------------------------------- non-finite losses


class PoisonedDataset(torch.utils.data.Dataset):
    """Wraps a dataset and turns the image of the listed indices (all if None) into NaN."""

    def __init__(self, dataset, poisoned=None):
        self.dataset, self.poisoned, self.meta = dataset, poisoned, dataset.meta

    def __len__(self):
        return len(self.dataset)

    def close(self):
        close_dataset(self.dataset)

    def __getitem__(self, index):
        item = dict(self.dataset[index])
        if self.poisoned is None or index in self.poisoned:
            item["image"] = torch.full_like(item["image"], float("nan"))
        return item


def poison(monkeypatch, poisoned):
    opener = trainer_module.open_training_dataset
    monkeypatch.setattr(trainer_module, "open_training_dataset",
                        lambda *a, **k: PoisonedDataset(opener(*a, **k), poisoned))


def test_nonfinite_steps_are_skipped_and_training_goes_on(dataset_dir, tmp_path, monkeypatch, caplog):
    poison(monkeypatch, {3})
    result = train(tiny(dataset_dir, tmp_path, max_steps=8, batch_size=4))  # index 3 comes up in 2 of 8 batches
    skipped = [i for i, x in enumerate(result.losses) if not math.isfinite(x)]
    assert len(skipped) == 2 and result.step == 8
    assert "non-finite loss" in caplog.text
    model = DiffusionRigModel.from_pretrained(result.model_dir)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("host_sync_every, stopped_at", [(1, 3), (4, 4)])
def test_repeated_nonfinite_losses_stop_with_a_checkpoint(dataset_dir, tmp_path, monkeypatch, host_sync_every,
                                                          stopped_at):
    # losses are read back every host_sync_every steps: the stop comes at the first read-back after step 3,
    # and every step up to it was skipped (by the fused optimizer on the device, without a host round trip)
    poison(monkeypatch, None)
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps") as error:
        train(tiny(dataset_dir, tmp_path, max_steps=20, max_nonfinite_steps=3, host_sync_every=host_sync_every,
                   log_every=100))
    assert isinstance(error.value, DiffrigError)
    latest = resolve_resume(tmp_path / "checkpoints", "latest")
    assert latest.name == f"checkpoint-{stopped_at:06d}"
    saved = DiffusionRigModel.from_pretrained(latest / "model")
    initial = tiny_model(seed=0)  # train() seeds with config.seed (0) just before building the model
    assert all(torch.equal(a, b) for a, b in zip(initial.state_dict().values(), saved.state_dict().values()))


# ---------------------------------------------------------------- configuration and command line


def test_paper_configs_hold_the_official_settings():
    stage1 = load_config(CONFIGS / "stage1_256.yaml")
    assert (stage1.lr, stage1.batch_size, stage1.max_steps, stage1.max_grad_norm) == (1e-4, 32, 50000, 1.0)
    assert stage1.model["image_size"] == 256 and stage1.model["latent_dim"] == 64 and not stage1.freeze_encoder
    assert (stage1.p2_gamma, stage1.p2_k, stage1.num_train_timesteps) == (1.0, 1.0, 1000)
    stage2 = load_config(CONFIGS / "stage2_256.yaml")
    assert (stage2.stage, stage2.lr, stage2.batch_size, stage2.max_steps) == (2, 1e-5, 4, 5000)
    assert stage2.freeze_encoder and not stage2.freeze_encoder_batchnorm


def test_compile_options_follow_the_mode_and_fast_compile():
    assert compile_options("default", False) == STEP_COMPILE_OPTIONS
    assert compile_options("reduce-overhead", False) == {"triton.cudagraphs": True, **STEP_COMPILE_OPTIONS}
    fast = compile_options("reduce-overhead", True)
    assert fast == {"triton.cudagraphs": True, **FAST_COMPILE_OPTIONS}
    assert fast["triton.autotune_pointwise"] is False and fast["loop_ordering_after_fusion"] is False
    assert compile_options("max-autotune", True)["max_autotune"] is True
    with pytest.raises(DiffrigError, match="unknown compile_mode 'fastest'"):
        compile_options("fastest", True)
    stage2 = load_config(CONFIGS / "stage2_256.yaml")
    assert stage2.compile and stage2.fast_compile and stage2.compile_mode == "reduce-overhead"
    assert not load_config(CONFIGS / "stage1_256.yaml").fast_compile  # a long run: every step counts


def test_compiled_step_marks_cuda_graph_steps_only_in_graph_modes(dataset_dir, tmp_path):
    accelerator = Accelerator(cpu=True)
    for mode, graphs in (("default", False), ("reduce-overhead", True)):
        config = tiny(dataset_dir, tmp_path, compile=True, compile_mode=mode, fast_compile=True)
        assert build_training(config, accelerator, tiny_model()).step.mark_cuda_graph_step is graphs
    with pytest.raises(DiffrigError, match="unknown compile_mode"):
        build_training(tiny(dataset_dir, tmp_path, compile=True, compile_mode="turbo"), accelerator, tiny_model())


def test_cuda_graph_setting_is_checked_and_runs_eagerly_off_cuda(dataset_dir, tmp_path, caplog):
    with pytest.raises(DiffrigError, match="cuda_graph and compile exclude each other"):
        tiny(dataset_dir, tmp_path, cuda_graph=True, compile=True).validate()
    with pytest.raises(DiffrigError, match="fused_norm and compile exclude each other"):
        tiny(dataset_dir, tmp_path, fused_norm=True, compile=True).validate()
    for bad in ({"mixed_precision": "fp16"}, {"ema": True}, {"fused_optimizer": False}):
        with pytest.raises(DiffrigError, match="cuda_graph needs mixed_precision bf16 or no, ema false"):
            tiny(dataset_dir, tmp_path, cuda_graph=True, **bad).validate()
    with caplog.at_level("WARNING", logger="diffrig.training.step"):
        step = build_training(tiny(dataset_dir, tmp_path, cuda_graph=True), Accelerator(cpu=True), tiny_model()).step
    assert type(step) is TrainStep
    assert "cuda_graph: training runs on cpu, not CUDA; the step runs eagerly" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_step_trains_as_the_eager_step(dataset_dir, tmp_path):
    """Recorded after 3 eager steps and replayed: the same losses as eager steps from the same seeds
    (timesteps, noise and dropout drawn inside the graph), also with the fused norm kernels (which draw
    the same dropout masks), and a batch of another size still runs."""
    losses = {}
    for graph, fused in ((False, False), (True, False), (True, True)):
        config = tiny(dataset_dir, tmp_path, cuda_graph=graph, fused_norm=fused, batch_size=4,
                      mixed_precision="no", channels_last=True)
        torch.manual_seed(0)
        parts = build_training(config, Accelerator(), tiny_model())
        assert isinstance(parts.step, GraphedStep) is graph
        torch.manual_seed(1)
        batches = [{"image": torch.rand(4, 3, SIZE, SIZE, device="cuda") * 2 - 1,
                    "buffers": torch.rand(4, 9, SIZE, SIZE, device="cuda")} for _ in range(8)]
        stats = [parts.step([b]) for b in batches]
        stats.append(parts.step([{key: value[:2] for key, value in batches[0].items()}]))
        StepStats.read_all(stats)
        losses[graph, fused] = [s.loss for s in stats]
        assert all(math.isfinite(loss) for loss in losses[graph, fused])
    assert losses[True, False] == pytest.approx(losses[False, False], rel=1e-4)
    assert losses[True, True] == pytest.approx(losses[False, False], rel=1e-3)


def test_compiled_training_graph_can_be_served_from_the_autograd_cache(dataset_dir, tmp_path):
    """A second run on the same machine skips re-tracing the joint graph only if AOTAutograd may
    cache it: the UNet's concat_channels (a custom autograd function) must not make it bypass."""
    cache = pytest.importorskip("torch._functorch._aot_autograd.autograd_cache")
    functorch_config = torch._functorch.config
    if not hasattr(functorch_config, "autograd_cache_allow_custom_autograd_functions"):
        pytest.skip("this torch has no switch for custom autograd functions in its cache")
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with functorch_config.patch(autograd_cache_allow_custom_autograd_functions=False):
        config = tiny(dataset_dir, tmp_path, compile=True)
        parts = build_training(config, Accelerator(cpu=True), tiny_model())
        assert functorch_config.autograd_cache_allow_custom_autograd_functions
        image = torch.rand(2, 3, 32, 32) * 2 - 1
        loss = torch.compile(parts.objective, backend=capture, fullgraph=True)(
            image, torch.rand(2, 9, 32, 32), torch.tensor([3, 700]), torch.randn_like(image))
        loss.mean().backward()
        (graph,) = graphs
        assert any("autograd_function_apply" in str(node.target) for node in graph.graph.nodes)
        cache.check_cacheable(graph)
        functorch_config.autograd_cache_allow_custom_autograd_functions = False
        with pytest.raises(cache.BypassAOTAutogradCache, match="autograd_function_apply"):
            cache.check_cacheable(graph)


def test_config_overrides_coercion_and_errors(tmp_path):
    config = load_config(CONFIGS / "tiny_cpu.yaml", {"lr": "2e-4", "ema": "true", "max_steps": "7",
                                                     "model": {"latent_dim": 8}})
    assert (config.lr, config.ema, config.max_steps) == (2e-4, True, 7)
    assert config.model["latent_dim"] == 8 and config.model["image_size"] == 32
    with pytest.raises(DiffrigError, match="unknown training setting.*learning_rate"):
        load_config(None, {"learning_rate": 1.0})
    with pytest.raises(DiffrigError, match="mixed_precision"):
        load_config(None, {"mixed_precision": "fp8"})
    with pytest.raises(DiffrigError, match="batch_size must be a int"):
        load_config(None, {"batch_size": "four"})
    with pytest.raises(DiffrigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_cli_turns_user_errors_into_one_line(dataset_dir, tmp_path, capsys):
    tiny_config = str(CONFIGS / "tiny_cpu.yaml")
    cases = [
        (["--config", tiny_config, "--output_dir", str(tmp_path)], 1, "no data_dir"),
        (["--config", tiny_config, "--data_dir", str(tmp_path / "none.lmdb"), "--output_dir", str(tmp_path)],
         1, "not an LMDB dataset"),
        (["--config", tiny_config, "--data_dir", str(dataset_dir), "--output_dir", str(tmp_path),
          "--image_size", "64"], 1, "32² samples but the model is built for 64²"),
        (["--config", tiny_config, "--data_dir", str(dataset_dir), "--output_dir", str(tmp_path),
          "--resume", str(tmp_path)], 1, "not a complete training checkpoint"),
    ]
    for argv, code, message in cases:
        assert cli_run(argv, stage=1, default_config=tiny_config, description="") == code
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1 and "Traceback" not in err
    for resume in ([], ["--resume", "latest"]):  # nothing to resume yet: stage 2 needs a model to start from
        assert cli_run(["--config", tiny_config, "--data_dir", str(dataset_dir), "--output_dir", str(tmp_path),
                        *resume], stage=2, default_config=tiny_config, description="") == 1
        assert "--model_path" in capsys.readouterr().err


def test_cli_explains_every_setting_and_can_be_quiet(dataset_dir, tmp_path, capsys):
    from diffrig.training.cli import build_parser
    from diffrig.training.config import FIELDS

    text = build_parser("").format_help()
    for name in FIELDS:
        if name not in ("model", "stage"):
            assert FIELDS[name].metadata["help"] and f"--{name}" in text
    assert "0 trains until stopped" in text and "checkpoint-NNNNNN" in text
    tiny_config = str(CONFIGS / "tiny_cpu.yaml")
    argv = ["--config", tiny_config, "--data_dir", str(dataset_dir), "--output_dir", str(tmp_path / "run"),
            "--max_steps", "2", "--tracker", "none", "--sample_every", "0", "-q"]
    assert cli_run(argv, stage=1, default_config=tiny_config, description="") == 0
    captured = capsys.readouterr()
    assert "stage 1" not in captured.err and "it/s" not in captured.err  # no progress bar
    assert "finished at step 2" in captured.out


# ---------------------------------------------------------------- several processes


@pytest.mark.slow
def test_two_processes_shard_the_data_and_write_one_checkpoint(dataset_dir, tmp_path):
    """torchrun with 2 CPU processes (gloo): the same code path as accelerate launch on 2 GPUs."""
    output = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "scripts" / "train_stage1.py"), "--config", str(CONFIGS / "tiny_cpu.yaml"),
               "--data_dir", str(dataset_dir), "--output_dir", str(output), "--max_steps", "4",
               "--checkpoint_every", "2", "--keep_checkpoints", "0", "--batch_size", "2", "--tracker", "none",
               "--sample_every", "0"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (done.stdout + done.stderr).count("finished at step 4") == 1  # the main process reports, once
    checkpoints = list_checkpoints(output / "checkpoints")
    assert [p.name for p in checkpoints] == ["checkpoint-000002", "checkpoint-000004"]
    for path in checkpoints:
        assert (path / "rng-0.safetensors").is_file() and (path / "rng-1.safetensors").is_file()
        state = json.loads((path / "trainer_state.json").read_text())
        assert state["num_processes"] == 2 and state["consumed"] == 2 * state["step"]
    rng = [load_tree(checkpoints[-1] / f"rng-{rank}.safetensors")["torch"] for rank in (0, 1)]
    assert not torch.equal(*rng)  # each process draws its own timesteps and noise
    assert DiffusionRigModel.from_pretrained(output / "model").config.image_size == SIZE
