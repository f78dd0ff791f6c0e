"""The micro update recipe: the six parts an operator writes in YAML.

The same models validate a recipe file on the operator's machine, the update
stored by the API, and the stage jobs a device receives, so this module runs on
Python 3.9 and imports nothing from the server.
"""

from __future__ import annotations

import difflib
import posixpath
import re
from typing import Annotated, Any, ClassVar, List, NamedTuple, Optional, Pattern, Tuple, Type, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_COMMAND_BYTES = 64 * 1024
MAX_COMMENT_CHARS = 2000
MAX_FILES = 500
MAX_PACKAGES_PER_MANAGER = 200
DEFAULT_COMMAND_TIMEOUT_SECONDS = 300
DEFAULT_PACKAGE_TIMEOUT_SECONDS = 900
DEFAULT_APT_LOCK_TIMEOUT_SECONDS = 120
MAX_TIMEOUT_SECONDS = 24 * 3600
DEFAULT_CHECK_IN_DEADLINE_SECONDS = 24 * 3600
MAX_CHECK_IN_DEADLINE_SECONDS = 30 * 24 * 3600
DEFAULT_HEARTBEAT_TIMEOUT_SECONDS = 60
MIN_HEARTBEAT_TIMEOUT_SECONDS = 10
MAX_HEARTBEAT_TIMEOUT_SECONDS = 3600
MAX_QUOTED_VALUE_CHARS = 80
DEFAULT_STAGE_MAX_ATTEMPTS = 3
MAX_STAGE_MAX_ATTEMPTS = 10
DEFAULT_RETRY_INITIAL_INTERVAL_SECONDS = 5
MAX_RETRY_INITIAL_INTERVAL_SECONDS = 3600
# Linux's PATH_MAX, the longest path a system call accepts, NUL included.
MAX_PATH_BYTES = 4095

# The patterns end in \Z rather than $ because $ also matches before a final
# newline, which would let "curl\n" pass as a name.
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+~-]{0,63}\Z")
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}\Z")
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}\Z")
MODE_PATTERN = re.compile(r"^0?[0-7]{3,4}\Z")

CONTROL_CHARACTER_PATTERN = re.compile(r"[\x01-\x1f\x7f]")

# Package grammars, one per manager. Names and versions reach the device's
# package manager as separate argv entries after `--`, never through a shell.
# No name may start with '-', so none is read as a command-line option.
#
# apt: Debian Policy 5.6.1 (package names) and 5.6.12 (versions, written
# [epoch:]upstream_version[-debian_revision] with an upstream version that
# starts with a digit). A '*' is kept for apt's version globs such as 2.*.
APT_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9+.-]{1,127}\Z")
APT_VERSION_PATTERN = re.compile(r"^(?:[0-9]+:)?[0-9][A-Za-z0-9.+~*-]{0,127}\Z")
# pip: names as in PEP 508, versions as in PEP 440 (epoch, release, pre-,
# post- and dev-release, local label, in normalised or alternative spelling),
# with an optional trailing .* as in `==2.*`.
PIP_NAME_PATTERN = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,126}[A-Za-z0-9])?\Z")
_PEP440_SEPARATOR = r"[-_.]?"
PIP_VERSION_PATTERN = re.compile(
    r"^v?(?:[0-9]+!)?[0-9]+(?:\.[0-9]+)*"
    rf"(?:{_PEP440_SEPARATOR}(?:a|b|c|rc|alpha|beta|pre|preview){_PEP440_SEPARATOR}[0-9]*)?"
    rf"(?:-[0-9]+|{_PEP440_SEPARATOR}(?:post|rev|r){_PEP440_SEPARATOR}[0-9]*)?"
    rf"(?:{_PEP440_SEPARATOR}dev{_PEP440_SEPARATOR}[0-9]*)?"
    r"(?:\+[a-z0-9]+(?:[-_.][a-z0-9]+)*)?"
    r"(?:\.\*)?\Z",
    re.IGNORECASE,
)
MAX_PIP_VERSION_CHARS = 64
# npm: names as npm's validate-npm-package-name accepts new ones (lower case,
# at most 214 characters, an optional @scope/), versions as a semver version,
# a node-semver range (comparators, x-ranges, hyphen ranges, `||`) or a
# dist-tag such as `latest`.
NPM_NAME_PATTERN = re.compile(r"^(@[a-z0-9][a-z0-9._~-]{0,100}/)?[a-z0-9][a-z0-9._~-]{0,213}\Z")
_SEMVER_PARTIAL = r"[vV]?(?:[0-9]+|[xX*])(?:\.(?:[0-9]+|[xX*])){0,2}(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?"
_SEMVER_COMPARATOR = rf"(?:\^|~|>=|<=|>|<|=)?{_SEMVER_PARTIAL}"
_SEMVER_SET = rf"(?:{_SEMVER_PARTIAL} - {_SEMVER_PARTIAL}|{_SEMVER_COMPARATOR}(?: {_SEMVER_COMPARATOR})*)"
NPM_VERSION_PATTERN = re.compile(rf"^(?:{_SEMVER_SET}(?: \|\| {_SEMVER_SET})*|[A-Za-z][A-Za-z0-9._-]{{0,63}})\Z")
MAX_NPM_VERSION_CHARS = 128

