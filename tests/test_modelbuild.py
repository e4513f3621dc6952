"""``accelshim models build``: the real export (torch in the build environment), once, into a
folder every user can read (the shim image builds it as root and serves it as user 10001)."""
from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from shim.modelbuild import MODEL, build, default_build_python, is_intact
from shim.modelrepo import ModelRepository


@pytest.fixture(scope="module")
def build_python() -> str:
    python = default_build_python()
    if not Path(python).is_file():
        pytest.fail(f"no build environment at {python}: run `make build-env` (make test does)")
    return python


def _others_can_read(folder: Path) -> bool:
    """``folder`` can be listed and entered, and its files read, by every user."""
    wanted = {folder: stat.S_IROTH | stat.S_IXOTH, **{path: stat.S_IROTH for path in folder.iterdir()}}
    return all(path.stat().st_mode & bits == bits for path, bits in wanted.items())


def test_a_build_is_complete_checked_and_readable_by_every_user(tmp_path, build_python):
    assert build(tmp_path, build_python) is True
    folder = tmp_path / MODEL
    assert is_intact(folder) and _others_can_read(folder)
    assert [p.name for p in tmp_path.iterdir()] == [MODEL]  # no staging folder left
    config = ModelRepository(tmp_path).load(MODEL, verify=True)
    assert len(config.labels) == 1000 and json.loads((folder / "model.json").read_text())["opset"] == 17
    before = (folder / "model.onnx").stat().st_mtime_ns
    folder.chmod(0o700)  # as the builds before this one left it
    assert build(tmp_path, build_python) is False  # intact: not built again, but made readable
    assert (folder / "model.onnx").stat().st_mtime_ns == before and _others_can_read(folder)


def test_a_missing_build_environment_is_said_and_leaves_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match="make build-env"):
        build(tmp_path, str(tmp_path / "no-such-python"))
    assert list(tmp_path.iterdir()) == []



def test_an_intact_readable_model_is_not_touched(tmp_path, build_python):
    """Modes already right are not set again (a chmod changes the inode's ctime even to the same
    mode): a user who does not own the model (the image's user 10001 and its root-built /opt), or a
    read-only mount, gets "up to date" rather than a PermissionError."""
    assert build(tmp_path, build_python) is True
    paths = [tmp_path / MODEL, *(tmp_path / MODEL).iterdir()]
    before = [p.stat().st_ctime_ns for p in paths]
    assert build(tmp_path, build_python) is False
    assert [p.stat().st_ctime_ns for p in paths] == before
