"""The one-line stage descriptions that the Web UI shows as activity summaries."""

from __future__ import annotations

from microupdates.activities.deployments import MAX_STAGE_DESCRIPTION_CHARS, describe_stages
from microupdates.protocol.recipe import Recipe


def test_describe_stages_names_files_and_packages_but_no_command_text():
    recipe = Recipe.model_validate({
        "version": "1.0.0",
        "before": {"run": "export TOKEN=s3cret\nsystemctl stop app", "timeout_seconds": 30},
        "files": [{"source": "a", "destination": "/opt/app/a"}, {"source": "b", "destination": "/opt/app/b"}],
        "dependencies": {
            "apt": {"packages": [{"name": "curl", "version": "7.88.1-10"}]},
            "pip3": {"virtualenv": "/opt/app/venv", "packages": [{"name": "packaging", "version": "24.2"}]},
            "npm": {"directory": "/opt/app", "packages": [{"name": "is-number"}]},
        },
    })

    descriptions = describe_stages(recipe)

    assert descriptions["before"] == "bash script of 2 lines, timeout 30 s"
    assert "s3cret" not in descriptions["before"]
    assert descriptions["files"] == "2 files or directories: /opt/app/a, /opt/app/b"
    assert descriptions["dependencies"] == (
        "apt: curl=7.88.1-10; pip3 in /opt/app/venv: packaging==24.2; npm in /opt/app: is-number"
    )
    assert "after" not in descriptions


def test_describe_stages_shortens_long_descriptions():
    files = [{"source": f"f{index}", "destination": f"/opt/app/file-{index:03d}"} for index in range(100)]
    recipe = Recipe.model_validate({"version": "1.0.0", "files": files})

    description = describe_stages(recipe)["files"]

    assert len(description) == MAX_STAGE_DESCRIPTION_CHARS
    assert description.endswith("...")
