"""FFHQ alignment: the crop geometry, robust loading of odd files, a whole folder, the command line."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from diffrig.data.align import (AlignSummary, align_face, align_folder, align_photo, aligned_coordinates, ffhq_quad,
                                main, read_rejected)
from diffrig.data.images import ImageRejected, load_rgb, to_rgb
from diffrig.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
FAST = 1024  # intermediate size for tests: FFHQ's 4096 gives the same picture to ~57 dB PSNR


# ---------------------------------------------------------------- geometry on synthetic pictures

def synthetic_landmarks(eye_left, eye_right, mouth_left, mouth_right) -> np.ndarray:
    """68 landmarks whose eye means and mouth corners are the given points (all FFHQ's quad reads)."""
    lm = np.zeros((68, 2))
    lm[36:42], lm[42:48], lm[48], lm[54] = eye_left, eye_right, mouth_left, mouth_right
    return lm


def rotate(points, centre, degrees):
    angle = np.deg2rad(degrees)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return (np.asarray(points, float) - centre) @ rot.T + centre


def dot_picture(size, points, radius, background=(128, 128, 128)):
    """Red, green and blue Gaussian dots (standard deviation ``radius / 2``) centred exactly on three
    points (pixel-centre coordinates) of a uniform background."""
    width, height = size
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    pixels = np.broadcast_to(np.array(background, np.float64), (height, width, 3)).copy()
    for (x, y), colour in zip(points, np.eye(3) * 255):
        weight = np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * (radius / 2) ** 2))[..., None]
        pixels = pixels * (1 - weight) + colour * weight
    return Image.fromarray(np.rint(pixels).astype(np.uint8))


def dot_centres(image, near, window=12):
    """Centroids (3, 2) of the red, green and blue dots within ``window`` px of the points ``near``
    (mirrored copies in the padding stay out), in pixel-centre coordinates."""
    pixels = np.asarray(image, dtype=np.float64)
    ys, xs = np.mgrid[0:pixels.shape[0], 0:pixels.shape[1]]
    centres = []
    for channel, (x0, y0) in enumerate(near):
        others = np.delete(pixels, channel, axis=2).max(axis=2)
        weight = np.clip(pixels[..., channel] - others - 60, 0, None)
        weight[(np.abs(xs - x0) > window) | (np.abs(ys - y0) > window)] = 0
        centres.append([(xs * weight).sum() / weight.sum(), (ys * weight).sum() / weight.sum()])
    return np.array(centres)


def face_points(centre, eye_distance, eye_to_mouth, degrees=0.0):
    """Eye centres and mouth corners of an upright face rolled by ``degrees`` about ``centre``."""
    cx, cy = centre
    half = eye_distance / 2
    points = [(cx - half, cy), (cx + half, cy), (cx - half * 0.8, cy + eye_to_mouth), (cx + half * 0.8, cy + eye_to_mouth)]
    return rotate(points, np.array(centre, float), degrees)


def test_quad_of_an_upright_face_is_the_ffhq_square():
    eyes_mid, d, h = np.array([300.0, 280.0]), 60.0, 50.0
    quad = ffhq_quad(synthetic_landmarks(*face_points(eyes_mid, d, h)))
    half = max(2 * d, 1.8 * h) / 2 * 2  # FFHQ: the side is max(4 x eye distance, 3.6 x eye-to-mouth)
    centre = eyes_mid + [0, 0.1 * h]
    np.testing.assert_allclose(quad, [centre + [-half, -half], centre + [-half, half],
                                      centre + [half, half], centre + [half, -half]], atol=1e-9)


def test_quad_needs_68_landmarks():
    with pytest.raises(DataError, match="68"):
        ffhq_quad(np.zeros((5, 2)))
    with pytest.raises(DataError, match="coincide"):
        ffhq_quad(np.zeros((68, 2)))


