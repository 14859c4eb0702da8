"""The synthetic-world demo: scores, and one end-to-end run at the smallest settings."""

import json
import math

import pytest
import torch

from diffrig.demo import EDIT_MODES, SAMPLINGS, better_sampling, masked_scores, run_demo


def test_masked_scores_separate_face_and_rest():
    truth = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, 8:24, 8:24] = 1
    prediction = truth.clone()
    prediction += 0.1 * (1 - mask)  # wrong by 0.1 outside the face only
    scores = masked_scores(prediction.clamp(0, 1), truth, mask)
    assert scores["face"]["psnr"] == pytest.approx(100.0)  # identical: capped at MSE 1e-10
    assert scores["face"]["pixels"] == 2 * 16 * 16 and scores["rest"]["pixels"] == 2 * (32 * 32 - 16 * 16)
    rest_mse = ((prediction.clamp(0, 1) - truth) ** 2 * (1 - mask)).sum() / (3 * (1 - mask).sum())
    assert scores["rest"]["psnr"] == pytest.approx(10 * math.log10(1 / rest_mse.item()), abs=1e-3)
    assert scores["rest"]["ssim"] < scores["face"]["ssim"] <= 1.0


def test_better_sampling_weighs_psnr_and_ssim():
    def entry(psnr, ssim):
        region = {"psnr": psnr, "ssim": ssim}
        return {"edits": {"mean": {"face": region, "rest": region}}}

    assert better_sampling({"fixed_noise": entry(20, 0.5), "inverted": entry(22, 0.6)}) == "inverted"
    assert better_sampling({"fixed_noise": entry(24, 0.7), "inverted": entry(22, 0.6)}) == "fixed_noise"


@pytest.mark.slow
def test_quick_demo_end_to_end(builtin_cache, tmp_path):
    report = run_demo(tmp_path / "demo", preset="quick", device="cpu", progress=False)
    written = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert written == json.loads(json.dumps(report))
    assert set(written["metrics"]) == {*SAMPLINGS, "unedited_source"} and written["better_sampling"] in SAMPLINGS
    for sampling, entry in written["metrics"].items():
        if sampling == "unedited_source":
            continue
        assert set(entry["edits"]) == {*EDIT_MODES, "mean"}
        for scores in entry["edits"].values():
            for region in ("face", "rest"):
                assert math.isfinite(scores[region]["psnr"]) and -1 <= scores[region]["ssim"] <= 1
        assert (tmp_path / "demo" / "grids" / f"{sampling}.png").is_file()
    assert (tmp_path / "demo" / "stage2" / "model" / "config.json").is_file()
    # inversion keeps what the buffers do not describe (background, clothes) far better than shared noise
    rest = {name: written["metrics"][name]["edits"]["mean"]["rest"]["psnr"] for name in SAMPLINGS}
    assert rest["inverted"] > rest["fixed_noise"] + 3
