from __future__ import annotations

import pytest

from microupdates.device_agent.device_paths import map_device_path


def test_map_device_path_without_root_is_unchanged():
    assert map_device_path("/opt/app/server.py", None) == "/opt/app/server.py"


def test_map_device_path_places_path_under_root(tmp_path):
    assert map_device_path("/opt/app/server.py", str(tmp_path)) == f"{tmp_path}/opt/app/server.py"


def test_map_device_path_normalises_root_and_path(tmp_path):
    assert map_device_path("/opt//app/./x", f"{tmp_path}/") == f"{tmp_path}/opt/app/x"


def test_map_device_path_allows_dotdot_staying_inside(tmp_path):
    assert map_device_path("/opt/app/../lib/x", str(tmp_path)) == f"{tmp_path}/opt/lib/x"


@pytest.mark.parametrize("path", ["/../etc/passwd", "/opt/../../etc", "/.."])
def test_map_device_path_rejects_escape(tmp_path, path):
    with pytest.raises(ValueError, match="outside the device root") as raised:
        map_device_path(path, str(tmp_path))

    assert repr(path) in str(raised.value)


def test_map_device_path_rejects_prefix_sibling(tmp_path):
    root = tmp_path / "dev"

    with pytest.raises(ValueError, match="outside the device root"):
        map_device_path("/../dev-other/x", str(root))


def test_map_device_path_rejects_relative_path(tmp_path):
    with pytest.raises(ValueError, match="not absolute"):
        map_device_path("opt/app", str(tmp_path))


def test_map_device_path_rejects_nul(tmp_path):
    with pytest.raises(ValueError, match="NUL"):
        map_device_path("/opt/\x00app", str(tmp_path))


def test_map_device_path_root_slash_is_identity():
    assert map_device_path("/opt/app", "/") == "/opt/app"
