"""Validation of every recipe field: accepted values, and the exact message for rejected ones."""

from __future__ import annotations

import copy

import pytest
from pydantic import ValidationError

from microupdates.protocol.recipe import (
    MAX_COMMAND_BYTES,
    AptPackages,
    CommandStage,
    Package,
    PipPackage,
    Recipe,
    check_absolute_path,
    format_validation_error,
)

DIGEST = "0123456789abcdef" * 4

NAME_RULE = "use 1-63 lower-case letters, digits, '.', '_' or '-', starting with a letter or digit"
VERSION_RULE = "use 1-64 letters, digits, '.', '_', '+', '~' or '-', starting with a letter or digit"
APT_NAME_RULE = "use 2-128 lower-case letters, digits, '+', '-' or '.', starting with a letter or digit"
APT_VERSION_RULE = (
    "use a Debian version [epoch:]upstream[-revision] of at most 128 characters: an optional number and ':', "
    "then a digit, then letters, digits, '.', '+', '~', '*' or '-'"
)
PIP_NAME_RULE = "use 1-128 letters, digits, '.', '_' or '-', starting and ending with a letter or digit"
PIP_VERSION_RULE = (
    "use a PEP 440 version of at most 64 characters such as 2.31.0, 1!2.0, 1.0rc1, 1.0.post1, 1.0.dev2 or 1.0+local, "
    "optionally ending in .* (no operators such as >=)"
)
NPM_NAME_RULE = (
    "use lower-case letters, digits, '.', '_', '~' or '-', starting with a letter or digit, optionally under an @scope/"
)
NPM_VERSION_RULE = (
    "use a semver version or range of at most 128 characters such as 1.2.3, ^1.2, ~1.2.3, >=1.0.0 <2.0.0, "
    "1.x or 1.0.0 - 2.0.0, alternatives joined by ' || ', or a dist-tag such as latest"
)
ONE_SOURCE_RULE = "give exactly one of 'run' (inline bash) or 'script' (a file next to the recipe)"


def make_recipe_data(**fields) -> dict:
    """Return a minimal valid recipe as YAML would load it, with `fields` replacing top-level keys."""

    data = {"version": "1.0.0", "after": {"run": "systemctl restart app"}}
    data.update(fields)
    return data


def make_file_entry(**fields) -> dict:
    entry = {"source": "app.py", "destination": "/opt/app/app.py"}
    entry.update(fields)
    return entry


def validation_message(data: dict) -> str:
    """Validate `data` as a Recipe, which must fail, and return the formatted message."""

    with pytest.raises(ValidationError) as caught:
        Recipe.model_validate(data)
    return format_validation_error(caught.value)


def packages_data(manager: str, *packages: dict, **fields) -> dict:
    group = {"packages": list(packages)}
    group.update(fields)
    return make_recipe_data(dependencies={manager: group})


# General details: version and comment.


@pytest.mark.parametrize("version", ["1.0.0", "v2", "2024.06.01-rc1", "1+build.5", "1~beta", "1_0", "a" * 64])
def test_validate_recipe_accepts_version(version):
    assert Recipe.model_validate(make_recipe_data(version=version)).version == version


@pytest.mark.parametrize("version", ["", "-1", ".1", "1.0 beta", "1/2", "1.0\n", "a" * 65, "1.0;ls"])
def test_validate_recipe_rejects_invalid_version(version):
    message = validation_message(make_recipe_data(version=version))

    assert f"version: {version!r} is not a valid version: {VERSION_RULE}" in message


@pytest.mark.parametrize("version", [1.2, 3])
def test_validate_recipe_rejects_unquoted_number_version(version):
    message = validation_message(make_recipe_data(version=version))

    assert f"version: must be a quoted string, got the number {version!r}" in message
    assert "YAML reads an unquoted 1.10 as the number 1.1" in message


def test_validate_recipe_rejects_missing_version():
    data = make_recipe_data()
    del data["version"]

    assert validation_message(data) == "version: required field is missing"


def test_validate_recipe_accepts_comment_at_limit():
    recipe = Recipe.model_validate(make_recipe_data(comment="x" * 2000))

    assert len(recipe.comment) == 2000


def test_validate_recipe_defaults_comment_to_empty():
    assert Recipe.model_validate(make_recipe_data()).comment == ""


def test_validate_recipe_rejects_long_comment():
    message = validation_message(make_recipe_data(comment="x" * 2001))

    assert message.startswith("comment: String should have at most 2000 characters, got 'xxx")
    assert message.endswith("... (2001 characters)")
    assert len(message) < 200


def test_validate_recipe_rejects_non_text_comment():
    message = validation_message(make_recipe_data(comment=["a"]))

    assert message == "comment: Input should be a valid string"


# Targets.


def test_validate_recipe_accepts_targets():
    targets = {"devices": ["kiosk-01", "gw_2.b", "a"], "groups": ["lab", "production"]}

    recipe = Recipe.model_validate(make_recipe_data(targets=targets))

    assert recipe.targets.devices == ["kiosk-01", "gw_2.b", "a"]
    assert recipe.targets.groups == ["lab", "production"]
    assert not recipe.targets.is_empty()


