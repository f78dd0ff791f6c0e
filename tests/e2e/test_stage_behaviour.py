"""Stage behaviours checked through the whole system: commands, environment, files, interpreters."""

from __future__ import annotations

import os
import pwd
import stat

import pytest

from tests.stack_helpers import wait_for_deployment, write_recipe


def start_device(api, fleet, name: str, prepare=None):
    device = fleet.add(name, api.register_device(name, groups=[name])["token"])
    if prepare is not None:
        prepare(device.root)
    fleet.start(device)
    return device


def stage_steps(api, deployment_id: str, device: str, stage: str) -> list[dict]:
    stages = api.read_device_result(deployment_id, device)["stages"]
    return next(entry for entry in stages if entry["stage"] == stage)["steps"]


def test_crlf_script_is_rejected_with_reason(api, fleet, tmp_path, unique_name):
    name = f"crlf-{unique_name}"
    start_device(api, fleet, name)
    recipe = {"version": "1.0.0", "targets": {"devices": [name]}, "before": {"script": "stop.sh"}}
    update = api.create_update_from_file(
        write_recipe(tmp_path / "recipe", recipe, {"stop.sh": b"echo stopping\r\nexit 0\r\n"})
    )

    detail = wait_for_deployment(api, api.deploy(update["id"])["id"])

    row = detail["devices"][0]
    assert row["status"] == "failed"
    assert "CRLF" in row["error"], row["error"]


def test_stage_environment_is_minimal_and_documented(api, fleet, tmp_path, unique_name, monkeypatch):
    monkeypatch.setenv("AGENT_ONLY_SETTING", "must-not-leak")
    name = f"env-{unique_name}"
    start_device(api, fleet, name)
    recipe = {"version": "7.1.0", "targets": {"devices": [name]},
              "before": {"run": "env | sort; echo no-shebang-needed"}}
    update = api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe))

    detail = wait_for_deployment(api, api.deploy(update["id"])["id"])

    assert detail["status"] == "succeeded"
    output = stage_steps(api, detail["id"], name, "before")[0]["output"]
    variables = dict(line.split("=", 1) for line in output.splitlines() if "=" in line)
    assert "/usr/local/bin" in variables["PATH"].split(":")
    assert variables["HOME"]
    assert variables["LANG"]
    assert variables["USER"]
    assert variables["DEBIAN_FRONTEND"] == "noninteractive"
    assert variables["MICROUPDATES_UPDATE_VERSION"] == "7.1.0"
    assert variables["MICROUPDATES_STAGE"] == "before"
    assert "AGENT_ONLY_SETTING" not in variables


def test_directory_merges_by_default_and_replace_swaps_it(api, fleet, tmp_path, unique_name):
    def prepare(root):
        for folder in ("merge", "replace"):
            (root / "srv" / folder).mkdir(parents=True)
            (root / "srv" / folder / "old.txt").write_text("old\n")

    name = f"dirs-{unique_name}"
    device = start_device(api, fleet, name, prepare)
    source = tmp_path / "recipe" / "site"
    source.mkdir(parents=True)
    (source / "index.html").write_text("<h1>new</h1>\n")
    os.symlink("index.html", source / "default.html")
    recipe = {
        "version": "1.0.0",
        "targets": {"devices": [name]},
        "files": [
            {"source": "site", "destination": "/srv/merge"},
            {"source": "site", "destination": "/srv/replace", "replace": True},
        ],
    }
    update = api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe))

    detail = wait_for_deployment(api, api.deploy(update["id"])["id"])

    assert detail["status"] == "succeeded", detail
    merged = device.root / "srv/merge"
    replaced = device.root / "srv/replace"
    assert sorted(path.name for path in merged.iterdir()) == ["default.html", "index.html", "old.txt"]
    assert sorted(path.name for path in replaced.iterdir()) == ["default.html", "index.html"]
    assert os.readlink(merged / "default.html") == "index.html", "a symlink stays a symlink"


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_file_keeps_existing_mode_and_owner(api, fleet, tmp_path, unique_name):
    nobody = pwd.getpwnam("nobody")

    def prepare(root):
        config = root / "etc/app/app.conf"
        config.parent.mkdir(parents=True)
        config.write_text("old\n")
        os.chmod(config, 0o640)
        os.chown(config, nobody.pw_uid, nobody.pw_gid)

    name = f"owner-{unique_name}"
    device = start_device(api, fleet, name, prepare)
    recipe = {"version": "1.0.0", "targets": {"devices": [name]},
              "files": [{"source": "app.conf", "destination": "/etc/app/app.conf"}]}
    update = api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe, {"app.conf": b"new\n"}))

    detail = wait_for_deployment(api, api.deploy(update["id"])["id"])

    config = device.root / "etc/app/app.conf"
    assert detail["status"] == "succeeded"
    assert config.read_text() == "new\n"
    assert stat.S_IMODE(config.stat().st_mode) == 0o640
    assert (config.stat().st_uid, config.stat().st_gid) == (nobody.pw_uid, nobody.pw_gid)


def test_pip_step_reports_interpreter_it_used(api, fleet, tmp_path, unique_name):
    name = f"interp-{unique_name}"
    start_device(api, fleet, name)
    recipe = {"version": "1.0.0", "targets": {"devices": [name]},
              "dependencies": {"pip3": {"virtualenv": "/opt/tool/venv",
                                        "packages": [{"name": "six", "version": "1.16.0"}]}}}
    update = api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe))

    detail = wait_for_deployment(api, api.deploy(update["id"])["id"])

    assert detail["status"] == "succeeded", detail
    steps = stage_steps(api, detail["id"], name, "dependencies")
    interpreters = [step["interpreter"] for step in steps if step.get("interpreter")]
    venv_interpreters = [interpreter for interpreter in interpreters if "/opt/tool/venv/bin/python" in interpreter]
    assert venv_interpreters, interpreters
    assert all("(Python 3." in interpreter for interpreter in venv_interpreters), venv_interpreters
