"""scripts/inference.py: edits, grid, hand-set rigs, and one clear line for each bad input."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffrig.models import DiffusionRigModel

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "inference.py"
S = 32
pytestmark = pytest.mark.usefixtures("builtin_cache", "load_rig_once")


@pytest.fixture(scope="module")
def cli():
    spec = importlib.util.spec_from_file_location("inference_cli", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    DiffusionRigModel(image_size=S, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="",
                      dropout=0.0, latent_dim=16).save_pretrained(path)
    return path


def picture(path: Path, size=(64, 64), seed=0, landmarks=True, flat=False) -> Path:
    """A smooth picture; with ``landmarks`` a DECA-style ``.txt`` sidecar of 68 points around its centre."""
    width, height = size
    if flat:
        pixels = np.full((height, width, 3), 128, dtype=np.uint8)
    else:
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[0:height, 0:width] / max(size)
        pixels = np.stack([127 + 100 * np.sin(xx * rng.uniform(2, 6) + yy * rng.uniform(2, 6) + c)
                           for c in range(3)], -1).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    if landmarks:
        angles = np.linspace(0, 2 * np.pi, 68, endpoint=False)
        points = np.stack([width / 2 + width * 0.3 * np.cos(angles), height / 2 + height * 0.35 * np.sin(angles)], 1)
        np.savetxt(path.with_suffix(".txt"), points)
    return path


def run(cli, capsys, *argv):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_edits_grid_and_bad_sources(cli, capsys, model_dir, tmp_path):
    sources = tmp_path / "sources"
    sources.mkdir()
    picture(sources / "alice.png", seed=1)
    picture(sources / "bob.png", seed=2)
    picture(sources / "blank.png", flat=True, landmarks=False)  # no face anywhere
    picture(sources / "wide.png", size=(96, 64), seed=3)  # not an aligned square
    target = picture(tmp_path / "target.png", seed=4)
    out = tmp_path / "out"
    code, stdout, stderr = run(cli, capsys, "--source", sources, "--target", target, "--modes", "pose,light", "exp",
                               "--model-path", model_dir, "--deca_dir", "builtin", "--output_dir", out,
                               "--timestep_respacing", "ddim4", "--align", "never", "--yaw", "0", "--light", "left",
                               "--batch_size", "4", "--quiet")
    assert code == 1  # some sources were skipped
    lines = stderr.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in stderr
    assert lines[0].startswith("skipped") and "blank.png" in lines[0] and "no face" in lines[0]
    assert "wide.png" in lines[1] and "wrong image size 96x64" in lines[1]
    written = sorted(p.name for p in out.glob("*.png"))
    assert written == sorted(f"{name}_{mode}.png" for name in ("alice", "bob")
                             for mode in ("pose", "light", "expression", "rig")) + ["grid.png"]
    for name in written:
        assert Image.open(out / name).size == ((2 + 2 * 4) * (S + 2) + 2, 2 * (S + 2) + 2) if name == "grid.png" \
            else Image.open(out / name).size == (S, S)
    assert "wrote 8 edits" in stdout


def test_hand_rig_without_target_and_official_pt(cli, capsys, model_dir, tmp_path):
    import torch

    from diffrig.models import to_official_state_dict

    official = tmp_path / "model000100.pt"
    model = DiffusionRigModel.from_pretrained(model_dir)
    torch.save(to_official_state_dict(model), official)  # the official checkpoint format
    source = picture(tmp_path / "carol.png", seed=5)
    out = tmp_path / "out"
    code, stdout, stderr = run(cli, capsys, "--source", source, "--model_path", official, "--image_size", S,
                               "--num_channels", 32, "--num_res_blocks", 1, "--channel_mult", "1,2",
                               "--attention_resolutions", "", "--latent_dim", 16, "--deca-dir", "builtin",
                               "--output-dir", out, "--jaw", "10", "--exp", "0.5 0.2", "--timestep-respacing", "ddim4",
                               "-q")
    assert code == 0, stderr
    assert sorted(p.name for p in out.glob("*.png")) == ["carol_rig.png", "grid.png"]


def test_hand_rig_numbers_as_separate_arguments_and_progress(cli, capsys, model_dir, tmp_path):
    """--exp / --light take their numbers as separate arguments, negative ones included; without
    --quiet the sampling steps of a single batch show progress."""
    source = picture(tmp_path / "gina.png", seed=10)
    out = tmp_path / "out"
    code, stdout, stderr = run(cli, capsys, "--source", source, "--model_path", model_dir, "--deca_dir", "builtin",
                               "--output_dir", out, "--timestep_respacing", "ddim4", "--exp", "-0.5", "0.2",
                               "--light", "0.8", *["0"] * 8)
    assert code == 0, stderr
    assert stdout.strip() == f"wrote 1 edit and 1 grid in {out}"
    assert "DDIM inversion" in stderr and "DDIM" in stderr.replace("DDIM inversion", "")
    parser = cli.build_parser()
    args = parser.parse_args(["--source", "x", "--model_path", "m", "--output_dir", "o", "--exp=-1,0.5",
                              "--light", "left"])
    assert args.hand_exp == ["-1,0.5"] and args.hand_light == ["left"]


@pytest.mark.parametrize("problem", ["missing_model", "nothing_to_edit", "modes_without_target", "bad_mode",
                                     "target_without_face", "wrong_image_size", "missing_source", "batch_size_zero",
                                     "missing_cuda", "unknown_device", "ddpm_with_inversion", "unknown_scheduler",
                                     "meanshape_not_a_shape_file"])
def test_bad_inputs_give_one_line_and_exit_1(cli, capsys, caplog, model_dir, tmp_path, problem):
    import torch

    source = picture(tmp_path / "dave.png", seed=6)
    args = ["--source", source, "--target", picture(tmp_path / "t.png", seed=7), "--model_path", model_dir,
            "--deca_dir", "builtin", "--output_dir", tmp_path / "out", "--timestep_respacing", "ddim4", "-q"]
    expected = {
        "missing_model": "model",
        "nothing_to_edit": "nothing to edit",
        "modes_without_target": "give --target",
        "bad_mode": "unknown edit mode 'smile'",
        "target_without_face": "target",
        "wrong_image_size": "wrong image size",
        "missing_source": "does not exist",
        "batch_size_zero": "--batch_size must be at least 1",
        "missing_cuda": "CUDA is not available",
        "unknown_device": "unknown device 'gpu'",
        "ddpm_with_inversion": "--use_ddim false cannot start from the source's DDIM inversion (the default): "
                               "add --no-invert",
        "unknown_scheduler": "unknown scheduler 'bogus'",
        "meanshape_not_a_shape_file": "is not a mean shape file",
    }[problem]
    if problem == "missing_model":
        args[5] = tmp_path / "nowhere"
    elif problem == "nothing_to_edit":
        args = args[:2] + args[4:] + ["--modes"]
    elif problem == "modes_without_target":
        args = args[:2] + args[4:] + ["--modes", "light"]
    elif problem == "bad_mode":
        args += ["--modes", "pose", "smile"]
    elif problem == "target_without_face":
        args[3] = picture(tmp_path / "blank.png", flat=True, landmarks=False)
    elif problem == "wrong_image_size":
        args += ["--image_size", 64]
    elif problem == "batch_size_zero":
        args += ["--batch_size", 0]
    elif problem == "missing_cuda":
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        args += ["--device", "cuda"]
    elif problem == "unknown_device":
        args += ["--device", "gpu"]
    elif problem == "ddpm_with_inversion":
        args += ["--use_ddim", "false"]
    elif problem == "unknown_scheduler":
        args += ["--scheduler", "bogus", "--no-invert"]
    elif problem == "meanshape_not_a_shape_file":
        args += ["--meanshape", source]
    else:
        args[1] = tmp_path / "absent.png"
    code, _, stderr = run(cli, capsys, *args)
    assert code == 1
    assert stderr.count("\n") == 1 and stderr.startswith("error: ") and expected in stderr, stderr
    assert not (tmp_path / "out" / "dave_pose.png").exists()
    assert "not used" not in caplog.text  # a model folder's own image size: the error alone, no warning first


def test_real_photos_are_aligned_when_not_square(faces_dir, model_dir):
    import torch

    from diffrig.pipeline import RigEditPipeline

    pipeline = RigEditPipeline.from_pretrained(model_dir, deca_dir="builtin")
    wide, square = faces_dir / "album_obama" / "obama1.jpg", faces_dir / "portraits" / "alfw1.png"
    portraits, failures = pipeline.read_photos([wide, square])
    assert failures == []
    assert portraits.images.shape == (2, 3, S, S) and portraits.names == ["obama1", "alfw1"]
    assert portraits.codes.batch_size == 2 and torch.isfinite(portraits.codes.flat()).all()
    # DECA's crop square is around the face, whose FFHQ centre (between eyes and mouth) alignment puts
    # at the picture's centre: well inside the 224² crop, above its centre (the crop box holds the chin)
    centre = torch.tensor([(S - 1) / 2, (S - 1) / 2, 1.0])
    in_crop = portraits.tforms @ centre
    assert ((in_crop[:, :2] > 30) & (in_crop[:, :2] < 194)).all(), in_crop
    assert in_crop[0, 1] < 111.5
    _, failures = pipeline.read_photos([wide], align="never")
    assert len(failures) == 1 and "wrong image size 1480x832" in failures[0][1]


def test_photos_in_memory_are_read_as_their_files_are(faces_dir, model_dir):
    import torch

    from diffrig.pipeline import RigEditPipeline
    from diffrig.rigs import HandRig

    pipeline = RigEditPipeline.from_pretrained(model_dir, deca_dir="builtin")
    files = [faces_dir / "album_obama" / "obama1.jpg", faces_dir / "portraits" / "alfw1.png"]  # aligned first; as is
    from_files, _ = pipeline.read_photos(files)
    blank = Image.new("RGB", (300, 300), (128, 128, 128))
    with Image.open(files[0]) as wide, Image.open(files[1]) as square:
        tiny = square.resize((40, 40))
        in_memory, failures = pipeline.read_images([wide, blank, square, tiny], names=["wide", "blank", "square", "tiny"])
        assert failures == [("blank", "no face found"), ("tiny", "too small: 40x40 px (needs at least 64 px on each side)")]
        assert in_memory.names == ["wide", "square"]
        torch.testing.assert_close(in_memory.images, from_files.images)
        torch.testing.assert_close(in_memory.tforms, from_files.tforms)
        torch.testing.assert_close(in_memory.codes.flat(), from_files.codes.flat())
        _, failures = pipeline.read_images([wide], align="never")
        assert failures == [("0000", "wrong image size 1480x832: not an aligned (square) photo; align it first "
                                     "(scripts/align.py) or let it be aligned")]
        result = pipeline(square, rig=HandRig(jaw=5), num_inference_steps=2)
    assert result.sources.names == ["0000"] and result.edits["rig"].shape == (1, 3, S, S)
    with pytest.raises(TypeError, match="PIL image"):
        pipeline(np.zeros((S, S, 3), dtype=np.uint8), rig=HandRig(jaw=5))


def test_pipeline_refuses_another_image_size_for_a_model_folder(model_dir, caplog):
    from diffrig.errors import CheckpointError
    from diffrig.pipeline import RigEditPipeline

    with pytest.raises(CheckpointError, match=f"wrong image size: the model in .* has image_size {S}, not 64"):
        RigEditPipeline.from_pretrained(model_dir, deca_dir="builtin", image_size=64)
    assert RigEditPipeline.from_pretrained(model_dir, deca_dir="builtin", image_size=S).image_size == S
    assert "not used" not in caplog.text


def test_pipeline_call_reads_photo_paths(model_dir, tmp_path):
    from diffrig.errors import DataError
    from diffrig.pipeline import RigEditPipeline
    from diffrig.rigs import HandRig

    pipeline = RigEditPipeline.from_pretrained(model_dir, deca_dir="builtin")
    source, target = picture(tmp_path / "erin.png", seed=8), picture(tmp_path / "frank.png", seed=9)
    result = pipeline(str(source), target=target, modes="light", rig=HandRig(light="top"), num_inference_steps=4)
    assert result.modes == ["light", "rig"] and result.edits["light"].shape == (1, 3, S, S)
    assert result.sources.names == ["erin"] and result.target.names == ["frank"]
    with pytest.raises(DataError, match="blank.png: no face"):
        pipeline([source, picture(tmp_path / "blank.png", flat=True, landmarks=False)], rig=HandRig(jaw=5))