def test_validate_recipe_defaults_targets_to_empty():
    recipe = Recipe.model_validate(make_recipe_data())

    assert recipe.targets.devices == []
    assert recipe.targets.groups == []
    assert recipe.targets.is_empty()


@pytest.mark.parametrize("field", ["devices", "groups"])
@pytest.mark.parametrize("name", ["Kiosk", "-kiosk", "_a", "kiosk 1", "", "a" * 64, "kiosk\n", "k/1"])
def test_validate_recipe_rejects_invalid_target_name(field, name):
    message = validation_message(make_recipe_data(targets={field: ["ok", name]}))

    assert message == f"targets.{field}[1]: {name!r} is not a valid name: {NAME_RULE}"


@pytest.mark.parametrize("field", ["devices", "groups"])
def test_validate_recipe_rejects_duplicate_target_name(field):
    message = validation_message(make_recipe_data(targets={field: ["lab", "kiosk", "lab"]}))

    assert message == f"targets.{field}: lists a name twice: ['lab']"


def test_validate_recipe_rejects_target_names_not_in_list():
    message = validation_message(make_recipe_data(targets={"groups": "lab"}))

    assert message == "targets.groups: Input should be a valid list, got 'lab'"


def test_validate_recipe_rejects_misspelt_targets_field():
    message = validation_message(make_recipe_data(targets={"device": ["kiosk"]}))

    assert message == "targets.device: unknown field 'device'; did you mean 'devices'?"


# Before and after stages.


@pytest.mark.parametrize("stage", ["before", "after"])
def test_validate_recipe_accepts_inline_run(stage):
    recipe = Recipe.model_validate(make_recipe_data(**{stage: {"run": "systemctl stop app"}}))

    command = getattr(recipe, stage)
    assert command.run == "systemctl stop app"
    assert command.script is None
    assert command.timeout_seconds == 300


@pytest.mark.parametrize("stage", ["before", "after"])
def test_validate_recipe_accepts_script(stage):
    recipe = Recipe.model_validate(make_recipe_data(**{stage: {"script": "scripts/stop.sh"}}))

    command = getattr(recipe, stage)
    assert command.script == "scripts/stop.sh"
    assert command.run is None


@pytest.mark.parametrize("stage", ["before", "after"])
def test_validate_recipe_rejects_run_and_script_together(stage):
    message = validation_message(make_recipe_data(**{stage: {"run": "true", "script": "stop.sh"}}))

    assert message == f"{stage}: {ONE_SOURCE_RULE}"


@pytest.mark.parametrize("stage", ["before", "after"])
def test_validate_recipe_rejects_stage_without_run_or_script(stage):
    message = validation_message(make_recipe_data(**{stage: {"timeout_seconds": 10}}))

    assert message == f"{stage}: {ONE_SOURCE_RULE}"


@pytest.mark.parametrize("stage", ["before", "after"])
@pytest.mark.parametrize("run", ["", "   ", "\n\t\n"])
def test_validate_recipe_rejects_empty_run(stage, run):
    message = validation_message(make_recipe_data(**{stage: {"run": run}}))

    assert message == f"{stage}.run: is empty; give a command or remove the stage"


def test_validate_recipe_rejects_run_with_nul_byte():
    message = validation_message(make_recipe_data(before={"run": "echo a\x00b"}))

    assert message == "before.run: must not contain a NUL byte"


def test_validate_recipe_accepts_run_at_size_limit():
    run = "#" * MAX_COMMAND_BYTES

    assert Recipe.model_validate(make_recipe_data(after={"run": run})).after.run == run


