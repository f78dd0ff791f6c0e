from __future__ import annotations

import hashlib
import os
import stat
import tarfile
from pathlib import Path
from typing import Optional

import pytest

from microupdates.device_agent.change_log import ChangeLog
from microupdates.device_agent.executors.files import install_files
from microupdates.protocol.recipe import FileEntry
from tests.agent.artifacts import ArtifactStore, dir_member, file_member, link_member, tar_bytes


@pytest.fixture
def store(tmp_path):
    return ArtifactStore(tmp_path / "artifacts")


@pytest.fixture
def root(tmp_path):
    device_root = tmp_path / "device"
    device_root.mkdir()
    return device_root


def _file_entry(destination: str, digest: str, mode: Optional[str] = None) -> FileEntry:
    return FileEntry(source="src", destination=destination, artifact=digest, mode=mode, kind="file")


def _install(entries, root, store, change_log=None):
    return install_files(entries, device_root=str(root), open_artifact=store.open, change_log=change_log)


def _recorded(change_log: ChangeLog):
    """Return (action, path, existed, kind) of every record in the log but those of temporary files, in order."""

    return [
        (record.action, record.path, record.existed, record.kind)
        for _, records in change_log.read_path_records()
        for record in records
        if record.action != "temporary"
    ]


def _no_leftovers(directory: Path) -> bool:
    return not [name for name in os.listdir(directory) if name.startswith(".microupdates-")]


def test_install_file_new_with_default_mode(root, store):
    digest = store.add(b"print('hello')\n")

    steps = _install([_file_entry("/opt/app/server.py", digest)], root, store)

    target = root / "opt/app/server.py"
    assert [step.name for step in steps] == ["file /opt/app/server.py"]
    assert steps[0].error is None
    assert target.read_bytes() == b"print('hello')\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_install_file_creates_parent_directories(root, store):
    digest = store.add(b"x")

    steps = _install([_file_entry("/a/b/c/file", digest)], root, store)

    assert steps[0].error is None
    for directory in ("a", "a/b", "a/b/c"):
        assert stat.S_IMODE((root / directory).stat().st_mode) == 0o755
    assert _no_leftovers(root / "a/b/c")


def test_install_file_applies_requested_mode(root, store):
    digest = store.add(b"#!/bin/sh\n")

    steps = _install([_file_entry("/usr/local/bin/tool", digest, mode="0750")], root, store)

    assert steps[0].error is None
    assert stat.S_IMODE((root / "usr/local/bin/tool").stat().st_mode) == 0o750


def test_install_file_keeps_existing_mode(root, store):
    target = root / "etc/app.conf"
    target.parent.mkdir(parents=True)
    target.write_text("old")
    target.chmod(0o600)
    digest = store.add(b"new")

    steps = _install([_file_entry("/etc/app.conf", digest)], root, store)

    assert steps[0].error is None
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_install_file_replaces_atomically(root, store):
    target = root / "opt/app.bin"
    target.parent.mkdir(parents=True)
    target.write_text("old")
    old_inode = target.stat().st_ino
    digest = store.add(b"new")

    steps = _install([_file_entry("/opt/app.bin", digest)], root, store)

    assert steps[0].error is None
    assert target.stat().st_ino != old_inode
    assert target.read_text() == "new"
    assert _no_leftovers(target.parent)


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_install_file_keeps_existing_owner(root, store):
    target = root / "srv/data.txt"
    target.parent.mkdir(parents=True)
    target.write_text("old")
    os.chown(target, 12345, 12346)
    digest = store.add(b"new")

    steps = _install([_file_entry("/srv/data.txt", digest)], root, store)

    assert steps[0].error is None
    assert (target.stat().st_uid, target.stat().st_gid) == (12345, 12346)


def test_install_file_sha_mismatch_is_rejected(root, store):
    digest = store.add(b"expected content")
    Path(store.open(digest)).write_bytes(b"tampered content")
    actual = hashlib.sha256(b"tampered content").hexdigest()

    steps = _install([_file_entry("/opt/app/file", digest)], root, store)

    assert digest in steps[0].error
    assert actual in steps[0].error
    assert not (root / "opt/app/file").exists()
    assert _no_leftovers(root / "opt/app")


