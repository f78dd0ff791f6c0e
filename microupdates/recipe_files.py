"""Recipe files on the operator's machine: load and check a YAML recipe, then bundle its local files.

Loading validates the YAML against the Recipe model and reports each problem
with the file name and line, reads `script:` files into `run`, and checks that
every `files[].source` exists. Bundling reads each source (a directory becomes
a deterministic tar.gz), hands the bytes to an upload function, and returns a
recipe whose file entries name the uploaded artifacts by SHA-256.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import posixpath
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Set, Tuple, Union

import yaml
from pydantic import ValidationError

from microupdates.protocol.recipe import (
    MAX_COMMAND_BYTES,
    CommandStage,
    FileEntry,
    Location,
    Recipe,
    format_location,
    list_validation_problems,
)

# An estimate: 500 file entries, 200 packages per manager and three inline
# commands of 64 KiB come to under 300 KiB of YAML. The limit stops a wrong
# path from loading a large file.
MAX_RECIPE_FILE_BYTES = 1024 * 1024

# Changing the level changes the bytes, and so the digest, of every packed directory.
PACK_COMPRESS_LEVEL = 6

YAML_MERGE_TAG = "tag:yaml.org,2002:merge"

PathLike = Union[str, "os.PathLike[str]"]


class RecipeError(Exception):
    """Raised when a recipe file, a file it names or a directory to pack cannot be used.

    The message lists one problem per line, each as `FILE[:LINE]: field.path: message`
    when the problem belongs to a field of the recipe.
    """

    def __init__(self, problems: Union[str, List[str]]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class LoadedRecipe:
    """A validated recipe with its scripts read in, and where it came from.

    `base_dir` is the absolute directory of the recipe file, and relative
    `files[].source` paths are resolved against it.
    """

    recipe: Recipe
    base_dir: Path
    path: Path

    def source_path(self, entry: FileEntry) -> Path:
        """Return the local path of a file entry's source."""

        return self.base_dir / entry.source


class RecipeDocument:
    """A parsed recipe file: its data and its YAML node tree, which gives each field's line."""

    def __init__(self, label: str, root: yaml.Node, data: object) -> None:
        self.label = label
        self.root = root
        self.data = data

    def line_of(self, location: Location) -> Optional[int]:
        """Return the 1-based line of the deepest YAML node found along `location`, or None for the root."""

        node = self.root
        line = None
        for part in location:
            found = find_child_node(node, part)
            if found is None:
                break
            line, node = found
        return line

    def describe(self, location: Location, message: str) -> str:
        """Return a problem line: `FILE:LINE: field.path: message`, without LINE when none is known."""

        line = self.line_of(location)
        prefix = f"{self.label}:{line}" if line is not None else self.label
        return f"{prefix}: {format_location(location)}: {message}"


def find_child_node(node: yaml.Node, part: Union[str, int]) -> Optional[Tuple[int, yaml.Node]]:
    """Return the line and the node of one mapping key or sequence item below `node`, or None."""

    if isinstance(node, yaml.SequenceNode) and isinstance(part, int):
        if 0 <= part < len(node.value):
            item = node.value[part]
            return item.start_mark.line + 1, item
        return None

    if not isinstance(node, yaml.MappingNode):
        return None

    for key, value in node.value:
        if isinstance(key, yaml.ScalarNode) and key.tag != YAML_MERGE_TAG and key.value == str(part):
            return key.start_mark.line + 1, value

    # A key brought in with `<<: *anchor` is found in the anchored mapping.
    for key, value in node.value:
        if key.tag == YAML_MERGE_TAG:
            for merged in value.value if isinstance(value, yaml.SequenceNode) else [value]:
                found = find_child_node(merged, part)
                if found is not None:
                    return found
    return None


def load_recipe_file(path: PathLike) -> LoadedRecipe:
    """Load, validate and complete the recipe at `path`.

    The checks run in three steps: YAML syntax, then the Recipe model, then
    the local script and source files. Raises RecipeError listing every
    problem of the first step that finds any: scripts that cannot be read, and
    sources that are missing, outside the recipe's directory or of the wrong kind.
    """

    recipe_path = Path(path)
    label = str(path)
    absolute = Path(os.path.abspath(recipe_path))
    base_dir = absolute.parent

    text = read_recipe_text(recipe_path, label)
    document = parse_recipe_document(text, label)
    recipe = validate_recipe(document)

    problems: List[str] = []
    recipe = resolve_scripts(recipe, document, base_dir, problems)
    recipe = check_file_sources(recipe, document, base_dir, problems)
    if problems:
        raise RecipeError(problems)
    return LoadedRecipe(recipe=recipe, base_dir=base_dir, path=absolute)


