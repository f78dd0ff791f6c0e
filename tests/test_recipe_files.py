"""Loading recipe files from disk, packing directories and bundling local files for upload."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
import textwrap
from pathlib import Path
from typing import Dict, List

import pytest

from microupdates.protocol.recipe import MAX_COMMAND_BYTES, Recipe
from microupdates.recipe_files import (
    LoadedRecipe,
    RecipeError,
    bundle_recipe,
    load_recipe_file,
    pack_directory,
    sha256_bytes,
)

EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def write_recipe(directory: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def load_error(path: Path) -> str:
    """Load the recipe at `path`, which must fail, and return the error message."""

    with pytest.raises(RecipeError) as caught:
        load_recipe_file(path)
    return str(caught.value)


def make_tree(root: Path) -> Path:
    """Create a small application tree with a subdirectory, an executable, an empty directory and a link."""

    (root / "bin").mkdir(parents=True)
    (root / "bin" / "app").write_text("#!/bin/sh\necho app\n")
    (root / "bin" / "app").chmod(0o755)
    (root / "config.yaml").write_text("port: 8080\n")
    (root / "config.yaml").chmod(0o640)
    (root / "empty").mkdir()
    (root / "current").symlink_to("bin/app")
    return root


class RecordingUpload:
    """An upload function that keeps each uploaded content by digest and counts the calls."""

    def __init__(self) -> None:
        self.stored: Dict[str, bytes] = {}
        self.calls: List[bytes] = []

    def __call__(self, content: bytes) -> str:
        self.calls.append(content)
        digest = hashlib.sha256(content).hexdigest()
        self.stored[digest] = content
        return digest


# load_recipe_file: a valid recipe.


def test_load_recipe_file_returns_recipe_with_base_dir(tmp_path):
    (tmp_path / "app.py").write_text("print('hello')\n")
    make_tree(tmp_path / "dist")
    path = write_recipe(
        tmp_path,
        """
        version: "1.4.0"
        targets:
          groups: [lab]
        files:
          - source: app.py
            destination: /opt/app/app.py
            mode: "0644"
          - source: dist
            destination: /opt/app/dist
        after:
          run: systemctl restart app
        """,
    )

    loaded = load_recipe_file(path)

    assert isinstance(loaded, LoadedRecipe)
    assert loaded.base_dir == tmp_path
    assert loaded.path == path
    assert loaded.recipe.version == "1.4.0"
    assert [entry.kind for entry in loaded.recipe.files] == ["file", "directory"]
    assert loaded.recipe.files[1].destination == "/opt/app/dist"
    assert loaded.source_path(loaded.recipe.files[0]) == tmp_path / "app.py"


def test_load_recipe_file_accepts_relative_path(tmp_path, monkeypatch):
    (tmp_path / "app.py").write_text("x = 1\n")
    write_recipe(
        tmp_path,
        """
        version: "1"
        files:
          - source: ./app.py
            destination: /opt/app.py
        """,
    )
    monkeypatch.chdir(tmp_path)

    loaded = load_recipe_file("recipe.yaml")

    assert loaded.base_dir == tmp_path
    assert loaded.path == tmp_path / "recipe.yaml"
    assert loaded.recipe.files[0].kind == "file"


def test_load_recipe_file_accepts_byte_order_mark(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(b"\xef\xbb\xbfversion: '1'\nafter:\n  run: 'true'\n")

    assert load_recipe_file(path).recipe.version == "1"


# load_recipe_file: line numbers in validation errors.


def test_load_recipe_file_reports_line_of_invalid_destination(tmp_path):
    (tmp_path / "app.py").write_text("x = 1\n")
    path = write_recipe(
        tmp_path,
        """
        version: "1.0"
        # The application itself.
        files:
          - source: app.py
            destination: /opt/app/app.py
          - source: app.py
            mode: "0644"
            destination: opt/app
        """,
    )

    message = load_error(path)

    assert message == f"{path}:8: files[1].destination: must be an absolute path starting with '/', got 'opt/app'"


def test_load_recipe_file_reports_each_problem_with_its_line(tmp_path):
    path = write_recipe(
        tmp_path,
        """
        version: "bad version"
        targets:
          devices:
            - kiosk-1
            - Kiosk-2
        files:
          - source: app.py
            destnation: /opt/app.py
        dependencies:
          pip:
            packages:
              - name: "requests; rm -rf /"
        after:
          run: "   "
        """,
    )

    with pytest.raises(RecipeError) as caught:
        load_recipe_file(path)

    assert caught.value.problems == [
        f"{path}:1: version: 'bad version' is not a valid version: use 1-64 letters, digits, '.', '_', '+', '~' or "
        "'-', starting with a letter or digit",
        f"{path}:5: targets.devices[1]: 'Kiosk-2' is not a valid name: use 1-63 lower-case letters, digits, '.', "
        "'_' or '-', starting with a letter or digit",
        f"{path}:7: files[0].destination: required field is missing",
        f"{path}:8: files[0].destnation: unknown field 'destnation'; did you mean 'destination'?",
        f"{path}:12: dependencies.pip.packages[0].name: 'requests; rm -rf /' is not a valid pip package name: use "
        "1-128 letters, digits, '.', '_' or '-', starting and ending with a letter or digit",
        f"{path}:14: after.run: is empty; give a command or remove the stage",
    ]
    assert str(caught.value) == "\n".join(caught.value.problems)


def test_load_recipe_file_reports_missing_version_without_line(tmp_path):
    path = write_recipe(
        tmp_path,
        """
        comment: no version here
        after:
          run: "true"
        """,
    )

    assert load_error(path) == f"{path}: version: required field is missing"


def test_load_recipe_file_reports_recipe_that_does_nothing(tmp_path):
    path = write_recipe(tmp_path, 'version: "1"\n')

    message = load_error(path)

    assert message == (
        f"{path}: recipe: the recipe does nothing: give at least one of before, files, dependencies or after"
    )


def test_load_recipe_file_reports_unquoted_number_version(tmp_path):
    path = write_recipe(
        tmp_path,
        """
        after:
          run: "true"
        version: 1.10
        """,
    )

    message = load_error(path)

    assert message.startswith(f"{path}:3: version: must be a quoted string, got the number 1.1;")


def test_load_recipe_file_reports_unquoted_octal_mode(tmp_path):
    (tmp_path / "app.py").write_text("x = 1\n")
    path = write_recipe(
        tmp_path,
        """
        version: "1"
        files:
          - source: app.py
            destination: /opt/app.py
            mode: 0644
        """,
    )

    message = load_error(path)

    assert message.startswith(f"{path}:5: files[0].mode: must be a quoted octal string such as '0644', got the number 420")


def test_load_recipe_file_reports_line_of_stage_problem(tmp_path):
    path = write_recipe(
        tmp_path,
        """
        version: "1"

        before:
          run: systemctl stop app
          script: stop.sh
        """,
    )

    message = load_error(path)

    assert message == (
        f"{path}:3: before: give exactly one of 'run' (inline bash) or 'script' (a file next to the recipe)"
    )


def test_load_recipe_file_finds_line_of_merged_key(tmp_path):
    path = write_recipe(
        tmp_path,
        """
        version: "1"
        files:
          - &first
            source: app.py
            destination: opt/app
          - <<: *first
            source: other.py
        """,
    )

    message = load_error(path)

    assert message.splitlines() == [
        f"{path}:5: files[0].destination: must be an absolute path starting with '/', got 'opt/app'",
        f"{path}:5: files[1].destination: must be an absolute path starting with '/', got 'opt/app'",
    ]


# load_recipe_file: files that are not a usable recipe.


def test_load_recipe_file_reports_yaml_syntax_error(tmp_path):
    path = write_recipe(
        tmp_path,
        """
        version: "1"
        targets:
          groups: [lab, production
        after:
          run: "true"
        """,
    )

    message = load_error(path)

    assert message == (
        f"{path}:4:6: invalid YAML: expected ',' or ']', but got ':' (while parsing a flow sequence at line 3)"
    )


def test_load_recipe_file_reports_tab_indentation(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text('version: "1"\nafter:\n\trun: "true"\n')

    message = load_error(path)

    assert message.startswith(f"{path}:3:1: invalid YAML: found character '\\t' that cannot start any token")


def test_load_recipe_file_rejects_python_tags(tmp_path):
    path = write_recipe(tmp_path, 'version: !!python/object/apply:os.system ["true"]\n')

    message = load_error(path)

    assert message.startswith(f"{path}:1:10: invalid YAML: could not determine a constructor for the tag")


def test_load_recipe_file_rejects_several_documents(tmp_path):
    path = write_recipe(tmp_path, 'version: "1"\n---\nversion: "2"\n')

    message = load_error(path)

    assert message == (
        f"{path}:2:1: invalid YAML: found another document (expected a single document in the stream at line 1)"
    )


@pytest.mark.parametrize(
    "text, description",
    [
        ("- version: '1'\n", "a list"),
        ("just text\n", "the value 'just text'"),
        ("42\n", "the value '42'"),
    ],
)
def test_load_recipe_file_rejects_non_mapping_top_level(tmp_path, text, description):
    path = write_recipe(tmp_path, text)

    message = load_error(path)

    assert message == (
        f"{path}:1: the recipe must be a YAML mapping with keys such as 'version', 'targets' and 'files', "
        f"got {description}"
    )


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_load_recipe_file_rejects_empty_file(tmp_path, text):
    path = write_recipe(tmp_path, text)

    assert load_error(path) == f"{path}: the file is empty; a recipe needs 'version' and at least one stage"


def test_load_recipe_file_rejects_duplicate_key(tmp_path):
    path = write_recipe(
        tmp_path,
        """
        version: "1"
        after:
          run: systemctl start app
          timeout_seconds: 30
          run: systemctl restart app
        """,
    )

    assert load_error(path) == f"{path}:5: after.run: the key 'run' appears twice; keep one"


def test_load_recipe_file_accepts_recursive_anchor(tmp_path):
    path = write_recipe(
        tmp_path,
        """
        version: "1"
        comment: &loop [*loop]
        after:
          run: "true"
        """,
    )

    assert load_error(path).startswith(f"{path}:2: comment: Input should be a valid string")


def test_load_recipe_file_reports_missing_file(tmp_path):
    path = tmp_path / "nothing-here.yaml"

    assert load_error(path) == f"{path}: recipe file not found: {path}"


def test_load_recipe_file_reports_directory(tmp_path):
    assert load_error(tmp_path) == f"{tmp_path}: is a directory; give the path of the recipe's YAML file"


def test_load_recipe_file_rejects_invalid_utf8(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(b"version: '1'\ncomment: caf\xe9\n")

    assert load_error(path) == f"{path}: not valid UTF-8 text at byte 25; save the recipe as UTF-8"


def test_load_recipe_file_rejects_oversized_file(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("#" * (1024 * 1024 + 1))

    assert load_error(path) == f"{path}: the file is 1048577 bytes, over the limit of 1048576"


# load_recipe_file: scripts.


def test_load_recipe_file_reads_scripts_into_run(tmp_path):
    (tmp_path / "stop.sh").write_text("systemctl stop app\n")
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "start.sh").write_text("#!/bin/bash\nsystemctl start app\n")
    path = write_recipe(
        tmp_path,
        """
        version: "1"
        before:
          script: stop.sh
          timeout_seconds: 20
        after:
          script: scripts/start.sh
        """,
    )

    recipe = load_recipe_file(path).recipe

    assert recipe.before.run == "systemctl stop app\n"
    assert recipe.before.script is None
    assert recipe.before.timeout_seconds == 20
    assert recipe.after.run == "#!/bin/bash\nsystemctl start app\n"
    assert recipe.after.script is None
    assert recipe.after.timeout_seconds == 300


def test_load_recipe_file_reads_absolute_script_path(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "check.sh").write_text("curl -fsS http://127.0.0.1:8080/health\n")
    recipe_dir = tmp_path / "recipe"
    recipe_dir.mkdir()
    path = write_recipe(recipe_dir, f'version: "1"\nafter:\n  script: {elsewhere / "check.sh"}\n')

    recipe = load_recipe_file(path).recipe

    assert recipe.after.run == "curl -fsS http://127.0.0.1:8080/health\n"


def test_load_recipe_file_keeps_inline_run(tmp_path):
    path = write_recipe(tmp_path, 'version: "1"\nafter:\n  run: systemctl start app\n')

    recipe = load_recipe_file(path).recipe

    assert recipe.after.run == "systemctl start app"
    assert recipe.after.script is None


def test_load_recipe_file_reports_missing_script(tmp_path):
    path = write_recipe(
        tmp_path,
        """
        version: "1"
        before:
          timeout_seconds: 20
          script: stop.sh
        """,
    )

    assert load_error(path) == f"{path}:4: before.script: script file not found: '{tmp_path / 'stop.sh'}'"


def test_load_recipe_file_rejects_script_outside_recipe_dir(tmp_path):
    recipe_dir = tmp_path / "recipe"
    recipe_dir.mkdir()
    (tmp_path / "stop.sh").write_text("systemctl stop app\n")
    path = write_recipe(recipe_dir, 'version: "1"\nbefore:\n  script: ../stop.sh\n')

    message = load_error(path)

    assert message == (
        f"{path}:3: before.script: '../stop.sh' is outside the recipe's directory '{recipe_dir}'; "
        "give an absolute path to use a file from elsewhere"
    )


@pytest.mark.parametrize("content", ["", "  \n\n"])
def test_load_recipe_file_rejects_empty_script(tmp_path, content):
    (tmp_path / "start.sh").write_text(content)
    path = write_recipe(tmp_path, 'version: "1"\nafter:\n  script: start.sh\n')

    message = load_error(path)

    assert message == (
        f"{path}:3: after.script: the content of '{tmp_path / 'start.sh'}' is empty; give a command or remove the stage"
    )


def test_load_recipe_file_rejects_script_with_nul_byte(tmp_path):
    (tmp_path / "start.sh").write_bytes(b"echo a\x00b\n")
    path = write_recipe(tmp_path, 'version: "1"\nafter:\n  script: start.sh\n')

    message = load_error(path)

    assert message == f"{path}:3: after.script: the content of '{tmp_path / 'start.sh'}' must not contain a NUL byte"


def test_load_recipe_file_rejects_oversized_script(tmp_path):
    (tmp_path / "start.sh").write_text("#" * (MAX_COMMAND_BYTES + 1))
    path = write_recipe(tmp_path, 'version: "1"\nafter:\n  script: start.sh\n')

    message = load_error(path)

    assert message == (
        f"{path}:3: after.script: script file '{tmp_path / 'start.sh'}' is {MAX_COMMAND_BYTES + 1} bytes, "
        f"over the limit of {MAX_COMMAND_BYTES}"
    )


def test_load_recipe_file_rejects_script_directory(tmp_path):
    (tmp_path / "scripts").mkdir()
    path = write_recipe(tmp_path, 'version: "1"\nafter:\n  script: scripts\n')

    assert load_error(path) == f"{path}:3: after.script: not a regular file: '{tmp_path / 'scripts'}'"


def test_load_recipe_file_rejects_non_utf8_script(tmp_path):
    (tmp_path / "start.sh").write_bytes(b"echo caf\xe9\n")
    path = write_recipe(tmp_path, 'version: "1"\nafter:\n  script: start.sh\n')

    message = load_error(path)

    assert message == f"{path}:3: after.script: script file '{tmp_path / 'start.sh'}' is not valid UTF-8 at byte 8"


# load_recipe_file: file sources.


def test_load_recipe_file_reports_missing_source(tmp_path):
    path = write_recipe(
        tmp_path,
        """
        version: "1"
        files:
          - destination: /opt/app/app.py
            source: build/app.py
        """,
    )

    message = load_error(path)

    assert message == f"{path}:4: files[0].source: file or directory not found: '{tmp_path / 'build' / 'app.py'}'"


def test_load_recipe_file_rejects_source_outside_recipe_dir(tmp_path):
    recipe_dir = tmp_path / "recipe"
    recipe_dir.mkdir()
    (tmp_path / "secret.txt").write_text("secret\n")
    path = write_recipe(
        recipe_dir,
        """
        version: "1"
        files:
          - source: sub/../../secret.txt
            destination: /opt/secret.txt
        """,
    )

    message = load_error(path)

    assert message == (
        f"{path}:3: files[0].source: 'sub/../../secret.txt' is outside the recipe's directory '{recipe_dir}'; "
        "give an absolute path to use a file from elsewhere"
    )


def test_load_recipe_file_accepts_absolute_source_elsewhere(tmp_path):
    recipe_dir = tmp_path / "recipe"
    recipe_dir.mkdir()
    build = make_tree(tmp_path / "build")
    path = write_recipe(recipe_dir, f'version: "1"\nfiles:\n  - source: {build}\n    destination: /opt/app\n')

    loaded = load_recipe_file(path)

    assert loaded.recipe.files[0].kind == "directory"
    assert loaded.source_path(loaded.recipe.files[0]) == build


def test_load_recipe_file_detects_kind_through_symlink(tmp_path):
    (tmp_path / "real.txt").write_text("content\n")
    (tmp_path / "alias.txt").symlink_to("real.txt")
    path = write_recipe(tmp_path, 'version: "1"\nfiles:\n  - source: alias.txt\n    destination: /opt/a.txt\n')

    assert load_recipe_file(path).recipe.files[0].kind == "file"


@pytest.mark.parametrize(
    "source, kind, actual",
    [("app.py", "directory", "file"), ("dist", "file", "directory")],
)
def test_load_recipe_file_rejects_mismatched_kind(tmp_path, source, kind, actual):
    (tmp_path / "app.py").write_text("x = 1\n")
    (tmp_path / "dist").mkdir()
    path = write_recipe(
        tmp_path,
        f"""
        version: "1"
        files:
          - source: {source}
            destination: /opt/target
            kind: {kind}
        """,
    )

    message = load_error(path)

    assert message == (
        f"{path}:5: files[0].kind: is {kind!r}, but '{tmp_path / source}' is a {actual}; fix the kind or remove it"
    )


def test_load_recipe_file_accepts_matching_kind(tmp_path):
    (tmp_path / "dist").mkdir()
    path = write_recipe(
        tmp_path, 'version: "1"\nfiles:\n  - {source: dist, destination: /opt/dist, kind: directory}\n'
    )

    assert load_recipe_file(path).recipe.files[0].kind == "directory"


def test_load_recipe_file_rejects_fifo_source(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    path = write_recipe(tmp_path, 'version: "1"\nfiles:\n  - source: pipe\n    destination: /opt/pipe\n')

    message = load_error(path)

    assert message == f"{path}:3: files[0].source: '{tmp_path / 'pipe'}' is neither a regular file nor a directory"


def test_load_recipe_file_reports_all_local_problems_together(tmp_path):
    (tmp_path / "app.py").write_text("x = 1\n")
    path = write_recipe(
        tmp_path,
        """
        version: "1"
        before:
          script: stop.sh
        files:
          - source: app.py
            destination: /opt/app.py
          - source: missing.txt
            destination: /opt/missing.txt
        after:
          script: start.sh
        """,
    )

    with pytest.raises(RecipeError) as caught:
        load_recipe_file(path)

    assert caught.value.problems == [
        f"{path}:3: before.script: script file not found: '{tmp_path / 'stop.sh'}'",
        f"{path}:10: after.script: script file not found: '{tmp_path / 'start.sh'}'",
        f"{path}:7: files[1].source: file or directory not found: '{tmp_path / 'missing.txt'}'",
    ]


# pack_directory.


def read_members(archive: bytes) -> List[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as opened:
        return opened.getmembers()


def test_pack_directory_gives_same_bytes_for_same_tree(tmp_path):
    tree = make_tree(tmp_path / "tree")

    first = pack_directory(tree)
    second = pack_directory(str(tree))

    assert first == second


def test_pack_directory_ignores_times_and_creation_order(tmp_path):
    first_tree = make_tree(tmp_path / "first")
    second_tree = tmp_path / "second"
    (second_tree / "empty").mkdir(parents=True)
    (second_tree / "current").symlink_to("bin/app")
    (second_tree / "config.yaml").write_text("port: 8080\n")
    (second_tree / "config.yaml").chmod(0o640)
    (second_tree / "bin").mkdir()
    (second_tree / "bin" / "app").write_text("#!/bin/sh\necho app\n")
    (second_tree / "bin" / "app").chmod(0o755)
    os.utime(second_tree / "config.yaml", (1_000_000, 1_000_000))

    assert sha256_bytes(pack_directory(first_tree)) == sha256_bytes(pack_directory(second_tree))


def test_pack_directory_changes_digest_when_content_changes(tmp_path):
    tree = make_tree(tmp_path / "tree")
    before = sha256_bytes(pack_directory(tree))

    (tree / "config.yaml").write_text("port: 8081\n")

    assert sha256_bytes(pack_directory(tree)) != before


def test_pack_directory_changes_digest_when_mode_changes(tmp_path):
    tree = make_tree(tmp_path / "tree")
    before = sha256_bytes(pack_directory(tree))

    (tree / "config.yaml").chmod(0o600)

    assert sha256_bytes(pack_directory(tree)) != before


def test_pack_directory_writes_normalised_members(tmp_path):
    tree = make_tree(tmp_path / "tree")
    (tree / "empty").chmod(0o700)

    members = read_members(pack_directory(tree))

    assert [member.name for member in members] == ["bin", "bin/app", "config.yaml", "current", "empty"]
    for member in members:
        assert (member.mtime, member.uid, member.gid, member.uname, member.gname) == (0, 0, 0, "", "")
    by_name = {member.name: member for member in members}
    assert by_name["bin/app"].isfile()
    assert by_name["bin/app"].mode == 0o755
    assert by_name["config.yaml"].mode == 0o640
    assert by_name["empty"].isdir()
    assert by_name["empty"].mode == 0o700
    assert by_name["current"].issym()
    assert by_name["current"].linkname == "bin/app"


def test_pack_directory_keeps_file_content(tmp_path):
    tree = make_tree(tmp_path / "tree")

    with tarfile.open(fileobj=io.BytesIO(pack_directory(tree)), mode="r:gz") as archive:
        content = archive.extractfile("bin/app").read()

    assert content == b"#!/bin/sh\necho app\n"


def test_pack_directory_writes_gzip_header_without_time_or_name(tmp_path):
    archive = pack_directory(make_tree(tmp_path / "tree"))

    assert archive[:2] == b"\x1f\x8b"
    assert archive[3] & 0x08 == 0
    assert archive[4:8] == b"\x00\x00\x00\x00"
    assert gzip.decompress(archive)


def test_pack_directory_packs_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()

    assert read_members(pack_directory(tmp_path / "empty")) == []


def test_pack_directory_sorts_names_by_code_point(tmp_path):
    tree = tmp_path / "tree"
    (tree / "a").mkdir(parents=True)
    (tree / "a" / "z").write_text("")
    (tree / "a-b").write_text("")
    (tree / "B").write_text("")

    names = [member.name for member in read_members(pack_directory(tree))]

    assert names == ["B", "a", "a-b", "a/z"]


@pytest.mark.parametrize("target", ["../../outside.txt", "../../../etc/passwd", "/etc/passwd", "sub/../../../x", "../.."])
def test_pack_directory_rejects_symlink_escape(tmp_path, target):
    tree = make_tree(tmp_path / "tree")
    (tmp_path / "outside.txt").write_text("outside\n")
    (tree / "bin" / "escape").symlink_to(target)

    with pytest.raises(RecipeError) as caught:
        pack_directory(tree)

    assert str(caught.value) == (
        f"{tree}: symbolic link 'bin/escape' points outside the directory, to {target!r}; "
        "replace it with the file it points to or with a relative link inside the directory"
    )


def test_pack_directory_rejects_escape_through_link_to_itself(tmp_path):
    tree = make_tree(tmp_path / "tree")
    (tree / "self").symlink_to(".")
    (tree / "parent").symlink_to("self/..")

    with pytest.raises(RecipeError) as caught:
        pack_directory(tree)

    assert "symbolic link 'parent' points outside the directory, to 'self/..'" in str(caught.value)


def test_pack_directory_accepts_links_that_stay_inside(tmp_path):
    tree = make_tree(tmp_path / "tree")
    (tree / "bin" / "config").symlink_to("../config.yaml")
    (tree / "bin" / "dangling").symlink_to("not-yet-there")
    (tree / "here").symlink_to(".")

    names = [member.name for member in read_members(pack_directory(tree))]

    assert "bin/config" in names
    assert "bin/dangling" in names
    assert "here" in names


def test_pack_directory_does_not_follow_directory_links(tmp_path):
    tree = make_tree(tmp_path / "tree")
    (tree / "bin-link").symlink_to("bin")

    names = [member.name for member in read_members(pack_directory(tree))]

    assert "bin-link" in names
    assert "bin-link/app" not in names


def test_pack_directory_rejects_fifo(tmp_path):
    tree = make_tree(tmp_path / "tree")
    os.mkfifo(tree / "bin" / "pipe")

    with pytest.raises(RecipeError) as caught:
        pack_directory(tree)

    assert str(caught.value) == (
        f"{tree}: 'bin/pipe' is not a regular file, directory or symbolic link; move it out of the directory"
    )


def test_pack_directory_rejects_file(tmp_path):
    (tmp_path / "file.txt").write_text("x")

    with pytest.raises(RecipeError) as caught:
        pack_directory(tmp_path / "file.txt")

    assert str(caught.value) == f"{tmp_path / 'file.txt'}: not a directory"


# bundle_recipe.


def write_bundle_recipe(tmp_path: Path) -> Path:
    (tmp_path / "app.py").write_text("print('hello')\n")
    (tmp_path / "copy.py").write_text("print('hello')\n")
    (tmp_path / "empty.txt").write_text("")
    make_tree(tmp_path / "dist")
    return write_recipe(
        tmp_path,
        """
        version: "2.0"
        files:
          - source: app.py
            destination: /opt/app/app.py
            mode: "0644"
          - source: copy.py
            destination: /opt/app/copy.py
          - source: empty.txt
            destination: /opt/app/empty.txt
          - source: dist
            destination: /opt/app/dist
        after:
          run: systemctl restart app
        """,
    )


def test_bundle_recipe_fills_artifact_and_size(tmp_path):
    loaded = load_recipe_file(write_bundle_recipe(tmp_path))
    upload = RecordingUpload()

    bundled = bundle_recipe(loaded, upload)

    app, copy, empty, dist = bundled.files
    app_content = (tmp_path / "app.py").read_bytes()
    assert app.artifact == hashlib.sha256(app_content).hexdigest()
    assert app.size_bytes == len(app_content)
    assert copy.artifact == app.artifact
    assert empty.artifact == EMPTY_SHA256
    assert empty.size_bytes == 0
    packed = pack_directory(tmp_path / "dist")
    assert dist.artifact == sha256_bytes(packed)
    assert dist.size_bytes == len(packed)
    assert upload.stored[dist.artifact] == packed


def test_bundle_recipe_uploads_each_content_once(tmp_path):
    loaded = load_recipe_file(write_bundle_recipe(tmp_path))
    upload = RecordingUpload()

    bundle_recipe(loaded, upload)

    assert len(upload.calls) == 3
    assert len(upload.stored) == 3


def test_bundle_recipe_keeps_other_fields_and_original(tmp_path):
    loaded = load_recipe_file(write_bundle_recipe(tmp_path))

    bundled = bundle_recipe(loaded, RecordingUpload())

    assert bundled.version == "2.0"
    assert bundled.after.run == "systemctl restart app"
    assert bundled.files[0].mode == "0644"
    assert [entry.kind for entry in bundled.files] == ["file", "file", "file", "directory"]
    assert all(entry.artifact is None for entry in loaded.recipe.files)
    assert Recipe.model_validate(bundled.model_dump(mode="json")) == bundled


def test_bundle_recipe_detects_kind_when_missing(tmp_path):
    make_tree(tmp_path / "dist")
    recipe = Recipe.model_validate(
        {"version": "1", "files": [{"source": "dist", "destination": "/opt/dist"}]}
    )
    loaded = LoadedRecipe(recipe=recipe, base_dir=tmp_path, path=tmp_path / "recipe.yaml")

    bundled = bundle_recipe(loaded, RecordingUpload())

    assert bundled.files[0].kind == "directory"
    assert bundled.files[0].artifact == sha256_bytes(pack_directory(tmp_path / "dist"))


def test_bundle_recipe_rejects_wrong_digest_from_upload(tmp_path):
    loaded = load_recipe_file(write_bundle_recipe(tmp_path))
    expected = hashlib.sha256((tmp_path / "app.py").read_bytes()).hexdigest()

    with pytest.raises(RecipeError) as caught:
        bundle_recipe(loaded, lambda content: "0" * 64)

    assert str(caught.value) == (
        f"{loaded.path}: files[0].source: the upload returned the digest {'0' * 64!r}, "
        f"but the content's SHA-256 is {expected!r}"
    )


def test_bundle_recipe_reports_symlink_escape_with_field(tmp_path):
    loaded = load_recipe_file(write_bundle_recipe(tmp_path))
    (tmp_path / "dist" / "leak").symlink_to("/etc/passwd")

    with pytest.raises(RecipeError) as caught:
        bundle_recipe(loaded, RecordingUpload())

    message = str(caught.value)
    assert message.startswith(f"{loaded.path}: files[3].source: {tmp_path / 'dist'}: symbolic link 'leak'")
    assert "points outside the directory, to '/etc/passwd'" in message


def test_bundle_recipe_reports_source_removed_after_loading(tmp_path):
    loaded = load_recipe_file(write_bundle_recipe(tmp_path))
    (tmp_path / "app.py").unlink()

    with pytest.raises(RecipeError) as caught:
        bundle_recipe(loaded, RecordingUpload())

    assert str(caught.value) == (
        f"{loaded.path}: files[0].source: cannot read '{tmp_path / 'app.py'}': No such file or directory"
    )


def test_sha256_bytes_returns_hex_digest():
    assert sha256_bytes(b"") == EMPTY_SHA256
    assert sha256_bytes(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files without read permission")
def test_bundle_recipe_names_unreadable_file_in_directory(tmp_path):
    loaded = load_recipe_file(write_bundle_recipe(tmp_path))
    locked = tmp_path / "dist" / "config.yaml"
    locked.chmod(0o000)

    with pytest.raises(RecipeError) as caught:
        bundle_recipe(loaded, RecordingUpload())

    assert str(caught.value) == f"{loaded.path}: files[3].source: cannot read '{locked}': Permission denied"