def test_install_file_stops_at_first_failure(root, store):
    good = store.add(b"good")
    bad = store.add(b"bad")
    Path(store.open(bad)).write_bytes(b"changed")
    entries = [_file_entry("/one", good), _file_entry("/two", bad), _file_entry("/three", good)]

    steps = _install(entries, root, store)

    assert [step.name for step in steps] == ["file /one", "file /two"]
    assert steps[0].error is None
    assert "SHA-256" in steps[1].error
    assert not (root / "three").exists()


def test_install_file_over_directory_fails(root, store):
    (root / "opt/app").mkdir(parents=True)
    digest = store.add(b"x")

    steps = _install([_file_entry("/opt/app", digest)], root, store)

    assert "is a directory" in steps[0].error


def test_install_file_records_changes(root, store, tmp_path):
    existing = root / "opt/existing"
    existing.parent.mkdir(parents=True)
    existing.write_text("old")
    digest = store.add(b"new")
    change_log = ChangeLog(str(tmp_path / "state"), "dep-1")

    _install([_file_entry("/opt/existing", digest), _file_entry("/opt/new/file", digest)], root, store, change_log)

    assert _recorded(change_log) == [
        ("write", str(existing), True, "file"),
        ("create_directory", str(root / "opt/new"), False, None),
        ("write", str(root / "opt/new/file"), False, None),
    ]


def test_install_file_rejects_path_escaping_root(root, store):
    digest = store.add(b"x")
    entry = FileEntry.model_construct(source="s", destination="/../outside", artifact=digest, kind="file", mode=None)

    steps = _install([entry], root, store)

    assert "outside the device root" in steps[0].error
    assert not (root.parent / "outside").exists()


def test_install_directory_new(root, store):
    archive = tar_bytes(
        [
            (dir_member("./"), None),
            (file_member("./server.py", 0o755), b"server"),
            (dir_member("./static", 0o750), None),
            (file_member("./static/index.html"), b"<html>"),
            (link_member("./current", "static"), None),
        ]
    )
    digest = store.add(archive)
    entry = FileEntry(source="app", destination="/opt/app", artifact=digest, kind="directory")

    steps = _install([entry], root, store)

    app = root / "opt/app"
    assert steps[0].name == "directory /opt/app"
    assert steps[0].error is None
    assert (app / "server.py").read_text() == "server"
    assert stat.S_IMODE((app / "server.py").stat().st_mode) == 0o755
    assert stat.S_IMODE((app / "static").stat().st_mode) == 0o750
    assert (app / "static/index.html").read_text() == "<html>"
    assert os.readlink(app / "current") == "static"
    assert stat.S_IMODE(app.stat().st_mode) == 0o755
    assert _no_leftovers(root / "opt")


def test_install_directory_merges_into_existing(root, store):
    app = root / "opt/app"
    (app / "lib").mkdir(parents=True)
    (app / "keep.txt").write_text("keep")
    (app / "lib/old.py").write_text("old")
    replaced = app / "lib/mod.py"
    replaced.write_text("old module")
    old_inode = replaced.stat().st_ino
    archive = tar_bytes(
        [
            (file_member("lib/mod.py"), b"new module"),
            (file_member("lib/sub/new.py"), b"new file"),
        ],
        compression="",
    )
    digest = store.add(archive)
    entry = FileEntry(source="app", destination="/opt/app", artifact=digest, kind="directory")
    change_log = ChangeLog(str(root.parent / "state"), "dep-1")

    steps = _install([entry], root, store, change_log)

    assert steps[0].error is None
    assert (app / "keep.txt").read_text() == "keep"
    assert (app / "lib/old.py").read_text() == "old"
    assert replaced.read_text() == "new module"
    assert replaced.stat().st_ino != old_inode
    assert (app / "lib/sub/new.py").read_text() == "new file"
    recorded = _recorded(change_log)
    assert ("write", str(replaced), True, "file") in recorded
    assert ("create_directory", str(app / "lib/sub"), False, None) in recorded
    assert ("write", str(app / "lib/sub/new.py"), False, None) in recorded
    assert _no_leftovers(root / "opt")


