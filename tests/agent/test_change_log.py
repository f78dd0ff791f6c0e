"""The change log's files on disk: numbering, atomic writes, completion markers and discarding."""

from __future__ import annotations

import json
import os

import pytest

from microupdates.device_agent.change_log import (
    ChangeLog,
    ManagerRecord,
    PackagesRecord,
    PackageVersion,
    PathRecord,
)


def _record(path: str) -> PathRecord:
    return PathRecord(path=path, action="write", existed=False)


def test_change_log_numbers_batches_in_order(tmp_path):
    log = ChangeLog(str(tmp_path), "dep-1")

    first = log.append_path_records([_record("/a"), _record("/b")])
    second = log.append_path_records([_record("/c")])

    assert (first, second) == (1, 2)
    assert sorted(os.listdir(log.files_directory)) == ["000001.json", "000002.json"]
    assert [(sequence, [record.path for record in records]) for sequence, records in log.read_path_records()] == [
        (1, ["/a", "/b"]),
        (2, ["/c"]),
    ]


def test_change_log_ignores_interrupted_write(tmp_path):
    log = ChangeLog(str(tmp_path), "dep-1")
    log.append_path_records([_record("/a")])
    leftover = os.path.join(log.files_directory, ".microupdates-abc.tmp")
    with open(leftover, "w") as writer:
        writer.write('[{"path": "/half')

    assert [sequence for sequence, _ in log.read_path_records()] == [1]
    assert log.append_path_records([_record("/b")]) == 2


def test_change_log_is_private(tmp_path):
    log = ChangeLog(str(tmp_path), "dep-1")

    log.append_path_records([_record("/a")])

    assert os.stat(log.backup_directory).st_mode & 0o777 == 0o700
    assert os.stat(os.path.join(log.files_directory, "000001.json")).st_mode & 0o777 == 0o600


def test_change_log_reads_records_written_by_another_instance(tmp_path):
    record = PackagesRecord(
        managers=[ManagerRecord(manager="pip3", timeout_seconds=60, packages=[PackageVersion(name="six")])]
    )
    ChangeLog(str(tmp_path), "dep-1").append_packages(record)

    assert ChangeLog(str(tmp_path), "dep-1").read_packages() == [(1, record)]


def test_change_log_keeps_unknown_fields_readable(tmp_path):
    log = ChangeLog(str(tmp_path), "dep-1")
    log.append_path_records([_record("/a")])
    path = os.path.join(log.files_directory, "000001.json")
    with open(path) as reader:
        content = json.load(reader)
    content[0]["added_by_newer_agent"] = True
    with open(path, "w") as writer:
        json.dump(content, writer)

    assert log.read_path_records()[0][1][0].path == "/a"


def test_change_log_completion_marker(tmp_path):
    log = ChangeLog(str(tmp_path), "dep-1")

    assert log.completed_through("revert_files") is None
    log.mark_completed("revert_files", 3)

    assert ChangeLog(str(tmp_path), "dep-1").completed_through("revert_files") == 3


@pytest.mark.parametrize("deployment_id", ["", ".", "..", "../x", "a/b", ".hidden", "x" * 200])
def test_change_log_rejects_unsafe_deployment_id(tmp_path, deployment_id):
    with pytest.raises(ValueError, match="cannot name a change log directory"):
        ChangeLog(str(tmp_path), deployment_id)


def test_change_log_discard_removes_outside_backups(tmp_path):
    log = ChangeLog(str(tmp_path / "state"), "dep-1")
    aside = tmp_path / "opt" / ".microupdates-previous-app"
    aside.mkdir(parents=True)
    (aside / "old.txt").write_text("old")
    log.append_path_records(
        [PathRecord(path=str(tmp_path / "opt/app"), action="replace_directory", existed=True, backup=str(aside))]
    )

    log.discard()

    assert not os.path.exists(log.directory)
    assert not aside.exists()
