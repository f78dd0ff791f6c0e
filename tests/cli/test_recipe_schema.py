"""docs/recipe.schema.json must match the Recipe model."""

from __future__ import annotations

import json
from pathlib import Path

from microupdates.protocol.recipe import Recipe
from microupdates.recipe_schema import render_recipe_schema

SCHEMA_FILE = Path(__file__).resolve().parents[2] / "docs" / "recipe.schema.json"


def test_recipe_schema_file_is_current():
    committed = SCHEMA_FILE.read_text() if SCHEMA_FILE.exists() else ""

    assert committed == render_recipe_schema(), (
        "docs/recipe.schema.json does not match microupdates.protocol.recipe.Recipe; regenerate it with "
        "`.venv/bin/microupdates updates schema > docs/recipe.schema.json` and commit the result"
    )


def test_recipe_schema_lists_every_recipe_field():
    schema = json.loads(render_recipe_schema())

    assert set(schema["properties"]) == set(Recipe.model_fields)
    assert schema["additionalProperties"] is False
    assert schema["required"] == ["version"]
