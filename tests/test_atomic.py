import errno

import pytest
import torch

from diffrig.atomic import write_atomically
from diffrig.errors import DiffrigError
from diffrig.pipeline import save_png


def disk_full(stream):
    stream.write(b"half a file")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_write_leaves_the_old_file_and_no_partial_one(tmp_path):
    target = tmp_path / "sub" / "result.bin"
    assert write_atomically(target, lambda stream: stream.write(b"first")) == target
    with pytest.raises(OSError, match="No space left"):
        write_atomically(target, disk_full)
    assert target.read_bytes() == b"first"
    with pytest.raises(OSError):
        write_atomically(tmp_path / "new.bin", disk_full)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["result.bin", "sub"]


def test_save_png_on_a_full_disk_is_one_clear_error(tmp_path, monkeypatch):
    image = torch.rand(3, 8, 8)
    path = save_png(image, tmp_path / "edit.png")
    before = path.read_bytes()
    monkeypatch.setattr("PIL.Image.Image.save", lambda self, stream, format=None: disk_full(stream))
    with pytest.raises(DiffrigError, match=r"could not write .*edit.png \(No space left on device\); is the disk full"):
        save_png(torch.rand(3, 8, 8), path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["edit.png"]
