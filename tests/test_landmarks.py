"""dlib face detection and 68 landmarks: layout, large and small pictures, several faces, missing extra."""

import sys

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("dlib")

from diffrig.data import landmarks as landmarks_module  # noqa: E402
from diffrig.data.images import load_rgb  # noqa: E402
from diffrig.data.landmarks import detect_faces, load_dlib_models  # noqa: E402
from diffrig.errors import DataError  # noqa: E402

PORTRAIT = "portraits/IMG_0392_inputs.jpg"


@pytest.fixture(scope="module")
def portrait(faces_dir):
    return load_rgb(faces_dir / PORTRAIT)


def test_portrait_has_one_face_with_the_68_point_layout(portrait):
    faces = detect_faces(portrait)
    assert len(faces) == 1
    face = faces[0]
    lm = face.landmarks
    assert lm.shape == (68, 2) and lm.dtype == np.float64
    left, top, right, bottom = face.box
    assert face.width == pytest.approx(right - left) and 80 < face.width < 224
    # Eyes and nose inside the box; picture-left eye (36-41) left of the other; eyes above nose above mouth.
    inner = lm[17:48]
    assert (inner[:, 0] > left - 5).all() and (inner[:, 0] < right + 5).all()
    eye_a, eye_b = lm[36:42].mean(0), lm[42:48].mean(0)
    assert eye_a[0] < eye_b[0]
    assert max(eye_a[1], eye_b[1]) < lm[30, 1] < lm[48:60, 1].mean()
    # Jaw runs left to right across the face.
    assert lm[0, 0] < lm[8, 0] < lm[16, 0]


def test_array_input_equals_pil_input(portrait):
    from_pil = detect_faces(portrait)[0]
    from_array = detect_faces(np.asarray(portrait))[0]
    np.testing.assert_array_equal(from_pil.landmarks, from_array.landmarks)


def test_large_photo_detected_on_a_downscaled_copy_with_full_resolution_landmarks(faces_dir):
    photo = load_rgb(faces_dir / "album_obama/obama1.jpg")  # 1480 x 832
    fast = detect_faces(photo, max_side=512)
    full = detect_faces(photo, max_side=4096)
    assert len(fast) == len(full) == 1
    # The box is found at a third of the size, yet landmarks are in full-resolution pixels.
    assert fast[0].width == pytest.approx(full[0].width, rel=0.15)
    shift = np.linalg.norm(fast[0].landmarks - full[0].landmarks, axis=1)
    assert shift.mean() < 0.03 * full[0].width


def test_small_face_found_by_the_upsampled_second_pass(portrait):
    canvas = Image.new("RGB", (200, 200), (128, 128, 128))
    canvas.paste(portrait.resize((60, 60), Image.Resampling.LANCZOS), (70, 60))
    detector, _ = load_dlib_models()
    assert len(detector(np.asarray(canvas), 0)) == 0  # too small for one pass at the original size
    faces = detect_faces(canvas)
    assert len(faces) == 1
    expected = detect_faces(portrait)[0].landmarks * (60 / 224) + [70, 60]
    assert np.abs(faces[0].landmarks - expected).mean() < 2.0


def test_several_faces_largest_first(faces_dir):
    faces = detect_faces(load_rgb(faces_dir / "odd/two_people.jpg"))
    assert len(faces) == 2
    assert faces[0].area > faces[1].area
    assert faces[0].box[0] > faces[1].box[2]  # the larger one is the man on the right


def test_no_face_in_a_plain_picture():
    assert detect_faces(Image.new("RGB", (160, 120), (120, 130, 140))) == []


def test_non_rgb_array_rejected():
    with pytest.raises(DataError, match="RGB"):
        detect_faces(np.zeros((64, 64), dtype=np.uint8))


def test_models_loaded_once():
    assert load_dlib_models() is load_dlib_models()


def test_missing_predictor_file_names_the_extra(monkeypatch):
    import diffrig.info

    monkeypatch.setattr(diffrig.info, "dlib_models", lambda: {})
    with pytest.raises(DataError, match=r'pip install "diffrig\[faces\]"'):
        load_dlib_models.__wrapped__(None)  # uncached, so the real models stay loaded


def test_missing_dlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "dlib", None)
    with pytest.raises(DataError, match=r'dlib: .*pip install "diffrig\[faces\]"'):
        load_dlib_models.__wrapped__(None)


def test_corrupt_predictor_file(tmp_path):
    bad = tmp_path / "shape_predictor_68_face_landmarks.dat"
    bad.write_bytes(b"not a model")
    with pytest.raises(DataError, match="cannot load the landmark model"):
        landmarks_module.load_dlib_models.__wrapped__(str(bad))