def test_validate_recipe_rejects_run_over_size_limit():
    # Each 'é' is two bytes in UTF-8, so the limit is on bytes, not characters.
    run = "é" * (MAX_COMMAND_BYTES // 2) + "x"

    message = validation_message(make_recipe_data(after={"run": run}))

    assert message == f"after.run: is {MAX_COMMAND_BYTES + 1} bytes, over the limit of {MAX_COMMAND_BYTES}"


def test_validate_recipe_rejects_empty_script_name():
    message = validation_message(make_recipe_data(before={"script": ""}))

    assert "before.script: String should have at least 1 character, got ''" in message


def test_validate_recipe_rejects_script_name_with_nul_byte():
    message = validation_message(make_recipe_data(before={"script": "stop\x00.sh"}))

    assert message == "before.script: must not contain a NUL byte, got 'stop\\x00.sh'"


@pytest.mark.parametrize("stage", ["before", "after"])
@pytest.mark.parametrize("seconds", [1, 3600, 86400])
def test_validate_recipe_accepts_stage_timeout(stage, seconds):
    recipe = Recipe.model_validate(make_recipe_data(**{stage: {"run": "true", "timeout_seconds": seconds}}))

    assert getattr(recipe, stage).timeout_seconds == seconds


@pytest.mark.parametrize("stage", ["before", "after"])
@pytest.mark.parametrize(
    "seconds, expected",
    [
        (0, "Input should be greater than or equal to 1, got 0"),
        (-5, "Input should be greater than or equal to 1, got -5"),
        (86401, "Input should be less than or equal to 86400, got 86401"),
        (True, "Input should be a valid integer, got True"),
        ("30", "Input should be a valid integer, got '30'"),
        (1.5, "Input should be a valid integer, got 1.5"),
    ],
)
def test_validate_recipe_rejects_stage_timeout_out_of_bounds(stage, seconds, expected):
    message = validation_message(make_recipe_data(**{stage: {"run": "true", "timeout_seconds": seconds}}))

    assert message == f"{stage}.timeout_seconds: {expected}"


def test_validate_recipe_rejects_misspelt_stage_field():
    message = validation_message(make_recipe_data(after={"run": "true", "timout_seconds": 5}))

    assert message == "after.timout_seconds: unknown field 'timout_seconds'; did you mean 'timeout_seconds'?"


def test_validate_recipe_rejects_stage_as_text():
    message = validation_message(make_recipe_data(after="systemctl start app"))

    assert message == "after: must be a mapping of fields, got 'systemctl start app'"


# Files.


def test_validate_recipe_accepts_file_entry():
    entry = make_file_entry(mode="0640", kind="file", artifact=DIGEST, size_bytes=0, replace=True)

    recipe = Recipe.model_validate(make_recipe_data(files=[entry]))

    assert recipe.files[0].model_dump() == entry
    assert recipe.files[0].mode_bits() == 0o640


def test_validate_recipe_defaults_optional_file_fields():
    entry = Recipe.model_validate(make_recipe_data(files=[make_file_entry()])).files[0]

    assert entry.mode is None
    assert entry.mode_bits() is None
    assert entry.kind is None
    assert entry.artifact is None
    assert entry.size_bytes is None


def test_validate_recipe_rejects_empty_source():
    message = validation_message(make_recipe_data(files=[make_file_entry(source="")]))

    assert message == "files[0].source: String should have at least 1 character, got ''"


def test_validate_recipe_rejects_missing_source():
    entry = make_file_entry()
    del entry["source"]

    assert validation_message(make_recipe_data(files=[entry])) == "files[0].source: required field is missing"


@pytest.mark.parametrize(
    "destination, expected",
    [
        ("opt/app", "must be an absolute path starting with '/', got 'opt/app'"),
        ("", "must be an absolute path starting with '/', got ''"),
        ("./app", "must be an absolute path starting with '/', got './app'"),
        ("/opt/../etc/passwd", "must not contain '..', got '/opt/../etc/passwd'"),
        ("/opt/app/..", "must not contain '..', got '/opt/app/..'"),
        ("/opt/a\x00b", "must not contain a NUL byte, got '/opt/a\\x00b'"),
        ("/", "must be a path below '/', got '/'"),
        ("//", "must not end with '/', got '//': give the full path of the file or directory, such as '/NAME' for a file"),
        ("/opt/x/", "must not end with '/', got '/opt/x/': give the full path of the file or directory, such as '/opt/x/NAME' for a file"),
        ("/opt/a\nb", "must not contain control characters such as a newline or tab, got '/opt/a\\nb'"),
        ("/opt//app", "must be a normalised path, got '/opt//app'; write '/opt/app'"),
        ("/opt/./app", "must be a normalised path, got '/opt/./app'; write '/opt/app'"),
        ("//opt/app", "must be a normalised path, got '//opt/app'; write '/opt/app'"),
        ("/opt/app/.", "must be a normalised path, got '/opt/app/.'; write '/opt/app'"),
        ("/" + "a" * 4095, "is 4096 bytes long, over the limit of 4095 bytes for a path"),
    ],
)
def test_validate_recipe_rejects_invalid_destination(destination, expected):
    message = validation_message(make_recipe_data(files=[make_file_entry(destination=destination)]))

    assert message == f"files[0].destination: {expected}"


def test_validate_recipe_rejects_relative_destination():
    message = validation_message(make_recipe_data(files=[make_file_entry(destination="opt/app")]))

    assert "files[0].destination: must be an absolute path starting with '/', got 'opt/app'" in message


@pytest.mark.parametrize(
    "destination, stored",
    [
        ("/opt/app", "/opt/app"),
        ("/etc/app.d/10-app.conf", "/etc/app.d/10-app.conf"),
        ("/opt/my app/x..y", "/opt/my app/x..y"),
    ],
)
def test_validate_recipe_normalises_destination(destination, stored):
    recipe = Recipe.model_validate(make_recipe_data(files=[make_file_entry(destination=destination)]))

    assert recipe.files[0].destination == stored


def test_validate_recipe_rejects_duplicate_destinations():
    files = [
        make_file_entry(source="a", destination="/opt/app"),
        make_file_entry(source="b", destination="/opt/other"),
        make_file_entry(source="c", destination="/opt/app"),
    ]

    message = validation_message(make_recipe_data(files=files))

    assert message == "files: two entries write the same destination: ['/opt/app']"


@pytest.mark.parametrize("mode", ["644", "0644", "0755", "0600", "4755", "01777", "7777"])
def test_validate_recipe_accepts_mode(mode):
    entry = Recipe.model_validate(make_recipe_data(files=[make_file_entry(mode=mode)])).files[0]

    assert entry.mode == mode
    assert entry.mode_bits() == int(mode, 8)


@pytest.mark.parametrize("mode", ["0999", "64", "rwxr-xr-x", "u+x", "0o644", "0644\n", "", "00000644"])
def test_validate_recipe_rejects_invalid_mode(mode):
    message = validation_message(make_recipe_data(files=[make_file_entry(mode=mode)]))

    assert message == f"files[0].mode: must be an octal file mode such as '0644' or '0755', got {mode!r}"


def test_validate_recipe_rejects_unquoted_mode():
    # YAML 1.1 reads an unquoted 0644 as the octal number 420.
    message = validation_message(make_recipe_data(files=[make_file_entry(mode=420)]))

    assert message == (
        "files[0].mode: must be a quoted octal string such as '0644', got the number 420; "
        "YAML reads an unquoted 0644 as the number 420"
    )


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_validate_recipe_accepts_kind(kind):
    entry = Recipe.model_validate(make_recipe_data(files=[make_file_entry(kind=kind)])).files[0]

    assert entry.kind == kind


@pytest.mark.parametrize("kind", ["dir", "File", "symlink", ""])
def test_validate_recipe_rejects_invalid_kind(kind):
    message = validation_message(make_recipe_data(files=[make_file_entry(kind=kind)]))

    assert message == f"files[0].kind: must be 'file' or 'directory', got {kind!r}"


@pytest.mark.parametrize("artifact", [DIGEST.upper(), DIGEST[:-1], DIGEST + "0", "sha256:" + DIGEST, "g" * 64])
def test_validate_recipe_rejects_invalid_artifact(artifact):
    message = validation_message(make_recipe_data(files=[make_file_entry(artifact=artifact)]))

    assert f"files[0].artifact: must be a SHA-256 digest of 64 lower-case hex digits, got {artifact!r}" in message


@pytest.mark.parametrize(
    "size, expected",
    [
        (-1, "Input should be greater than or equal to 0, got -1"),
        ("10", "Input should be a valid integer, got '10'"),
        (False, "Input should be a valid integer, got False"),
    ],
)
def test_validate_recipe_rejects_invalid_size(size, expected):
    message = validation_message(make_recipe_data(files=[make_file_entry(size_bytes=size)]))

    assert message == f"files[0].size_bytes: {expected}"


def test_validate_recipe_rejects_misspelt_destination():
    entry = {"source": "app.py", "destnation": "/opt/app/app.py"}

    message = validation_message(make_recipe_data(files=[entry]))

    assert message.splitlines() == [
        "files[0].destination: required field is missing",
        "files[0].destnation: unknown field 'destnation'; did you mean 'destination'?",
    ]


def test_validate_recipe_rejects_file_entry_as_text():
    message = validation_message(make_recipe_data(files=["app.py"]))

    assert message == "files[0]: must be a mapping of fields, got 'app.py'"


def test_validate_recipe_rejects_files_as_mapping():
    message = validation_message(make_recipe_data(files=make_file_entry()))

    assert message == "files: Input should be a valid list"


def test_validate_recipe_rejects_too_many_files():
    files = [make_file_entry(destination=f"/opt/app/{index}") for index in range(501)]

    message = validation_message(make_recipe_data(files=files))

    assert message == "files: List should have at most 500 items after validation, not 501"


def test_validate_recipe_reports_problem_in_each_file_entry():
    files = [
        make_file_entry(destination="opt/a"),
        make_file_entry(destination="/opt/b"),
        make_file_entry(destination="/opt/c", mode="999"),
    ]

    message = validation_message(make_recipe_data(files=files))

    assert message.splitlines() == [
        "files[0].destination: must be an absolute path starting with '/', got 'opt/a'",
        "files[2].mode: must be an octal file mode such as '0644' or '0755', got '999'",
    ]


# Dependencies.


@pytest.mark.parametrize(
    "manager, name",
    [
        ("apt", "curl"),
        ("apt", "libssl1.1"),
        ("apt", "g++"),
        ("apt", "python3-venv"),
        ("pip", "requests"),
        ("pip", "Flask_Login"),
        ("pip", "zope.interface"),
        ("pip", "A"),
        ("pip3", "paho-mqtt"),
        ("npm", "express"),
        ("npm", "@scope/pkg"),
        ("npm", "lodash.merge"),
        ("npm", "left~pad"),
    ],
)
def test_validate_recipe_accepts_package_name(manager, name):
    recipe = Recipe.model_validate(packages_data(manager, {"name": name}))

    assert getattr(recipe.dependencies, manager).packages[0].name == name
    assert recipe.stages() == ["dependencies", "after"]


@pytest.mark.parametrize(
    "manager, name, rule, label",
    [
        ("apt", "c", APT_NAME_RULE, "apt"),
        ("apt", "Curl", APT_NAME_RULE, "apt"),
        ("apt", "-curl", APT_NAME_RULE, "apt"),
        ("apt", "curl;reboot", APT_NAME_RULE, "apt"),
        ("apt", "curl=7.0", APT_NAME_RULE, "apt"),
        ("apt", "curl\n", APT_NAME_RULE, "apt"),
        ("apt", "", APT_NAME_RULE, "apt"),
        ("pip", "requests; rm -rf /", PIP_NAME_RULE, "pip"),
        ("pip", "-r", PIP_NAME_RULE, "pip"),
        ("pip", "requests[security]", PIP_NAME_RULE, "pip"),
        ("pip", "requests==2.0", PIP_NAME_RULE, "pip"),
        ("pip", "pkg-", PIP_NAME_RULE, "pip"),
        ("pip", ".pkg", PIP_NAME_RULE, "pip"),
        ("pip", "git+https://example.com/x.git", PIP_NAME_RULE, "pip"),
        ("pip3", "requests; rm -rf /", PIP_NAME_RULE, "pip"),
        ("npm", "Express", NPM_NAME_RULE, "npm"),
        ("npm", "@scope", NPM_NAME_RULE, "npm"),
        ("npm", "../evil", NPM_NAME_RULE, "npm"),
        ("npm", "pkg name", NPM_NAME_RULE, "npm"),
        ("npm", "-g", NPM_NAME_RULE, "npm"),
        ("npm", "$(id)", NPM_NAME_RULE, "npm"),
        ("apt", "curl jq", APT_NAME_RULE, "apt"),
        ("apt", "curl\tjq", APT_NAME_RULE, "apt"),
        ("apt", "--reinstall", APT_NAME_RULE, "apt"),
        ("pip", " requests", PIP_NAME_RULE, "pip"),
        ("pip", "requests`id`", PIP_NAME_RULE, "pip"),
        ("pip", "requests&&reboot", PIP_NAME_RULE, "pip"),
        ("pip", "--index-url=http://evil", PIP_NAME_RULE, "pip"),
        ("pip3", "requests|sh", PIP_NAME_RULE, "pip"),
        ("npm", "a>b", NPM_NAME_RULE, "npm"),
        ("npm", "--prefix=/", NPM_NAME_RULE, "npm"),
        ("npm", "@scope/-pkg", NPM_NAME_RULE, "npm"),
    ],
)
def test_validate_recipe_rejects_invalid_package_name(manager, name, rule, label):
    message = validation_message(packages_data(manager, {"name": "valid-name"}, {"name": name}))

    assert message == f"dependencies.{manager}.packages[1].name: {name!r} is not a valid {label} package name: {rule}"


@pytest.mark.parametrize(
    "manager, version",
    [
        ("apt", "7.81.0-1ubuntu1.15"),
        ("apt", "1:2.0~rc1"),
        ("apt", "2.*"),
        ("pip", "2.31.0"),
        ("pip", "1.0rc1"),
        ("pip", "1!2.0"),
        ("pip", "1.0.post1"),
        ("pip3", "2.*"),
        ("npm", "^1.2.3"),
        ("npm", "~1.2"),
        ("npm", ">=1.0.0"),
        ("npm", "1.x"),
        ("npm", "latest"),
        ("pip", "1.0.dev2"),
        ("pip", "1.0+local.1"),
        ("pip", "1.0-1"),
        ("apt", "2:1.0-1+deb12u1"),
        ("npm", ">=1.0.0 <2.0.0"),
        ("npm", "1.0.0 - 2.0.0"),
        ("npm", "1.0 || 2.0"),
        ("npm", "1.2.3-beta.1"),
    ],
)
def test_validate_recipe_accepts_package_version(manager, version):
    recipe = Recipe.model_validate(packages_data(manager, {"name": "pkg", "version": version}))

    assert getattr(recipe.dependencies, manager).packages[0].version == version


@pytest.mark.parametrize(
    "manager, version, rule, label",
    [
        ("apt", "1.0 ; ls", APT_VERSION_RULE, "apt"),
        ("apt", ">=1.0", APT_VERSION_RULE, "apt"),
        ("apt", "", APT_VERSION_RULE, "apt"),
        ("apt", "1.0\n", APT_VERSION_RULE, "apt"),
        ("pip", ">=2.0", PIP_VERSION_RULE, "pip"),
        ("pip", "2.0; rm -rf /", PIP_VERSION_RULE, "pip"),
        ("pip", "", PIP_VERSION_RULE, "pip"),
        ("pip3", "2.0 ", PIP_VERSION_RULE, "pip"),
        ("npm", "$(id)", NPM_VERSION_RULE, "npm"),
        ("npm", "", NPM_VERSION_RULE, "npm"),
        ("apt", "-1", APT_VERSION_RULE, "apt"),
        ("apt", "a1.0", APT_VERSION_RULE, "apt"),
        ("apt", "1" * 129, APT_VERSION_RULE, "apt"),
        ("pip", "abc", PIP_VERSION_RULE, "pip"),
        ("pip", "-r", PIP_VERSION_RULE, "pip"),
        ("pip", "1." + "0" * 63, PIP_VERSION_RULE, "pip"),
        ("npm", "1.0 ||", NPM_VERSION_RULE, "npm"),
        ("npm", "-g", NPM_VERSION_RULE, "npm"),
        ("npm", "1.0;reboot", NPM_VERSION_RULE, "npm"),
        ("npm", ">= 1.0", NPM_VERSION_RULE, "npm"),
    ],
)
def test_validate_recipe_rejects_invalid_package_version(manager, version, rule, label):
    message = validation_message(packages_data(manager, {"name": "pkg", "version": version}))

    assert message == f"dependencies.{manager}.packages[0].version: {version!r} is not a valid {label} version: {rule}"


def test_validate_recipe_rejects_package_without_name():
    message = validation_message(packages_data("apt", {"version": "1.0"}))

    assert message == "dependencies.apt.packages[0].name: required field is missing"


def test_validate_recipe_rejects_misspelt_package_field():
    message = validation_message(packages_data("pip", {"name": "requests", "verison": "2.0"}))

    assert message == "dependencies.pip.packages[0].verison: unknown field 'verison'; did you mean 'version'?"


@pytest.mark.parametrize(
    "manager, names, duplicates",
    [
        ("apt", ["curl", "jq", "curl"], "['curl']"),
        ("pip", ["Flask_Login", "flask-login"], "['flask-login']"),
        ("pip3", ["zope.interface", "Zope-Interface"], "['zope-interface']"),
        ("npm", ["express", "Express".lower()], "['express']"),
    ],
)
def test_validate_recipe_rejects_duplicate_packages(manager, names, duplicates):
    packages = [{"name": name} for name in names]

    message = validation_message(packages_data(manager, *packages))

    assert message == f"dependencies.{manager}.packages: lists a package twice: {duplicates}"


def test_validate_recipe_accepts_package_in_two_managers():
    dependencies = {"pip": {"packages": [{"name": "requests"}]}, "pip3": {"packages": [{"name": "requests"}]}}

    recipe = Recipe.model_validate(make_recipe_data(dependencies=dependencies))

    assert recipe.dependencies.pip.packages[0].name == "requests"
    assert recipe.dependencies.pip3.packages[0].name == "requests"


def test_validate_recipe_rejects_too_many_packages():
    packages = [{"name": f"pkg{index}"} for index in range(201)]

    message = validation_message(packages_data("npm", *packages))

    assert message == "dependencies.npm.packages: List should have at most 200 items after validation, not 201"


@pytest.mark.parametrize("manager", ["apt", "pip", "pip3", "npm"])
def test_validate_recipe_accepts_package_timeout_bounds(manager):
    low = Recipe.model_validate(packages_data(manager, {"name": "pkg"}, timeout_seconds=1))
    high = Recipe.model_validate(packages_data(manager, {"name": "pkg"}, timeout_seconds=86400))
    default = Recipe.model_validate(packages_data(manager, {"name": "pkg"}))

    assert getattr(low.dependencies, manager).timeout_seconds == 1
    assert getattr(high.dependencies, manager).timeout_seconds == 86400
    assert getattr(default.dependencies, manager).timeout_seconds == 900


@pytest.mark.parametrize("manager", ["apt", "pip", "pip3", "npm"])
@pytest.mark.parametrize(
    "seconds, expected",
    [
        (0, "Input should be greater than or equal to 1, got 0"),
        (86401, "Input should be less than or equal to 86400, got 86401"),
        ("900", "Input should be a valid integer, got '900'"),
    ],
)
def test_validate_recipe_rejects_package_timeout_out_of_bounds(manager, seconds, expected):
    message = validation_message(packages_data(manager, {"name": "pkg"}, timeout_seconds=seconds))

    assert message == f"dependencies.{manager}.timeout_seconds: {expected}"


@pytest.mark.parametrize("manager, field", [("pip", "virtualenv"), ("pip3", "virtualenv"), ("npm", "directory")])
@pytest.mark.parametrize("path, stored", [("/opt/app/venv", "/opt/app/venv"), ("/opt/app/venv/", "/opt/app/venv")])
def test_validate_recipe_accepts_package_location(manager, field, path, stored):
    recipe = Recipe.model_validate(packages_data(manager, {"name": "pkg"}, **{field: path}))

    assert getattr(getattr(recipe.dependencies, manager), field) == stored


@pytest.mark.parametrize("manager, field", [("pip", "virtualenv"), ("pip3", "virtualenv"), ("npm", "directory")])
@pytest.mark.parametrize(
    "path, expected",
    [
        ("venv", "must be an absolute path starting with '/', got 'venv'"),
        ("/opt/../venv", "must not contain '..', got '/opt/../venv'"),
        ("/", "must be a path below '/', got '/'"),
        ("/opt//venv", "must be a normalised path, got '/opt//venv'; write '/opt/venv'"),
    ],
)
def test_validate_recipe_rejects_invalid_package_location(manager, field, path, expected):
    message = validation_message(packages_data(manager, {"name": "pkg"}, **{field: path}))

    assert message == f"dependencies.{manager}.{field}: {expected}"


def test_validate_recipe_rejects_virtualenv_for_apt():
    message = validation_message(packages_data("apt", {"name": "curl"}, virtualenv="/opt/venv"))

    assert message == "dependencies.apt.virtualenv: unknown field 'virtualenv'; known fields here: packages, timeout_seconds, lock_timeout_seconds"


def test_validate_recipe_rejects_unknown_package_manager():
    dependencies = {"yum": {"packages": [{"name": "curl"}]}}

    message = validation_message(make_recipe_data(dependencies=dependencies))

    assert message == "dependencies.yum: unknown field 'yum'; known fields here: apt, pip, pip3, npm"


def test_package_accepts_any_text_outside_a_manager():
    package = Package(name="requests; rm -rf /")

    assert package.name == "requests; rm -rf /"


def test_package_group_revalidates_plain_package():
    accepted = AptPackages(packages=[Package(name="curl", version="7.81.0")])

    assert accepted.packages[0].name == "curl"
    with pytest.raises(ValidationError) as caught:
        AptPackages(packages=[Package(name="Curl")])
    assert format_validation_error(caught.value) == (
        f"packages[0].name: 'Curl' is not a valid apt package name: {APT_NAME_RULE}"
    )


def test_pip_package_canonical_name_follows_pep_503():
    assert PipPackage.canonical_name("Zope__Interface.x") == "zope-interface-x"


# Rollback.


def test_validate_recipe_defaults_rollback():
    rollback = Recipe.model_validate(make_recipe_data()).rollback

    assert rollback.revert_files is True
    assert rollback.revert_packages is True
    assert rollback.command is None
    assert rollback.command_timeout_seconds == 300
    assert rollback.reboot is False


def test_validate_recipe_accepts_rollback():
    rollback = {
        "revert_files": False,
        "revert_packages": False,
        "command": "systemctl restart app",
        "command_timeout_seconds": 86400,
        "reboot": True,
    }

    recipe = Recipe.model_validate(make_recipe_data(rollback=rollback))

    assert recipe.rollback.model_dump() == rollback


@pytest.mark.parametrize(
    "rollback, expected",
    [
        ({"command": "  "}, "rollback.command: is empty; give a command or remove the field"),
        ({"command": "a\x00b"}, "rollback.command: must not contain a NUL byte"),
        (
            {"command": "#" * (MAX_COMMAND_BYTES + 1)},
            f"rollback.command: is {MAX_COMMAND_BYTES + 1} bytes, over the limit of {MAX_COMMAND_BYTES}",
        ),
        (
            {"command_timeout_seconds": 0},
            "rollback.command_timeout_seconds: Input should be greater than or equal to 1, got 0",
        ),
        (
            {"command_timeout_seconds": 86401},
            "rollback.command_timeout_seconds: Input should be less than or equal to 86400, got 86401",
        ),
        (
            {"revert_files": "maybe"},
            "rollback.revert_files: Input should be a valid boolean, unable to interpret input, got 'maybe'",
        ),
        ({"reboot": 2}, "rollback.reboot: Input should be a valid boolean, unable to interpret input, got 2"),
        (
            {"reboot_device": True},
            "rollback.reboot_device: unknown field 'reboot_device'; did you mean 'reboot'?",
        ),
    ],
)
def test_validate_recipe_rejects_invalid_rollback(rollback, expected):
    assert validation_message(make_recipe_data(rollback=rollback)) == expected


# Device timeouts.


def test_validate_recipe_defaults_device_timeouts():
    timeouts = Recipe.model_validate(make_recipe_data()).timeouts

    assert timeouts.check_in_deadline_seconds == 86400
    assert timeouts.heartbeat_timeout_seconds == 60


@pytest.mark.parametrize(
    "field, seconds",
    [
        ("check_in_deadline_seconds", 1),
        ("check_in_deadline_seconds", 30 * 86400),
        ("heartbeat_timeout_seconds", 10),
        ("heartbeat_timeout_seconds", 3600),
    ],
)
def test_validate_recipe_accepts_device_timeout_bounds(field, seconds):
    recipe = Recipe.model_validate(make_recipe_data(timeouts={field: seconds}))

    assert getattr(recipe.timeouts, field) == seconds


@pytest.mark.parametrize(
    "field, seconds, expected",
    [
        ("check_in_deadline_seconds", 0, "Input should be greater than or equal to 1, got 0"),
        ("check_in_deadline_seconds", 2592001, "Input should be less than or equal to 2592000, got 2592001"),
        ("heartbeat_timeout_seconds", 9, "Input should be greater than or equal to 10, got 9"),
        ("heartbeat_timeout_seconds", 3601, "Input should be less than or equal to 3600, got 3601"),
        ("heartbeat_timeout_seconds", "60", "Input should be a valid integer, got '60'"),
    ],
)
def test_validate_recipe_rejects_device_timeout_out_of_bounds(field, seconds, expected):
    message = validation_message(make_recipe_data(timeouts={field: seconds}))

    assert message == f"timeouts.{field}: {expected}"


# The recipe as a whole.


@pytest.mark.parametrize(
    "key, suggestion",
    [("fiels", "files"), ("dependecies", "dependencies"), ("comments", "comment"), ("target", "targets")],
)
def test_validate_recipe_rejects_misspelt_top_level_field(key, suggestion):
    data = make_recipe_data()
    data[key] = []

    message = validation_message(data)

    assert message == f"{key}: unknown field {key!r}; did you mean {suggestion!r}?"


def test_validate_recipe_lists_known_fields_for_unrelated_key():
    message = validation_message(make_recipe_data(owner="ops"))

    assert message == (
        "owner: unknown field 'owner'; known fields here: version, comment, targets, before, files, "
        "dependencies, after, rollback, timeouts, retries"
    )


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"targets": {"groups": ["lab"]}, "rollback": {"reboot": True}, "comment": "only settings"},
        {"dependencies": {"apt": {"packages": []}, "pip": {"virtualenv": "/opt/venv"}}},
        {"files": []},
    ],
)
def test_validate_recipe_rejects_recipe_that_does_nothing(fields):
    data = {"version": "1.0.0"}
    data.update(fields)

    message = validation_message(data)

    assert message == "recipe: the recipe does nothing: give at least one of before, files, dependencies or after"


