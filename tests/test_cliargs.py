"""diffrig.cliargs: the helpers every command line shares, and a bad --device as one line on stderr."""

import argparse

import pytest
import torch

from diffrig.cliargs import check_device, str2bool
from diffrig.errors import DiffrigError


def test_str2bool_reads_the_official_spellings():
    assert [str2bool(t) for t in ("True", "yes", "1", "on")] == [True] * 4
    assert [str2bool(t) for t in ("false", "NO", "0", "off")] == [False] * 4
    with pytest.raises(argparse.ArgumentTypeError, match="expected true or false"):
        str2bool("maybe")


def test_check_device_accepts_what_this_machine_has():
    assert check_device(None) is None
    assert check_device("cpu") == "cpu"
    with pytest.raises(DiffrigError, match="unknown device 'gpu'"):
        check_device("gpu")
    if torch.cuda.is_available():
        assert check_device("cuda") == "cuda"
        with pytest.raises(DiffrigError, match="CUDA device"):
            check_device(f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(DiffrigError, match="CUDA is not available on this machine; use --device cpu"):
            check_device("cuda:0")


@pytest.mark.parametrize("command", ["create_data", "make_synthetic", "demo"])
def test_commands_refuse_an_unknown_device_in_one_line(command, tmp_path, capsys):
    if command == "create_data":
        from diffrig.data.create import main

        (tmp_path / "photos").mkdir()
        argv = ["--data_dir", str(tmp_path / "photos"), "--output_dir", str(tmp_path / "out.lmdb")]
    elif command == "make_synthetic":
        from diffrig.data.synthetic.cli import main

        argv = ["--identities", "1", "--size", "64", "--output_dir", str(tmp_path / "out")]
    else:
        from diffrig.demo import main

        argv = ["--output_dir", str(tmp_path / "out")]
    assert main(argv + ["--device", "gpu", "-q"]) == 1
    err = capsys.readouterr().err
    assert err == "error: unknown device 'gpu': use cpu, cuda or cuda:N\n"
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.lmdb").exists()