def read_recipe_text(path: Path, label: str) -> str:
    """Read the recipe file as UTF-8 text."""

    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_FILE_BYTES:
            raise RecipeError(f"{label}: the file is {size} bytes, over the limit of {MAX_RECIPE_FILE_BYTES}")
        data = path.read_bytes()
    except FileNotFoundError:
        raise RecipeError(f"{label}: recipe file not found: {os.path.abspath(path)}") from None
    except IsADirectoryError:
        raise RecipeError(f"{label}: is a directory; give the path of the recipe's YAML file") from None
    except OSError as error:
        raise RecipeError(f"{label}: cannot read the recipe file: {error.strerror}") from error

    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise RecipeError(f"{label}: not valid UTF-8 text at byte {error.start}; save the recipe as UTF-8") from None


def parse_recipe_document(text: str, label: str) -> RecipeDocument:
    """Parse YAML text into data and nodes, and check that the top level is a mapping with unique keys."""

    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            raise RecipeError(f"{label}: the file is empty; a recipe needs 'version' and at least one stage")
        check_top_level(root, label)
        check_unique_keys(root, (), label, set())
        data = loader.construct_document(root)
    except yaml.MarkedYAMLError as error:
        raise RecipeError(describe_yaml_error(error, label)) from None
    except yaml.YAMLError as error:
        raise RecipeError(f"{label}: invalid YAML: {error}") from None
    finally:
        loader.dispose()
    return RecipeDocument(label, root, data)


def describe_yaml_error(error: yaml.MarkedYAMLError, label: str) -> str:
    """Return `FILE:LINE:COLUMN: invalid YAML: problem`, with the parser's context when it has one."""

    mark = error.problem_mark or error.context_mark
    position = f"{label}:{mark.line + 1}:{mark.column + 1}" if mark is not None else label

    # PyYAML writes the context first ("expected a single document") and the
    # problem second ("but found another document"). This message puts the problem first.
    problem = error.problem or error.context or "unknown error"
    if problem.startswith("but "):
        problem = problem[len("but "):]
    message = f"{position}: invalid YAML: {problem}"

    if error.problem and error.context:
        context = error.context
        if error.context_mark is not None:
            context += f" at line {error.context_mark.line + 1}"
        message += f" ({context})"
    return message


def check_top_level(root: yaml.Node, label: str) -> None:
    if isinstance(root, yaml.MappingNode):
        return
    kind = "a list" if isinstance(root, yaml.SequenceNode) else f"the value {root.value!r}"
    raise RecipeError(
        f"{label}:{root.start_mark.line + 1}: the recipe must be a YAML mapping with keys such as "
        f"'version', 'targets' and 'files', got {kind}"
    )


def check_unique_keys(node: yaml.Node, location: Location, label: str, visited: Set[int]) -> None:
    """Reject a mapping that repeats a key, which PyYAML would otherwise resolve by keeping the last value.

    `visited` contains the ids of nodes already checked, because an alias makes
    one node appear at several places and a recursive anchor contains itself.
    """

    if id(node) in visited:
        return
    visited.add(id(node))
    for child_location, child in iter_child_nodes(node, location):
        check_unique_keys(child, child_location, label, visited)

    if not isinstance(node, yaml.MappingNode):
        return
    seen = set()
    for key, _ in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.tag == YAML_MERGE_TAG:
            continue
        if key.value in seen:
            path = format_location(location + (key.value,))
            raise RecipeError(
                f"{label}:{key.start_mark.line + 1}: {path}: the key {key.value!r} appears twice; keep one"
            )
        seen.add(key.value)


def iter_child_nodes(node: yaml.Node, location: Location) -> Iterator[Tuple[Location, yaml.Node]]:
    if isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            yield location + (index,), item
    elif isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else "?"
            yield location + (name,), value


def validate_recipe(document: RecipeDocument) -> Recipe:
    try:
        return Recipe.model_validate(document.data)
    except ValidationError as error:
        problems = list_validation_problems(error, Recipe)
        raise RecipeError([document.describe(problem.location, problem.message) for problem in problems]) from None


class LocalFileProblem(Exception):
    """Raised inside this module for a local file that a recipe field names but that cannot be used."""


