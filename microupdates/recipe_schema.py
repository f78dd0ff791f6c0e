"""The JSON Schema of a recipe file, generated from the Recipe model.

`microupdates updates schema` prints it, and docs/recipe.schema.json contains
a copy for editors (for example the YAML language server's `$schema` comment).
The schema describes the YAML as the operator writes it. It cannot express
every check of the model, such as normalised paths or unique package names,
so `microupdates updates validate` remains the full check.
"""

from __future__ import annotations

import json
from typing import Any, Dict

from microupdates.protocol.recipe import Recipe

# Pydantic 2 generates JSON Schema draft 2020-12.
SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_TITLE = "microupdates recipe"
SCHEMA_COMMENT = (
    "Generated from microupdates.protocol.recipe.Recipe; "
    "regenerate with `microupdates updates schema > docs/recipe.schema.json`."
)


def build_recipe_schema() -> Dict[str, Any]:
    """Return the recipe's JSON Schema with `$schema`, `title` and `$comment` first."""

    generated = Recipe.model_json_schema()
    schema: Dict[str, Any] = {"$schema": SCHEMA_DIALECT, "title": SCHEMA_TITLE, "$comment": SCHEMA_COMMENT}
    schema.update((key, value) for key, value in generated.items() if key != "title")
    return schema


def render_recipe_schema() -> str:
    """Return the schema as indented JSON ending in a newline, exactly as docs/recipe.schema.json stores it."""

    return json.dumps(build_recipe_schema(), indent=2, ensure_ascii=False) + "\n"
