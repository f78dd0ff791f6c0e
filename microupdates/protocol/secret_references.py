"""Secret references in recipe commands: `${secret:NAME}`, resolved for the device, masked in its output.

A recipe holds only the reference. The API looks the value up in its secret
store when it hands a job to a device and sends it in `StageJob.secrets`. The
agent passes it to bash as an environment variable that the reference expands
to, and replaces the value with MASK in everything it reports.
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, List, Optional, Tuple

from microupdates.protocol.device_api import StageReport

SECRET_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
SECRET_REFERENCE = re.compile(r"\$\{secret:([A-Za-z_][A-Za-z0-9_]{0,63})\}")
SECRET_VARIABLE_PREFIX = "MICROUPDATES_SECRET_"
MASK = "***"


class MissingSecretError(Exception):
    """Raised when a command references a secret whose value is not available."""


def referenced_secret_names(texts: Iterable[Optional[str]]) -> List[str]:
    """Return the sorted, distinct secret names that the texts reference."""

    names = set()
    for text in texts:
        if text:
            names.update(SECRET_REFERENCE.findall(text))
    return sorted(names)


def secret_variable(name: str) -> str:
    """Return the environment variable that carries secret `name` into a command."""

    return SECRET_VARIABLE_PREFIX + name


def resolve_secret_references(text: str, values: Dict[str, str]) -> Tuple[str, Dict[str, str]]:
    """Rewrite each `${secret:NAME}` to `${MICROUPDATES_SECRET_NAME}` and return the text with those variables.

    The value reaches bash through the environment, not the command line, so
    other users' `ps` cannot see it and no quoting inside the value can change
    the script. Raises MissingSecretError for a name without a value.
    """

    names = referenced_secret_names([text])
    missing = [name for name in names if name not in values]
    if missing:
        raise MissingSecretError(
            "the command references secret(s) %s, which the server did not send; set them with "
            "PUT /api/v1/secrets/NAME and deploy again" % ", ".join(missing)
        )
    script = SECRET_REFERENCE.sub(lambda match: "${%s}" % secret_variable(match.group(1)), text)
    return script, {secret_variable(name): values[name] for name in names}


def mask_secrets(text: Optional[str], values: Iterable[str]) -> Optional[str]:
    """Replace each secret value in `text` with MASK, longest value first so one inside another is masked whole."""

    if not text:
        return text
    for value in sorted((value for value in values if value), key=len, reverse=True):
        text = text.replace(value, MASK)
    return text


def mask_report(report: StageReport, values: Iterable[str]) -> StageReport:
    """Return a copy of the report with every secret value in its error and step outputs replaced by MASK."""

    values = [value for value in values if value]
    if not values:
        return report
    steps = [
        step.model_copy(update={"output": mask_secrets(step.output, values), "error": mask_secrets(step.error, values)})
        for step in report.steps
    ]
    return report.model_copy(update={"error": mask_secrets(report.error, values), "steps": steps})


def recipe_command_texts(recipe) -> List[Optional[str]]:
    """Return the recipe's command texts, the places where secret references are resolved."""

    return [
        recipe.before.run if recipe.before else None,
        recipe.after.run if recipe.after else None,
        recipe.rollback.command,
    ]