def test_validate_recipe_rejects_top_level_list():
    with pytest.raises(ValidationError) as caught:
        Recipe.model_validate([{"version": "1"}])

    assert format_validation_error(caught.value) == "recipe: must be a mapping of fields, got [{'version': '1'}]"


def test_validate_recipe_reports_one_problem_per_line():
    data = make_recipe_data(
        version="",
        targets={"groups": ["Lab"]},
        files=[make_file_entry(destination="rel")],
        timeouts={"heartbeat_timeout_seconds": 1},
    )

    lines = validation_message(data).splitlines()

    assert [line.split(":")[0] for line in lines] == [
        "version",
        "targets.groups[0]",
        "files[0].destination",
        "timeouts.heartbeat_timeout_seconds",
    ]


def test_recipe_stages_follow_execution_order():
    data = make_recipe_data(
        before={"run": "systemctl stop app"},
        files=[make_file_entry()],
        dependencies={"apt": {"packages": [{"name": "curl"}]}},
    )

    recipe = Recipe.model_validate(data)

    assert recipe.stages() == ["before", "files", "dependencies", "after"]


def test_recipe_stages_skip_empty_dependencies():
    data = make_recipe_data(files=[make_file_entry()], dependencies={"npm": {"packages": []}})
    del data["after"]

    assert Recipe.model_validate(data).stages() == ["files"]