def test_eyes_and_mouth_land_where_ffhq_puts_them():
    """Analytic targets for an upright face, the same targets for a rolled one, and the pixels agree."""
    d, h = 60.0, 60.0
    upright = face_points((300, 280), d, h)
    lm = synthetic_landmarks(*upright)
    eyes_mouth = np.array([upright[0], upright[1], (upright[2] + upright[3]) / 2])
    # Square side 240 centred 6 px below the eyes: eyes at u = 0.5 -+ 30/240, v = 0.5 - 6/240.
    expected = np.array([[0.375, 0.475], [0.625, 0.475], [0.5, 0.725]]) * 256 - 0.5
    np.testing.assert_allclose(aligned_coordinates(eyes_mouth, lm, 256), expected, atol=1e-9)

    rolled = face_points((300, 280), d, h, degrees=25)
    rolled_lm = synthetic_landmarks(*rolled)
    rolled_points = np.array([rolled[0], rolled[1], (rolled[2] + rolled[3]) / 2])
    np.testing.assert_allclose(aligned_coordinates(rolled_points, rolled_lm, 256), expected, atol=1e-9)

    aligned = align_face(dot_picture((600, 600), rolled_points, 6), rolled_lm, 256, transform_size=512)
    assert aligned.size == (256, 256) and aligned.mode == "RGB"
    np.testing.assert_allclose(dot_centres(aligned, expected), expected, atol=0.3)


def test_face_at_the_edge_is_padded_with_the_surrounding_colour():
    background = (90, 140, 200)
    points = face_points((70, 70), 60, 60)
    lm = synthetic_landmarks(*points)
    marks = np.array([points[0], points[1], (points[2] + points[3]) / 2])
    picture = dot_picture((320, 320), marks, 6, background)
    padded = np.asarray(align_face(picture, lm, 128, transform_size=512), dtype=np.float64)
    bare = np.asarray(align_face(picture, lm, 128, transform_size=512, padding=False), dtype=np.float64)
    # The square reaches 56 px beyond the top-left corner: mirrored and blurred background, not black.
    np.testing.assert_allclose(padded[:12, :12].reshape(-1, 3).mean(0), background, atol=3)
    assert bare[:12, :12].max() == 0
    expected = aligned_coordinates(marks, lm, 128)
    np.testing.assert_allclose(dot_centres(padded, expected), expected, atol=0.3)


def test_large_face_is_shrunk_first_and_lands_in_place():
    points = face_points((1200, 1150), 300, 280, degrees=-10)
    lm = synthetic_landmarks(*points)
    marks = np.array([points[0], points[1], (points[2] + points[3]) / 2])
    aligned = align_face(dot_picture((2400, 2400), marks, 30), lm, 256, transform_size=512)
    expected = aligned_coordinates(marks, lm, 256)
    np.testing.assert_allclose(dot_centres(aligned, expected), expected, atol=0.3)


# ---------------------------------------------------------------- loading any kind of file

def test_modes_become_rgb_with_transparency_on_white():
    grey16 = Image.fromarray(np.array([[0, 257 * 128, 65535]], dtype=np.uint16))
    assert grey16.mode == "I;16"
    np.testing.assert_array_equal(np.asarray(to_rgb(grey16))[0, :, 0], [0, 128, 255])
    int32 = Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32))
    np.testing.assert_array_equal(np.asarray(to_rgb(int32))[0, :, 0], [0, 100, 255])
    int32_wide = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))
    np.testing.assert_array_equal(np.asarray(to_rgb(int32_wide))[0, :, 0], [0, 255])
    unit_float = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    np.testing.assert_array_equal(np.asarray(to_rgb(unit_float))[0, :, 0], [0, 128, 255])

    clear = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    half = Image.new("LA", (2, 2), (0, 128))
    palette = Image.new("P", (2, 2), 0)
    palette.putpalette([0, 0, 0, 9, 9, 9])
    palette.info["transparency"] = 0
    assert np.asarray(to_rgb(clear))[0, 0].tolist() == [255, 255, 255]
    assert np.asarray(to_rgb(half))[0, 0].tolist() == [127, 127, 127]
    assert np.asarray(to_rgb(palette))[0, 0].tolist() == [255, 255, 255]
    assert np.asarray(to_rgb(clear, background=(0, 0, 0)))[0, 0].tolist() == [0, 0, 0]
    assert np.asarray(to_rgb(Image.new("CMYK", (2, 2), (0, 255, 255, 0))))[0, 0].tolist() == [255, 0, 0]
    lab_white = np.asarray(to_rgb(Image.new("LAB", (2, 2), (255, 128, 128))))[0, 0]
    assert lab_white.min() >= 250
    for mode in ("1", "L", "YCbCr", "HSV", "RGBX"):
        assert to_rgb(Image.new(mode, (3, 2))).mode == "RGB"