def resolve_local_path(base_dir: Path, name: str) -> Path:
    """Return the normalised local path for `name`, which must stay inside base_dir unless it is absolute."""

    if "\x00" in name:
        raise LocalFileProblem(f"must not contain a NUL byte, got {name!r}")
    if os.path.isabs(name):
        return Path(os.path.normpath(name))

    joined = Path(os.path.normpath(base_dir / name))
    if joined != base_dir and base_dir not in joined.parents:
        raise LocalFileProblem(
            f"{name!r} is outside the recipe's directory {str(base_dir)!r}; "
            "give an absolute path to use a file from elsewhere"
        )
    return joined


def resolve_scripts(recipe: Recipe, document: RecipeDocument, base_dir: Path, problems: List[str]) -> Recipe:
    """Return the recipe with the text of each `script:` file in `run` and `script` set to None."""

    updates = {}
    for stage_name in ("before", "after"):
        stage = getattr(recipe, stage_name)
        if stage is None or stage.script is None:
            continue
        location = (stage_name, "script")
        try:
            updates[stage_name] = read_script_stage(stage, base_dir)
        except LocalFileProblem as problem:
            problems.append(document.describe(location, str(problem)))
    return recipe.model_copy(update=updates)


def read_script_stage(stage: CommandStage, base_dir: Path) -> CommandStage:
    """Return a copy of `stage` that runs the content of its script file inline."""

    path = resolve_local_path(base_dir, stage.script)
    text = read_script_text(path)
    try:
        return CommandStage.model_validate({"run": text, "timeout_seconds": stage.timeout_seconds})
    except ValidationError as error:
        messages = [problem.message for problem in list_validation_problems(error, CommandStage)]
        raise LocalFileProblem(f"the content of {str(path)!r} " + "; ".join(messages)) from None


def read_script_text(path: Path) -> str:
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise LocalFileProblem(f"not a regular file: {str(path)!r}")
        if size > MAX_COMMAND_BYTES:
            raise LocalFileProblem(f"script file {str(path)!r} is {size} bytes, over the limit of {MAX_COMMAND_BYTES}")
        data = path.read_bytes()
    except FileNotFoundError:
        raise LocalFileProblem(f"script file not found: {str(path)!r}") from None
    except OSError as error:
        raise LocalFileProblem(f"cannot read script file {str(path)!r}: {error.strerror}") from None

    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise LocalFileProblem(f"script file {str(path)!r} is not valid UTF-8 at byte {error.start}") from None


def check_file_sources(recipe: Recipe, document: RecipeDocument, base_dir: Path, problems: List[str]) -> Recipe:
    """Return the recipe with `kind` set on every file entry from what its source is on disk."""

    entries = []
    for index, entry in enumerate(recipe.files):
        try:
            path = resolve_local_path(base_dir, entry.source)
            found_kind = detect_source_kind(path)
        except LocalFileProblem as problem:
            problems.append(document.describe(("files", index, "source"), str(problem)))
            entries.append(entry)
            continue

        if entry.kind is not None and entry.kind != found_kind:
            message = f"is {entry.kind!r}, but {str(path)!r} is a {found_kind}; fix the kind or remove it"
            problems.append(document.describe(("files", index, "kind"), message))
        entries.append(entry.model_copy(update={"kind": found_kind}))
    return recipe.model_copy(update={"files": entries})


def detect_source_kind(path: Path) -> str:
    """Return "file" or "directory" for a source path, following symbolic links."""

    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise LocalFileProblem(f"file or directory not found: {str(path)!r}") from None
    except OSError as error:
        raise LocalFileProblem(f"cannot read {str(path)!r}: {error.strerror}") from None

    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISREG(mode):
        return "file"
    raise LocalFileProblem(f"{str(path)!r} is neither a regular file nor a directory")


def sha256_bytes(data: bytes) -> str:
    """Return the SHA-256 of `data` as 64 lower-case hex digits."""

    return hashlib.sha256(data).hexdigest()


def pack_directory(path: PathLike) -> bytes:
    """Return a tar.gz of the contents of the directory at `path`, the same bytes for the same tree.

    Members are named relative to the directory and added in sorted order. Each
    has mtime 0, uid and gid 0 and empty owner names. Permission bits are kept,
    and symbolic links stay links. The directory itself is not a member. Raises
    RecipeError for a symbolic link that points outside the directory and for
    sockets, FIFOs and device files, and OSError for a member it cannot read.

    NOTE: the gzip stream comes from the zlib that Python links, so another
    zlib build may produce other bytes, and another digest, for the same tree.
    """

    root = Path(path)
    if not root.is_dir():
        raise RecipeError(f"{root}: not a directory")
    real_root = os.path.realpath(root)

    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=PACK_COMPRESS_LEVEL) as stream:
        with tarfile.open(fileobj=stream, mode="w", format=tarfile.PAX_FORMAT) as archive:
            for relative in sorted(list_tree(root)):
                add_tar_member(archive, root, real_root, relative)
    return buffer.getvalue()