def test_validate_recipe_survives_json_round_trip():
    data = make_recipe_data(
        before={"script": "stop.sh", "timeout_seconds": 20},
        files=[make_file_entry(mode="0755", kind="file", artifact=DIGEST, size_bytes=12)],
        dependencies={"pip3": {"packages": [{"name": "requests", "version": "2.31.0"}], "virtualenv": "/opt/venv"}},
        rollback={"command": "systemctl restart app", "reboot": True},
        timeouts={"heartbeat_timeout_seconds": 30},
    )
    recipe = Recipe.model_validate(copy.deepcopy(data))

    reloaded = Recipe.model_validate_json(recipe.model_dump_json())

    assert reloaded == recipe
    assert Recipe.model_validate(recipe.model_dump(mode="json", exclude_none=True)) == recipe


def test_format_validation_error_uses_validated_model():
    with pytest.raises(ValidationError) as caught:
        CommandStage.model_validate({"rn": "true"})

    assert format_validation_error(caught.value) == "rn: unknown field 'rn'; did you mean 'run'?"


@pytest.mark.parametrize(
    "path, expected",
    [("/opt/app", "/opt/app"), ("/opt/app/", "/opt/app"), ("/a", "/a"), ("/opt/.hidden", "/opt/.hidden")],
)
def test_check_absolute_path_returns_normalised_path(path, expected):
    assert check_absolute_path(path) == expected


@pytest.mark.parametrize("value", [0, 86401, "5"])
def test_validate_recipe_rejects_invalid_apt_lock_timeout(value):
    data = packages_data("apt", {"name": "curl"})
    data["dependencies"]["apt"]["lock_timeout_seconds"] = value

    message = validation_message(data)

    assert message.startswith("dependencies.apt.lock_timeout_seconds: ")


def test_validate_recipe_defaults_apt_lock_timeout():
    recipe = Recipe.model_validate(packages_data("apt", {"name": "curl"}))

    assert recipe.dependencies.apt.lock_timeout_seconds == 120