def test_unusable_files_are_rejected_with_a_reason(tmp_path, monkeypatch):
    (tmp_path / "notes.jpg").write_text("this is not a photo")
    Image.new("RGB", (200, 200), "white").save(tmp_path / "whole.jpg")
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    Image.new("RGB", (40, 300)).save(tmp_path / "narrow.png")

    cases = {"notes.jpg": "not an image", "cut.jpg": "unreadable", "narrow.png": "too small: 40x300 px"}
    for name, reason in cases.items():
        with pytest.raises(ImageRejected) as caught:
            load_rgb(tmp_path / name)
        assert caught.value.reason.startswith(reason)
        assert str(caught.value).startswith(str(tmp_path / name))
        assert isinstance(caught.value, DataError)

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageRejected, match="too large to open safely"):
        load_rgb(tmp_path / "whole.jpg")


def test_exif_orientation_is_applied(tmp_path):
    upright = Image.new("RGB", (120, 80), "black")
    upright.paste((255, 0, 0), (0, 0, 30, 20))  # red block at the top-left
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # as a camera held sideways stores it
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    stored.save(tmp_path / "sideways.png", exif=exif)
    loaded = load_rgb(tmp_path / "sideways.png")
    assert loaded.size == (120, 80)
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(upright))


# ---------------------------------------------------------------- a folder of real photos

PORTRAIT = "portraits/IMG_0392_inputs.jpg"
ALIGNED_SOURCES = {"portrait.jpg": PORTRAIT, "alfw1.png": "portraits/alfw1.png",
                   "obama1.jpg": "album_obama/obama1.jpg", "two_people.jpg": "odd/two_people.jpg"}


def write_mode_variants(portrait: Image.Image, folder: Path) -> None:
    """The same portrait in other modes and formats, and stored sideways with an EXIF tag."""
    grey = portrait.convert("L")
    grey.save(folder / "grey_L.png")
    grey.convert("LA").save(folder / "grey_LA.png")
    Image.fromarray(np.asarray(grey).astype(np.uint16) * 257).save(folder / "grey_16bit.png")
    portrait.quantize(256).save(folder / "palette_P.png")
    portrait.convert("CMYK").save(folder / "cmyk.tif")
    cutout = portrait.convert("RGBA")
    alpha = Image.new("L", portrait.size, 0)
    ImageDraw.Draw(alpha).ellipse([20, 5, 204, 219], fill=255)
    cutout.putalpha(alpha)
    cutout.save(folder / "cutout_RGBA.png")
    exif = Image.Exif()
    exif[0x0112] = 8  # "rotate 90 degrees counter-clockwise to display"
    portrait.transpose(Image.Transpose.ROTATE_270).save(folder / "sideways_exif.png", exif=exif)


@pytest.fixture(scope="module")
def album(faces_dir, tmp_path_factory):
    """A folder of good photos, odd modes and unusable files, aligned once for the whole module."""
    pytest.importorskip("dlib")
    folder = tmp_path_factory.mktemp("album")
    for name, source in ALIGNED_SOURCES.items():
        shutil.copy(faces_dir / source, folder / name)
    portrait = Image.open(faces_dir / PORTRAIT).convert("RGB")
    write_mode_variants(portrait, folder)
    portrait.save(folder / "portrait.png")  # same output name as portrait.jpg
    (folder / "x.jpg").write_text("not a jpeg at all")
    data = (faces_dir / PORTRAIT).read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 4])
    portrait.resize((48, 48)).save(folder / "tiny.png")
    Image.new("RGB", (200, 160), (90, 120, 150)).save(folder / "no_face.png")
    shutil.copy(faces_dir / PORTRAIT, folder / ".hidden.jpg")
    (folder / "later").mkdir()
    shutil.copy(faces_dir / PORTRAIT, folder / "later" / "nested.jpg")
    output = tmp_path_factory.mktemp("aligned")
    summary = align_folder(folder, output, 256, transform_size=FAST, progress=False)
    return folder, output, summary