def list_tree(root: Path, relative: str = "") -> Iterator[str]:
    """Yield the '/'-separated relative path of everything below `root`, without following symbolic links."""

    with os.scandir(os.path.join(root, relative) if relative else root) as entries:
        children = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in entries]
    for name, is_directory in children:
        child = posixpath.join(relative, name) if relative else name
        yield child
        if is_directory:
            yield from list_tree(root, child)


def add_tar_member(archive: tarfile.TarFile, root: Path, real_root: str, relative: str) -> None:
    full_path = os.path.join(root, relative)
    status = os.lstat(full_path)

    info = tarfile.TarInfo(relative)
    info.mode = stat.S_IMODE(status.st_mode)
    info.mtime = 0
    info.uid = 0
    info.gid = 0
    info.uname = ""
    info.gname = ""

    if stat.S_ISLNK(status.st_mode):
        info.type = tarfile.SYMTYPE
        info.linkname = os.readlink(full_path)
        check_link_inside(root, real_root, relative, info.linkname)
        archive.addfile(info)
    elif stat.S_ISDIR(status.st_mode):
        info.type = tarfile.DIRTYPE
        archive.addfile(info)
    elif stat.S_ISREG(status.st_mode):
        info.size = status.st_size
        # O_NOFOLLOW: a file replaced by a link since lstat() is not followed.
        with open(os.open(full_path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as content:
            archive.addfile(info, content)
    else:
        raise RecipeError(
            f"{root}: {relative!r} is not a regular file, directory or symbolic link; move it out of the directory"
        )


def check_link_inside(root: Path, real_root: str, relative: str, target: str) -> None:
    """Reject a symbolic link whose target lies outside the packed directory.

    Both the written target and the resolved path are checked, because a
    target such as `self/..` looks inside when `self` links to `.`.
    """

    lexical = posixpath.normpath(posixpath.join(posixpath.dirname(relative), target))
    resolved = os.path.realpath(os.path.join(root, relative))
    inside_on_disk = resolved == real_root or resolved.startswith(real_root.rstrip(os.sep) + os.sep)
    if posixpath.isabs(target) or lexical == ".." or lexical.startswith("../") or not inside_on_disk:
        raise RecipeError(
            f"{root}: symbolic link {relative!r} points outside the directory, to {target!r}; "
            "replace it with the file it points to or with a relative link inside the directory"
        )


def bundle_recipe(loaded: LoadedRecipe, upload: Callable[[bytes], str]) -> Recipe:
    """Upload the content of every file entry and return a recipe copy naming each by artifact and size.

    `upload(content)` stores the bytes and returns their SHA-256. Each distinct
    content is uploaded once. A directory is uploaded as pack_directory's
    tar.gz. Raises RecipeError when a source cannot be read or packed, or when
    `upload` returns another digest than the content's.

    NOTE: each file and packed directory is read whole into memory.
    """

    uploaded: Dict[str, str] = {}
    entries = []
    for index, entry in enumerate(loaded.recipe.files):
        location = f"{loaded.path}: {format_location(('files', index, 'source'))}"
        kind = entry.kind or detect_kind_for_bundle(loaded, entry, location)
        content = read_entry_content(loaded.source_path(entry), kind, location)
        digest = sha256_bytes(content)

        if digest not in uploaded:
            uploaded[digest] = upload(content)
        if uploaded[digest] != digest:
            raise RecipeError(
                f"{location}: the upload returned the digest {uploaded[digest]!r}, "
                f"but the content's SHA-256 is {digest!r}"
            )
        entries.append(entry.model_copy(update={"kind": kind, "artifact": digest, "size_bytes": len(content)}))
    return loaded.recipe.model_copy(update={"files": entries})


def detect_kind_for_bundle(loaded: LoadedRecipe, entry: FileEntry, location: str) -> str:
    try:
        return detect_source_kind(loaded.source_path(entry))
    except LocalFileProblem as problem:
        raise RecipeError(f"{location}: {problem}") from None


def read_entry_content(path: Path, kind: str, location: str) -> bytes:
    """Return the bytes to upload for one source: the file's content or the directory's tar.gz."""

    try:
        if kind == "directory":
            return pack_directory(path)
        return path.read_bytes()
    except RecipeError as error:
        raise RecipeError(f"{location}: {error}") from error
    except OSError as error:
        failed = error.filename or str(path)
        raise RecipeError(f"{location}: cannot read {failed!r}: {error.strerror}") from error
