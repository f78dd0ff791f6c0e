"""`microupdates updates`: local validation, and creating, listing and showing updates."""

from __future__ import annotations

import json
import yaml

from microupdates.recipe_schema import render_recipe_schema
from tests.cli.conftest import invoke, isolated_environment
from tests.stack_helpers import write_recipe

INVALID_RECIPE = """\
version: "1.0.0"
targets:
  groups: [lab]
files:
  - source: app.txt
    destination: opt/app.txt
befor:
  run: "true"
"""


def test_updates_validate_accepts_valid_recipe(tmp_path, config_home):
    recipe = write_recipe(tmp_path / "recipe", {"version": "1.0.0", "before": {"run": "true"},
                                                "files": [{"source": "a.txt", "destination": "/opt/a.txt"}]},
                          {"a.txt": b"a\n"})

    result = invoke(["updates", "validate", str(recipe)], isolated_environment(config_home))

    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"{recipe}: valid; version 1.0.0; stages: before, files"


def test_updates_validate_reports_each_problem_with_its_line(tmp_path, config_home):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(INVALID_RECIPE)
    (tmp_path / "app.txt").write_text("app\n")

    result = invoke(["updates", "validate", str(recipe)], isolated_environment(config_home))

    assert result.exit_code == 1
    assert result.stdout == ""
    problems = result.stderr.splitlines()
    assert problems[0].startswith(f"Error: {recipe}:6: files[0].destination: must be an absolute path")
    assert problems[1] == f"Error: {recipe}:7: befor: unknown field 'befor'; did you mean 'before'?"
    assert "Traceback" not in result.output


def test_top_level_validate_alias_still_works(tmp_path, config_home):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(INVALID_RECIPE)

    result = invoke(["validate", str(recipe)], isolated_environment(config_home))

    assert result.exit_code == 1
    assert f"{recipe}:6: files[0].destination" in result.stderr


def test_updates_create_list_and_show(cli, tmp_path, unique_name):
    version = f"4.0.{int(unique_name, 16) % 1000}"
    recipe = write_recipe(tmp_path / "recipe", {
        "version": version,
        "comment": f"created by the CLI test {unique_name}",
        "targets": {"groups": [f"lab-{unique_name}"]},
        "files": [{"source": "app.txt", "destination": "/opt/app.txt", "mode": "0644"}],
        "after": {"run": "echo done"},
    }, {"app.txt": b"app\n"})

    created = cli("updates", "create", str(recipe), "--json")
    update = json.loads(created.stdout)
    listed = cli("updates", "list")
    shown = cli("updates", "show", update["id"])

    assert created.exit_code == 0, created.output
    assert update["version"] == version
    row = next(line for line in listed.stdout.splitlines() if line.startswith(update["id"]))
    assert version in row
    assert "files, after" in row
    assert f"created by the CLI test {unique_name}" in row
    assert shown.exit_code == 0, shown.output
    assert f"lab-{unique_name}" in shown.stdout
    recipe_yaml = shown.stdout[shown.stdout.index("version:"):]
    stored = yaml.safe_load(recipe_yaml)
    assert stored["files"][0]["destination"] == "/opt/app.txt"
    assert len(stored["files"][0]["artifact"]) == 64


def test_updates_create_invalid_recipe_uploads_nothing(cli, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(INVALID_RECIPE)

    result = cli("updates", "create", str(recipe))

    assert result.exit_code == 1
    assert f"{recipe}:6: files[0].destination" in result.stderr


def test_updates_show_missing_update_is_not_found(cli):
    result = cli("updates", "show", "upd-missing")

    assert result.exit_code == 1
    assert result.stderr.strip() == "Error: GET /updates/upd-missing failed with HTTP 404: Update 'upd-missing' not found."


def test_updates_schema_prints_the_recipe_schema(config_home):
    result = invoke(["updates", "schema"], isolated_environment(config_home))

    assert result.exit_code == 0, result.output
    assert result.stdout == render_recipe_schema()
    schema = json.loads(result.stdout)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["title"] == "microupdates recipe"
    assert "version" in schema["required"]