STAGE_ORDER = ("before", "files", "dependencies", "after")

# A pydantic error location: field names and list indexes from the root model down.
Location = Tuple[Union[str, int], ...]


class RecipeModel(BaseModel):
    """Base for recipe parts: unknown keys are errors, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


def check_absolute_path(value: str) -> str:
    """Return a device path without trailing slashes, or raise ValueError.

    Rejected: relative paths, NUL bytes, paths over MAX_PATH_BYTES, `..` components, `/` itself, and
    paths that normalise to something else, such as `//opt`, `/opt/./app` or
    `/opt//app`.
    """

    if "\x00" in value:
        raise ValueError(f"must not contain a NUL byte, got {value!r}")
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > MAX_PATH_BYTES:
        raise ValueError(f"is {size} bytes long, over the limit of {MAX_PATH_BYTES} bytes for a path")
    if CONTROL_CHARACTER_PATTERN.search(value):
        raise ValueError(f"must not contain control characters such as a newline or tab, got {value!r}")
    if not value.startswith("/"):
        raise ValueError(f"must be an absolute path starting with '/', got {value!r}")
    if ".." in value.split("/"):
        raise ValueError(f"must not contain '..', got {value!r}")

    trimmed = value.rstrip("/")
    if not trimmed:
        raise ValueError(f"must be a path below '/', got {value!r}")

    # posixpath.normpath keeps a leading '//', which POSIX leaves
    # implementation-defined, so leading slashes are collapsed here.
    normalised = "/" + posixpath.normpath(trimmed).lstrip("/")
    if normalised != trimmed:
        raise ValueError(f"must be a normalised path, got {value!r}; write {normalised!r}")
    return trimmed


def check_name(value: str) -> str:
    """Check a device or group name."""

    if not NAME_PATTERN.match(value):
        raise ValueError(
            f"{value!r} is not a valid name: use 1-63 lower-case letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def check_command_text(value: str, empty_hint: str) -> str:
    """Check bash text that the device runs: not blank, no NUL byte, at most MAX_COMMAND_BYTES."""

    if not value.strip():
        raise ValueError(f"is empty; {empty_hint}")
    if "\x00" in value:
        raise ValueError("must not contain a NUL byte")
    size = len(value.encode("utf-8"))
    if size > MAX_COMMAND_BYTES:
        raise ValueError(f"is {size} bytes, over the limit of {MAX_COMMAND_BYTES}")
    return value


def list_duplicates(values: List[str]) -> List[str]:
    """Return the values that occur more than once, sorted."""

    return sorted(set(value for value in values if values.count(value) > 1))


ResourceName = Annotated[str, AfterValidator(check_name)]


class TargetSelection(RecipeModel):
    """Devices, groups and tags an update goes to: the union of all three, each device updated once."""

    devices: List[ResourceName] = Field(default_factory=list)
    groups: List[ResourceName] = Field(default_factory=list)
    tags: List[ResourceName] = Field(default_factory=list)

    @field_validator("devices", "groups", "tags")
    @classmethod
    def check_unique_names(cls, names: List[str]) -> List[str]:
        duplicates = list_duplicates(names)
        if duplicates:
            raise ValueError(f"lists a name twice: {duplicates}")
        return names

    def is_empty(self) -> bool:
        return not self.devices and not self.groups and not self.tags


class CommandStage(RecipeModel):
    """A bash script run on the device; `script` names a file next to the recipe instead of inline `run`."""

    run: Optional[str] = None
    script: Optional[str] = Field(default=None, min_length=1)
    timeout_seconds: int = Field(default=DEFAULT_COMMAND_TIMEOUT_SECONDS, ge=1, le=MAX_TIMEOUT_SECONDS, strict=True)

    @field_validator("run")
    @classmethod
    def check_run(cls, value: Optional[str]) -> Optional[str]:
        if value is None:
            return None
        return check_command_text(value, "give a command or remove the stage")

    @field_validator("script")
    @classmethod
    def check_script(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and "\x00" in value:
            raise ValueError(f"must not contain a NUL byte, got {value!r}")
        return value

    @model_validator(mode="after")
    def check_one_source(self) -> "CommandStage":
        if (self.run is None) == (self.script is None):
            raise ValueError("give exactly one of 'run' (inline bash) or 'script' (a file next to the recipe)")
        return self


class FileEntry(RecipeModel):
    """One file or directory to place on the device.

    `source` is a path relative to the recipe file. `artifact` is the SHA-256
    of the uploaded content, filled in when the update is created; for a
    directory the artifact is a tar archive of it. A directory merges into an
    existing destination unless `replace` is true, which swaps the whole
    directory (the old one is kept for rollback).
    """

    source: str = Field(min_length=1)
    destination: str
    mode: Optional[str] = None
    kind: Optional[str] = None
    artifact: Optional[str] = None
    size_bytes: Optional[int] = Field(default=None, ge=0, strict=True)
    replace: bool = False

    @field_validator("destination")
    @classmethod
    def check_destination(cls, value: str) -> str:
        if len(value) > 1 and value.endswith("/"):
            # A file entry would otherwise be written under the directory's own name.
            raise ValueError(
                f"must not end with '/', got {value!r}: give the full path of the file or directory, "
                f"such as {value.rstrip('/') + '/NAME'!r} for a file"
            )
        return check_absolute_path(value)

    @field_validator("mode", mode="before")
    @classmethod
    def check_mode_is_text(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            raise ValueError(
                f"must be a quoted octal string such as '0644', got the number {value}; "
                "YAML reads an unquoted 0644 as the number 420"
            )
        return value

    @field_validator("mode")
    @classmethod
    def check_mode(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not MODE_PATTERN.match(value):
            raise ValueError(f"must be an octal file mode such as '0644' or '0755', got {value!r}")
        return value

    @field_validator("kind")
    @classmethod
    def check_kind(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and value not in ("file", "directory"):
            raise ValueError(f"must be 'file' or 'directory', got {value!r}")
        return value

    @field_validator("artifact")
    @classmethod
    def check_artifact(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not SHA256_PATTERN.match(value):
            raise ValueError(f"must be a SHA-256 digest of 64 lower-case hex digits, got {value!r}")
        return value

    def mode_bits(self) -> Optional[int]:
        return int(self.mode, 8) if self.mode is not None else None


class Package(RecipeModel):
    """A package name and an optional exact version.

    Package itself accepts any text. The subclasses for one manager check the
    name and version against that manager's grammar, and also accept a plain
    Package, whose fields they check again.
    """

    model_config = ConfigDict(from_attributes=True)

    name: str
    version: Optional[str] = None

    manager: ClassVar[str] = ""
    name_pattern: ClassVar[Optional[Pattern[str]]] = None
    name_grammar: ClassVar[str] = ""
    version_pattern: ClassVar[Optional[Pattern[str]]] = None
    version_grammar: ClassVar[str] = ""
    max_version_chars: ClassVar[int] = 128

    @field_validator("name")
    @classmethod
    def check_name_grammar(cls, value: str) -> str:
        if cls.name_pattern is not None and not cls.name_pattern.match(value):
            raise ValueError(f"{value!r} is not a valid {cls.manager} package name: use {cls.name_grammar}")
        return value

    @field_validator("version")
    @classmethod
    def check_version_grammar(cls, value: Optional[str]) -> Optional[str]:
        if value is None or cls.version_pattern is None:
            return value
        if len(value) > cls.max_version_chars or not cls.version_pattern.match(value):
            raise ValueError(f"{value!r} is not a valid {cls.manager} version: use {cls.version_grammar}")
        return value

    @classmethod
    def canonical_name(cls, name: str) -> str:
        """Return the form of `name` under which the manager treats two names as the same package."""

        return name.lower()


class AptPackage(Package):
    """A Debian package for apt-get."""

    manager: ClassVar[str] = "apt"
    name_pattern: ClassVar[Optional[Pattern[str]]] = APT_NAME_PATTERN
    name_grammar: ClassVar[str] = (
        "2-128 lower-case letters, digits, '+', '-' or '.', starting with a letter or digit"
    )
    version_pattern: ClassVar[Optional[Pattern[str]]] = APT_VERSION_PATTERN
    version_grammar: ClassVar[str] = (
        "a Debian version [epoch:]upstream[-revision] of at most 128 characters: an optional number and ':', "
        "then a digit, then letters, digits, '.', '+', '~', '*' or '-'"
    )


class PipPackage(Package):
    """A Python distribution for pip."""

    manager: ClassVar[str] = "pip"
    name_pattern: ClassVar[Optional[Pattern[str]]] = PIP_NAME_PATTERN
    name_grammar: ClassVar[str] = (
        "1-128 letters, digits, '.', '_' or '-', starting and ending with a letter or digit"
    )
    version_pattern: ClassVar[Optional[Pattern[str]]] = PIP_VERSION_PATTERN
    version_grammar: ClassVar[str] = (
        "a PEP 440 version of at most 64 characters such as 2.31.0, 1!2.0, 1.0rc1, 1.0.post1, 1.0.dev2 or 1.0+local, "
        "optionally ending in .* (no operators such as >=)"
    )
    max_version_chars: ClassVar[int] = MAX_PIP_VERSION_CHARS

    @classmethod
    def canonical_name(cls, name: str) -> str:
        # pip treats runs of '-', '_' and '.' as one '-' and ignores case (PEP 503).
        return re.sub(r"[-_.]+", "-", name).lower()


class NpmPackage(Package):
    """A Node package for npm, optionally under an @scope/."""

    manager: ClassVar[str] = "npm"
    name_pattern: ClassVar[Optional[Pattern[str]]] = NPM_NAME_PATTERN
    name_grammar: ClassVar[str] = (
        "lower-case letters, digits, '.', '_', '~' or '-', starting with a letter or digit, "
        "optionally under an @scope/"
    )
    version_pattern: ClassVar[Optional[Pattern[str]]] = NPM_VERSION_PATTERN
    version_grammar: ClassVar[str] = (
        "a semver version or range of at most 128 characters such as 1.2.3, ^1.2, ~1.2.3, >=1.0.0 <2.0.0, "
        "1.x or 1.0.0 - 2.0.0, alternatives joined by ' || ', or a dist-tag such as latest"
    )
    max_version_chars: ClassVar[int] = MAX_NPM_VERSION_CHARS


class PackageGroup(RecipeModel):
    """Packages for one manager, installed in one command."""

    packages: List[Package] = Field(default_factory=list, max_length=MAX_PACKAGES_PER_MANAGER)
    timeout_seconds: int = Field(default=DEFAULT_PACKAGE_TIMEOUT_SECONDS, ge=1, le=MAX_TIMEOUT_SECONDS, strict=True)

    @field_validator("packages")
    @classmethod
    def check_unique_packages(cls, packages: List[Package]) -> List[Package]:
        names = [package.canonical_name(package.name) for package in packages]
        duplicates = list_duplicates(names)
        if duplicates:
            raise ValueError(f"lists a package twice: {duplicates}")
        return packages


class AptPackages(PackageGroup):
    """Debian packages, installed with `apt-get install -y` without questions.

    `lock_timeout_seconds` bounds the wait for a dpkg lock held by another
    process (an unattended upgrade, say); then the step fails naming the holder.
    """

    packages: List[AptPackage] = Field(default_factory=list, max_length=MAX_PACKAGES_PER_MANAGER)
    lock_timeout_seconds: int = Field(
        default=DEFAULT_APT_LOCK_TIMEOUT_SECONDS, ge=1, le=MAX_TIMEOUT_SECONDS, strict=True
    )


class PipPackages(PackageGroup):
    """Python packages for `python -m pip` (pip) or `python3 -m pip` (pip3).

    With `virtualenv` the environment is created when missing and the packages
    go into it; without it they go to the interpreter's own site-packages.
    """

    packages: List[PipPackage] = Field(default_factory=list, max_length=MAX_PACKAGES_PER_MANAGER)
    virtualenv: Optional[str] = None

    @field_validator("virtualenv")
    @classmethod
    def check_virtualenv(cls, value: Optional[str]) -> Optional[str]:
        return check_absolute_path(value) if value is not None else None


class NpmPackages(PackageGroup):
    """Node packages: global (`npm install -g`) unless `directory` names a project directory."""

    packages: List[NpmPackage] = Field(default_factory=list, max_length=MAX_PACKAGES_PER_MANAGER)
    directory: Optional[str] = None

    @field_validator("directory")
    @classmethod
    def check_directory(cls, value: Optional[str]) -> Optional[str]:
        return check_absolute_path(value) if value is not None else None


class Dependencies(RecipeModel):
    """Packages installed in the dependencies stage, in the order apt, pip, pip3, npm."""

    apt: Optional[AptPackages] = None
    pip: Optional[PipPackages] = None
    pip3: Optional[PipPackages] = None
    npm: Optional[NpmPackages] = None

    def is_empty(self) -> bool:
        groups = (self.apt, self.pip, self.pip3, self.npm)
        return all(group is None or not group.packages for group in groups)


class RollbackSettings(RecipeModel):
    """Actions on the device when the update fails or is aborted.

    Reverts run in reverse order of the stages that ran (packages, then files),
    then the command, then the reboot.
    """

    revert_files: bool = True
    revert_packages: bool = True
    command: Optional[str] = None
    command_timeout_seconds: int = Field(
        default=DEFAULT_COMMAND_TIMEOUT_SECONDS, ge=1, le=MAX_TIMEOUT_SECONDS, strict=True
    )
    reboot: bool = False

    @field_validator("command")
    @classmethod
    def check_command(cls, value: Optional[str]) -> Optional[str]:
        if value is None:
            return None
        return check_command_text(value, "give a command or remove the field")


class DeviceTimeouts(RecipeModel):
    """Bounds on waiting for devices; a deployment may override them."""

    check_in_deadline_seconds: int = Field(
        default=DEFAULT_CHECK_IN_DEADLINE_SECONDS, ge=1, le=MAX_CHECK_IN_DEADLINE_SECONDS, strict=True
    )
    heartbeat_timeout_seconds: int = Field(
        default=DEFAULT_HEARTBEAT_TIMEOUT_SECONDS,
        ge=MIN_HEARTBEAT_TIMEOUT_SECONDS,
        le=MAX_HEARTBEAT_TIMEOUT_SECONDS,
        strict=True,
    )


class StageRetries(RecipeModel):
    """How often a stage that failed transiently runs again; a deployment may override it.

    A failure is transient when the agent restarted during the stage, or the
    agent marked it so (an artifact download that failed, a dpkg lock held
    too long). `max_attempts` counts the first run; the wait before the
    second run is `initial_interval_seconds`, doubled before each further
    one, at most 300 s. Other failures never run again.
    """

    max_attempts: int = Field(default=DEFAULT_STAGE_MAX_ATTEMPTS, ge=1, le=MAX_STAGE_MAX_ATTEMPTS, strict=True)
    initial_interval_seconds: int = Field(
        default=DEFAULT_RETRY_INITIAL_INTERVAL_SECONDS, ge=1, le=MAX_RETRY_INITIAL_INTERVAL_SECONDS, strict=True
    )


class Recipe(RecipeModel):
    """A micro update: general details, before, files, dependencies, after, rollback."""

    version: str
    comment: str = Field(default="", max_length=MAX_COMMENT_CHARS)
    targets: TargetSelection = Field(default_factory=TargetSelection)
    before: Optional[CommandStage] = None
    files: List[FileEntry] = Field(default_factory=list, max_length=MAX_FILES)
    dependencies: Dependencies = Field(default_factory=Dependencies)
    after: Optional[CommandStage] = None
    rollback: RollbackSettings = Field(default_factory=RollbackSettings)
    timeouts: DeviceTimeouts = Field(default_factory=DeviceTimeouts)
    retries: StageRetries = Field(default_factory=StageRetries)

    @field_validator("version", mode="before")
    @classmethod
    def check_version_is_text(cls, value: Any) -> Any:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            raise ValueError(
                f"must be a quoted string, got the number {value!r}; YAML reads an unquoted 1.10 as the number 1.1"
            )
        return value

    @field_validator("version")
    @classmethod
    def check_version(cls, value: str) -> str:
        if not VERSION_PATTERN.match(value):
            raise ValueError(
                f"{value!r} is not a valid version: use 1-64 letters, digits, '.', '_', '+', '~' or '-', "
                "starting with a letter or digit"
            )
        return value

    @field_validator("files")
    @classmethod
    def check_unique_destinations(cls, entries: List[FileEntry]) -> List[FileEntry]:
        duplicates = list_duplicates([entry.destination for entry in entries])
        if duplicates:
            raise ValueError(f"two entries write the same destination: {duplicates}")
        return entries

    @model_validator(mode="after")
    def check_not_empty(self) -> "Recipe":
        if self.before is None and not self.files and self.dependencies.is_empty() and self.after is None:
            raise ValueError("the recipe does nothing: give at least one of before, files, dependencies or after")
        return self

    def stages(self) -> List[str]:
        """Names of the stages this recipe runs, in execution order."""

        present = {
            "before": self.before is not None,
            "files": bool(self.files),
            "dependencies": not self.dependencies.is_empty(),
            "after": self.after is not None,
        }
        return [stage for stage in STAGE_ORDER if present[stage]]


class ValidationProblem(NamedTuple):
    """One problem of a pydantic ValidationError, reworded for operators."""

    location: Location
    message: str

    @property
    def path(self) -> str:
        return format_location(self.location)

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def format_location(location: Location) -> str:
    """Return a pydantic location as a field path such as `files[0].destination`, or `recipe` for the root."""

    text = ""
    for part in location:
        if isinstance(part, int):
            text += f"[{part}]"
        elif text:
            text += f".{part}"
        else:
            text = str(part)
    return text or "recipe"


def list_validation_problems(error, model: Optional[Type[BaseModel]] = None) -> List[ValidationProblem]:
    """Reword each problem of a pydantic ValidationError raised while validating `model`.

    `model` serves only to suggest the closest field name for an unknown one.
    When it is None, the recipe model named in the error's title is used.
    """

    if model is None:
        model = find_recipe_model(error.title)
    problems = []
    for detail in error.errors():
        location = tuple(detail["loc"])
        problems.append(ValidationProblem(location, describe_problem(detail, location, model)))
    return problems


def describe_problem(detail: dict, location: Location, model: Optional[Type[BaseModel]]) -> str:
    """Return the message for one pydantic error dict, ending with the rejected value where it helps."""

    kind = detail["type"]
    message = detail["msg"]
    value = detail.get("input")

    if kind == "extra_forbidden":
        return describe_unknown_field(location, model)
    if kind == "missing":
        return "required field is missing"
    if kind == "value_error":
        return message[len("Value error, "):] if message.startswith("Value error, ") else message
    if kind == "model_type":
        return f"must be a mapping of fields, got {shorten_repr(value)}"

    if isinstance(value, (dict, list)):
        return message
    if ", got " in message:
        return f"{message}: {shorten_repr(value)}"
    return f"{message}, got {shorten_repr(value)}"


def shorten_repr(value: Any) -> str:
    """Return repr(value), cut to about MAX_QUOTED_VALUE_CHARS with the cut marked, so a long value fits on a line."""

    text = repr(value)
    if len(text) <= MAX_QUOTED_VALUE_CHARS:
        return text
    if isinstance(value, str):
        return f"{value[:MAX_QUOTED_VALUE_CHARS]!r}... ({len(value)} characters)"
    return f"{text[:MAX_QUOTED_VALUE_CHARS]}..."


def describe_unknown_field(location: Location, model: Optional[Type[BaseModel]]) -> str:
    """Name the unknown key and the closest known field at that place."""

    key = str(location[-1]) if location else ""
    message = f"unknown field {key!r}"
    known = known_fields_at(model, location[:-1]) if model is not None else []
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f"{message}; did you mean {close[0]!r}?"
    if known:
        return f"{message}; known fields here: {', '.join(known)}"
    return f"{message}; check its spelling"


def known_fields_at(model: Type[BaseModel], location: Location) -> List[str]:
    """Return the field names of the model found at `location` below `model`, or [] when there is none."""

    current: Optional[Type[BaseModel]] = model
    for part in location:
        if current is None:
            return []
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part)
        current = find_model_class(field.annotation) if field is not None else None
    return list(current.model_fields) if current is not None else []


def find_model_class(annotation: Any) -> Optional[Type[BaseModel]]:
    """Return the pydantic model inside an annotation such as Optional[FileEntry] or List[AptPackage]."""

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in getattr(annotation, "__args__", ()):
        found = find_model_class(argument)
        if found is not None:
            return found
    return None


def find_recipe_model(name: str) -> Optional[Type[BaseModel]]:
    """Return the RecipeModel subclass called `name`, or None."""

    pending = list(RecipeModel.__subclasses__())
    while pending:
        candidate = pending.pop()
        if candidate.__name__ == name:
            return candidate
        pending.extend(candidate.__subclasses__())
    return None


def format_validation_error(error, model: Optional[Type[BaseModel]] = None) -> str:
    """Turn a pydantic ValidationError into one line per problem: `field.path: message, got value`."""

    return "\n".join(str(problem) for problem in list_validation_problems(error, model))
