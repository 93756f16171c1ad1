"""How the code is laid out, as the project's guide asks: each rule is a property of the whole tree.

These read the source (never import it), so they run in a second and name the file and line at fault.
"""

import ast
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MAX_FILE_LINES = 1000
MAX_FUNCTION_LINES = 60
# The functions that may hold an argparse namespace: a script's main and the one place per script that
# turns parsed flags into typed settings.
NAMESPACE_READERS = {"main", "from_namespace"}


def tracked(pattern: str) -> list[Path]:
    listed = subprocess.run(["git", "ls-files", pattern], cwd=REPO, capture_output=True, text=True, check=True)
    return [REPO / line for line in listed.stdout.splitlines() if (REPO / line).is_file()]


def project_modules() -> list[Path]:
    """The project's Python files, tests excluded."""
    return [path for path in tracked("*.py") if path.parent == REPO]


def syntax_trees() -> list[tuple[Path, ast.Module]]:
    return [(path, ast.parse(path.read_text(), filename=str(path))) for path in project_modules()]


def where(path: Path, node: ast.AST) -> str:
    return f"{path.name}:{node.lineno}"


def functions(tree: ast.Module):
    return [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_project_file_is_longer_than_1000_lines():
    long = [f"{path.name}: {len(path.read_text().splitlines())} lines" for path in project_modules()
            if len(path.read_text().splitlines()) > MAX_FILE_LINES]
    assert not long, long


def test_no_function_is_longer_than_60_lines():
    long = [f"{where(path, node)} {node.name}: {node.end_lineno - node.lineno + 1} lines"
            for path, tree in syntax_trees() for node in functions(tree)
            if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, long


def takes_a_namespace(node: ast.FunctionDef) -> bool:
    arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
    for argument in arguments:
        annotation = ast.unparse(argument.annotation) if argument.annotation is not None else ""
        if argument.arg == "args" or "Namespace" in annotation:
            return True
    return False


def test_only_main_and_flag_parsing_take_an_argparse_namespace():
    offenders = [f"{where(path, node)} {node.name}" for path, tree in syntax_trees() for node in functions(tree)
                 if takes_a_namespace(node) and node.name not in NAMESPACE_READERS]
    assert not offenders, f"these functions take the parsed flags instead of typed settings: {offenders}"


def test_nothing_assigns_a_modules_forward():
    offenders = [where(path, node) for path, tree in syntax_trees() for node in ast.walk(tree)
                 if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign))
                 for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
                 if isinstance(target, ast.Attribute) and target.attr == "forward"]
    assert not offenders, f"a swapped forward hides a seam: {offenders}"


def test_no_private_argparse_state_and_no_simple_namespace_stand_ins():
    offenders = [where(path, node) for path, tree in syntax_trees() for node in ast.walk(tree)
                 if (isinstance(node, ast.Attribute) and node.attr in ("_actions", "SimpleNamespace"))
                 or (isinstance(node, ast.alias) and node.name.endswith("SimpleNamespace"))]
    assert not offenders, offenders


# Paths a user's clone lacks: the workspace folder beside the repository (spelled in pieces so that
# this file does not cite it itself).
OUTSIDE_PATHS = ["../" + "shared", "shared/" + "reference", "shared/" + "seeds"]


@pytest.mark.parametrize("outside", OUTSIDE_PATHS)
def test_no_file_cites_a_path_outside_the_repository(outside):
    files = [path for path in tracked("*") if path.suffix in (".py", ".md", ".sh", ".txt", ".toml", "")]
    offenders = [f"{path.relative_to(REPO)}:{number}" for path in files
                 for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if outside in line]
    assert not offenders, f"a user's clone has no {outside}; cite docs/reference.md or the public source: {offenders}"
