"""Examples in the docs, the README, deploy/ and examples/ are valid input for the code that reads them.

Every ```yaml block in docs/*.md and README.md is either a recipe, with a
top-level `version`, or an agent configuration whose first line is
`# agent config`. Each block is one test case named FILE:LINE.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List

import pytest
import yaml

from microupdates.device_agent.config import DEFAULT_PASS_ENVIRONMENT, AgentConfig, load_config
from microupdates.protocol.recipe import Recipe
from microupdates.recipe_files import load_recipe_file

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = sorted((REPO_ROOT / "docs").glob("*.md")) + [REPO_ROOT / "README.md"]
AGENT_CONFIG_EXAMPLE = REPO_ROOT / "deploy" / "agent.yaml.example"
AGENT_CONFIG_MARKER = "# agent config"

# An opening fence: indentation (fences inside list items are indented), then ``` and the language.
OPENING_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<language>[A-Za-z0-9_+-]*)\s*$")


@dataclass(frozen=True)
class CodeBlock:
    path: Path
    line: int
    language: str
    text: str

    @property
    def label(self) -> str:
        return f"{self.path.relative_to(REPO_ROOT)}:{self.line}"


def read_code_blocks(path: Path) -> List[CodeBlock]:
    """Return the fenced code blocks of a Markdown file, their indentation removed, with the fence's 1-based line."""

    blocks = []
    lines = path.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        opening = OPENING_FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue

        fence_line = index + 1
        indent = opening.group("indent")
        body = []
        index += 1
        while index < len(lines) and lines[index].strip() != "```":
            line = lines[index]
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
            index += 1
        if index == len(lines):
            location = f"{path.relative_to(REPO_ROOT)}:{fence_line}"
            raise AssertionError(f"{location}: the code block opened here is never closed")
        blocks.append(CodeBlock(path, fence_line, opening.group("language"), "\n".join(body) + "\n"))
        index += 1
    return blocks


def collect_blocks(language: str) -> List[CodeBlock]:
    return [block for path in DOCUMENTS if path.exists() for block in read_code_blocks(path)
            if block.language == language]


def is_agent_config(block: CodeBlock) -> bool:
    first_line = next((line.strip() for line in block.text.splitlines() if line.strip()), "")
    return first_line == AGENT_CONFIG_MARKER


YAML_BLOCKS = collect_blocks("yaml")
RECIPE_BLOCKS = [block for block in YAML_BLOCKS if not is_agent_config(block)]
AGENT_CONFIG_BLOCKS = [block for block in YAML_BLOCKS if is_agent_config(block)]
JSON_BLOCKS = collect_blocks("json")
EXAMPLE_RECIPES = sorted((REPO_ROOT / "examples").glob("**/recipe*.yaml"))


def test_recipe_reference_has_examples():
    """Guards the block parser: the recipe reference contains several recipes."""

    in_reference = [block for block in RECIPE_BLOCKS if block.path.name == "recipe.md"]
    assert len(in_reference) >= 3, [block.label for block in RECIPE_BLOCKS]


@pytest.mark.parametrize("block", RECIPE_BLOCKS, ids=lambda block: block.label)
def test_recipe_block_validates(block: CodeBlock):
    data = yaml.safe_load(block.text)

    assert isinstance(data, dict) and "version" in data, (
        f"{block.label}: a ```yaml block must be a recipe with a top-level 'version', "
        f"or an agent configuration whose first line is {AGENT_CONFIG_MARKER!r}"
    )
    Recipe.model_validate(data)


@pytest.mark.parametrize("block", AGENT_CONFIG_BLOCKS, ids=lambda block: block.label)
def test_agent_config_block_validates(block: CodeBlock):
    AgentConfig.model_validate(yaml.safe_load(block.text))


@pytest.mark.parametrize("block", JSON_BLOCKS, ids=lambda block: block.label)
def test_json_block_parses(block: CodeBlock):
    json.loads(block.text)


def test_agent_config_example_loads():
    config = load_config(AGENT_CONFIG_EXAMPLE, {})

    assert config.server_url.startswith("https://")
    assert config.device_root is None, "a real device leaves device_root unset"
    assert config.restart_instead_of_reboot is False


@pytest.mark.parametrize("field", sorted(AgentConfig.model_fields))
def test_agent_config_example_describes_setting(field: str):
    text = AGENT_CONFIG_EXAMPLE.read_text(encoding="utf-8")

    assert re.search(rf"^(# )?{field}:", text, re.MULTILINE), (
        f"deploy/agent.yaml.example has no line '{field}:' or '# {field}:'"
    )


def test_agent_config_example_lists_default_environment():
    """The comment on pass_environment lists DEFAULT_PASS_ENVIRONMENT, on lines that start with '#   '."""

    listed_lines = [line for line in AGENT_CONFIG_EXAMPLE.read_text(encoding="utf-8").splitlines()
                    if line.startswith("#   ")]
    listed = [name for line in listed_lines for name in line[1:].split()]

    assert sorted(listed) == sorted(DEFAULT_PASS_ENVIRONMENT)


def test_example_recipes_exist():
    assert EXAMPLE_RECIPES


@pytest.mark.parametrize("path", EXAMPLE_RECIPES, ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_example_recipe_loads(path: Path):
    loaded = load_recipe_file(path)

    assert loaded.recipe.stages()