def test_install_directory_applies_entry_mode(root, store):
    digest = store.add(tar_bytes([(file_member("a"), b"a")]))
    entry = FileEntry(source="d", destination="/srv/d", artifact=digest, kind="directory", mode="0700")

    steps = _install([entry], root, store)

    assert steps[0].error is None
    assert stat.S_IMODE((root / "srv/d").stat().st_mode) == 0o700


def test_install_directory_strips_setuid(root, store):
    digest = store.add(tar_bytes([(file_member("tool", 0o4755), b"#!/bin/sh\n")]))
    entry = FileEntry(source="d", destination="/srv/d", artifact=digest, kind="directory")

    steps = _install([entry], root, store)

    assert steps[0].error is None
    assert stat.S_IMODE((root / "srv/d/tool").stat().st_mode) == 0o755


@pytest.mark.parametrize(
    "member, reason",
    [
        (file_member("../evil"), "contains '..'"),
        (file_member("sub/../../evil"), "contains '..'"),
        (file_member("/etc/evil"), "absolute path"),
        (link_member("link", "/etc/passwd"), "absolute path"),
        (link_member("sub/link", "../../outside"), "outside the destination"),
        (link_member("hard", "../outside", tarfile.LNKTYPE), "outside the destination"),
    ],
)
def test_install_directory_rejects_unsafe_member(root, store, member, reason):
    digest = store.add(tar_bytes([(file_member("fine.txt"), b"fine"), (member, b"x" if member.isreg() else None)]))
    entry = FileEntry(source="d", destination="/srv/app", artifact=digest, kind="directory")

    steps = _install([entry], root, store)

    assert steps[0].error is not None
    assert repr(member.name) in steps[0].error
    assert reason in steps[0].error
    assert not (root / "srv").exists()


def test_install_directory_rejects_device_file(root, store):
    device = tarfile.TarInfo("null")
    device.type = tarfile.CHRTYPE
    device.devmajor, device.devminor = 1, 3
    digest = store.add(tar_bytes([(device, None)]))
    entry = FileEntry(source="d", destination="/srv/app", artifact=digest, kind="directory")

    steps = _install([entry], root, store)

    assert "'null' is a device file" in steps[0].error


def test_install_directory_rejects_member_below_symlink(root, store):
    archive = tar_bytes([(link_member("up", "."), None), (link_member("up/escape", "../secret"), None)])
    digest = store.add(archive)
    entry = FileEntry(source="d", destination="/srv/app", artifact=digest, kind="directory")

    steps = _install([entry], root, store)

    assert "'up/escape' lies inside a symbolic link" in steps[0].error
    assert not (root / "srv/app").exists()


def test_install_directory_sha_mismatch_is_rejected(root, store):
    digest = store.add(tar_bytes([(file_member("a"), b"a")]))
    Path(store.open(digest)).write_bytes(tar_bytes([(file_member("b"), b"b")]))

    steps = _install([FileEntry(source="d", destination="/srv/d", artifact=digest, kind="directory")], root, store)

    assert f"expects {digest}" in steps[0].error
    assert not (root / "srv/d").exists()


def test_install_directory_over_file_fails(root, store):
    (root / "srv").mkdir()
    (root / "srv/d").write_text("a file")
    digest = store.add(tar_bytes([(file_member("a"), b"a")]))

    steps = _install([FileEntry(source="d", destination="/srv/d", artifact=digest, kind="directory")], root, store)

    assert "exists and is not a directory" in steps[0].error
    assert (root / "srv/d").read_text() == "a file"


def test_install_directory_corrupt_archive_fails(root, store):
    digest = store.add(b"this is not a tar archive" * 40)

    steps = _install([FileEntry(source="d", destination="/srv/d", artifact=digest, kind="directory")], root, store)

    assert steps[0].error is not None
    assert not (root / "srv").exists()


def test_install_files_missing_artifact_digest(root, store):
    entry = FileEntry(source="src", destination="/opt/x")

    steps = _install([entry], root, store)

    assert steps[0].error == "the entry for /opt/x has no artifact digest"