MODE_VARIANTS = ["grey_L", "grey_LA", "grey_16bit", "palette_P", "cmyk", "cutout_RGBA", "sideways_exif"]
REJECTED = {"portrait.png": "same output name portrait.png as portrait.jpg; rename one",
            "x.jpg": "not an image", "truncated.jpg": "unreadable", "tiny.png": "too small: 48x48 px",
            "no_face.png": "no face found"}


def test_folder_summary_and_rejected_list(album):
    _, output, summary = album
    assert isinstance(summary, AlignSummary)
    expected = {Path(n).stem for n in ALIGNED_SOURCES} | set(MODE_VARIANTS)
    assert {p.stem for p in summary.aligned} == expected
    assert sorted(p.name for p in output.glob("*.png")) == sorted(f"{n}.png" for n in expected)
    for path in summary.aligned:
        with Image.open(path) as image:
            assert image.size == (256, 256) and image.mode == "RGB"
    reasons = dict(summary.rejected)
    assert set(reasons) == set(REJECTED)  # hidden files and subfolders are not read
    for name, start in REJECTED.items():
        assert reasons[name].startswith(start)
    lines = (output / "rejected.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in lines) == sorted(REJECTED)
    assert all(line.count("\t") == 1 for line in lines)
    assert read_rejected(output) == set(REJECTED) and read_rejected(output / "nothing") == set()
    assert str(summary) == f"aligned {len(expected)}, rejected {len(REJECTED)} (see {output / 'rejected.txt'})"


@pytest.mark.parametrize("name", list(ALIGNED_SOURCES) + ["cutout_RGBA.png"])
def test_aligned_eyes_land_where_the_ffhq_quad_puts_them(album, name):
    """dlib on the aligned picture finds the eyes where the quad of the source landmarks maps them."""
    from diffrig.data.landmarks import detect_faces

    folder, output, _ = album
    source_face = detect_faces(load_rgb(folder / name))[0]  # the largest face, as the alignment used
    eyes = np.stack([source_face.landmarks[36:42].mean(0), source_face.landmarks[42:48].mean(0)])
    expected = aligned_coordinates(eyes, source_face.landmarks, 256)
    found = detect_faces(load_rgb(output / f"{Path(name).stem}.png"))
    assert len(found) >= 1
    lm = found[0].landmarks
    measured = np.stack([lm[36:42].mean(0), lm[42:48].mean(0)])
    assert np.abs(measured - expected).max() < 3.0
    # FFHQ's frame: eyes level with the middle of the picture, just above it, about a quarter apart.
    middle = expected.mean(0)
    assert abs(middle[0] - 127.5) < 10 and 0.42 * 256 < middle[1] < 0.5 * 256
    assert 0.2 * 256 < np.linalg.norm(expected[1] - expected[0]) < 0.3 * 256


def test_several_faces_keep_the_largest_and_say_so(album, faces_dir, caplog):
    from diffrig.data.landmarks import detect_faces

    with caplog.at_level("INFO", logger="diffrig.data.align"):
        result = align_photo(faces_dir / "odd/two_people.jpg", transform_size=FAST)
    assert result.faces_found == 2
    assert "2 faces found, using the largest" in caplog.text
    largest = detect_faces(load_rgb(faces_dir / "odd/two_people.jpg"))[0]
    np.testing.assert_array_equal(result.face.landmarks, largest.landmarks)
    np.testing.assert_array_equal(np.asarray(result.image), np.asarray(Image.open(album[1] / "two_people.png")))


def test_modes_align_like_the_original(album):
    folder, output, _ = album

    def pixels(stem):
        return np.asarray(Image.open(output / f"{stem}.png"), dtype=np.float64)

    original = pixels("portrait")
    grey = pixels("grey_L")
    np.testing.assert_array_equal(pixels("grey_16bit"), grey)  # 16-bit scaled exactly to 8-bit
    np.testing.assert_array_equal(pixels("grey_LA"), grey)
    np.testing.assert_array_equal(pixels("sideways_exif"), original)  # upright again before detection
    np.testing.assert_array_equal(pixels("cmyk"), original)
    assert np.abs(grey - original.mean(axis=2, keepdims=True)).mean() < 6
    assert np.abs(pixels("palette_P") - original).mean() < 6
    assert np.asarray(load_rgb(folder / "cutout_RGBA.png"))[:, :15].min() == 255  # transparent: white


def test_small_faces_rejected_on_request(faces_dir):
    with pytest.raises(ImageRejected, match=r"face too small: \d+ px wide \(needs at least 500 px\)"):
        align_photo(faces_dir / PORTRAIT, transform_size=FAST, min_face=500)


def test_second_run_keeps_finished_outputs(album):
    folder, output, first = album
    again = align_folder(folder, output, 256, transform_size=FAST, progress=False)
    assert again.aligned == [] and sorted(again.kept) == sorted(first.aligned)
    assert dict(again.rejected) == dict(first.rejected)


def test_recursive_mirrors_subfolders_and_skips_the_output_inside(faces_dir, tmp_path):
    folder = tmp_path / "photos"
    (folder / "trip").mkdir(parents=True)
    shutil.copy(faces_dir / PORTRAIT, folder / "trip" / "day1.jpg")
    (folder / "aligned").mkdir()
    Image.new("RGB", (300, 300)).save(folder / "aligned" / "stale.png")  # inside the output: not an input
    summary = align_folder(folder, folder / "aligned", 128, transform_size=FAST, recursive=True, progress=False)
    assert summary.aligned == [folder / "aligned" / "trip" / "day1.png"] and summary.rejected == []
    assert not (folder / "aligned" / "rejected.txt").exists()
    with Image.open(summary.aligned[0]) as image:
        assert image.size == (128, 128)


# ---------------------------------------------------------------- command line

def test_cli_aligns_one_file(faces_dir, tmp_path, capsys):
    pytest.importorskip("dlib")
    code = main(["-i", str(faces_dir / PORTRAIT), "-o", str(tmp_path), "-s", "64", "--transform_size", "256", "-q"])
    assert code == 0
    assert capsys.readouterr().out.strip() == "aligned 1, rejected 0"
    with Image.open(tmp_path / "IMG_0392_inputs.png") as image:
        assert image.size == (64, 64)


def test_cli_fails_clearly_when_nothing_aligns(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_text("text")
    Image.new("RGB", (20, 20)).save(photos / "b.png")
    assert main(["-i", str(photos), "-o", str(tmp_path / "out"), "-q"]) == 1
    captured = capsys.readouterr()
    assert captured.out.strip() == f"aligned 0, rejected 2 (see {tmp_path / 'out' / 'rejected.txt'})"
    assert captured.err.strip() == f"error: no face could be aligned in {photos}"
    assert (tmp_path / "out" / "rejected.txt").read_text() == (
        "a.jpg\tnot an image\nb.png\ttoo small: 20x20 px (needs at least 64 px on each side)\n")


def test_cli_user_mistakes_are_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["-i", str(empty), "-o", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.strip() == f"error: no files in {empty}: put the photos to align there"
    assert main(["-i", str(empty), "-o", str(empty)]) == 1
    assert "must differ from the input folder" in capsys.readouterr().err


def test_script_entry_point_without_traceback(tmp_path):
    missing = tmp_path / "nowhere"
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "align.py"), "-i", str(missing), "-o", str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [f"error: input {missing} does not exist: "
                                               "give a photo or a folder of photos with -i"]
