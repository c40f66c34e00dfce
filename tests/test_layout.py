"""The package's layout holds: imports go one way (lower rooms never import higher ones, no cycles, lazy imports
included), no private name crosses a module boundary, and no module grows past 700 lines."""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "open_fastervit"
MAX_LINES = 700

#: The rooms of the package, low to high: a module may import from its own room and the rooms below it.
RANKS: dict[str, int] = {
    "compat": 0, "runtime": 0, "paths": 0,
    "layers": 1,
    "model": 2, "zoo": 2, "convert": 2, "serialization": 2, "fused": 2, "plugins": 2, "data": 2, "labels": 2,
    "recipes": 2,
    "loading": 3, "weights": 3, "backbone": 3,
    "inference": 4, "validate": 4, "predict": 4,
    "train": 5,
    "tasks": 6,
    "deploy": 7,
    "bench": 8, "demos": 8,
    "cli": 9,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """``(imported module, imported names, line)`` for every import of the package in ``path``, anywhere in it."""
    found = []
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "open_fastervit":
                found.append((target, [alias.name for alias in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names
                      if alias.name.split(".")[0] == "open_fastervit"]
    return found


def resolve(target: str, names: list[str], known: dict[str, Path]) -> list[str]:
    """The modules an import statement loads: ``from pkg import mod`` names the submodule ``pkg.mod``."""
    out = []
    for imported in names or [""]:
        candidate = f"{target}.{imported}" if imported else target
        out.append(candidate if candidate in known else target)
    return out


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def graph() -> dict[str, set[str]]:
    known = modules()
    edges: dict[str, set[str]] = {}
    for name, path in known.items():
        edges[name] = {dep for target, names, _ in imports(name, path) for dep in resolve(target, names, known)
                       if dep != name and dep in known}
    return edges


def test_every_room_has_a_rank():
    rooms = {room(name) for name in modules()} - {""}
    assert rooms <= set(RANKS), f"rooms without a rank in this test: {sorted(rooms - set(RANKS))}"


def test_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(edges[node]):
            if state.get(dep) == 1:
                return stack + [node, dep]
            if dep not in state:
                cycle = visit(dep, stack + [node])
                if cycle:
                    return cycle
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node, [])
            assert cycle is None, "import cycle: " + " -> ".join(cycle[cycle.index(cycle[-1]):])


def test_lower_rooms_never_import_higher_ones():
    known = modules()
    upward = []
    for name, path in known.items():
        if name == "open_fastervit":  # the package's front door gathers the public API from every room
            continue
        for target, names, line in imports(name, path):
            for dep in resolve(target, names, known):
                if room(dep) and RANKS[room(dep)] > RANKS[room(name)]:
                    upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({room(name)}) imports {dep}")
    assert not upward, "\n".join(upward)


def test_no_private_name_crosses_a_module():
    known = modules()
    crossing = []
    for name, path in known.items():
        for target, names, line in imports(name, path):
            private = [n for n in names if n.startswith("_") and n != "__version__"]
            if private and target != name:
                crossing.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {private} from {target}")
    assert not crossing, "\n".join(crossing)


def test_imports_inside_functions_say_why():
    """An import inside a function (an optional or slow dependency) carries a comment on its line, on the line above,
    or on the comment line above the run of imports it belongs to."""
    silent = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for sub in ast.walk(node):
                if not isinstance(sub, (ast.Import, ast.ImportFrom)):
                    continue
                first = sub.lineno - 1
                while first > 0 and lines[first - 1].strip().startswith(("from ", "import ")):
                    first -= 1  # the run of imports this one belongs to
                run = lines[max(first - 1, 0):sub.end_lineno]
                if not any("#" in line for line in run):
                    silent.append(f"{path.relative_to(PACKAGE.parent)}:{sub.lineno}: {lines[sub.lineno - 1].strip()}")
    assert not silent, "imports inside functions without a reason:\n" + "\n".join(silent)


def test_no_module_over_700_lines():
    long = {str(path.relative_to(PACKAGE.parent)): n for path in PACKAGE.rglob("*.py")
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


@pytest.mark.parametrize("old, new", [
    ("open_fastervit.detection", "open_fastervit.tasks.detection"),
    ("open_fastervit.segmentation.train", "open_fastervit.tasks.segmentation.train"),
    ("open_fastervit.checkpoint", "open_fastervit.train.checkpoint"),
])
def test_moved_modules_keep_their_old_path_with_a_warning(old, new):
    import importlib
    import sys

    for key in [k for k in sys.modules if k == old or k.startswith(old + ".")]:
        del sys.modules[key]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)  # one module object: classes and state are shared
    assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught)


def test_moved_names_keep_their_old_path_with_a_warning():
    from open_fastervit.tasks.classification import TrainConfig
    from open_fastervit.train.loader import LoaderOptions

    with pytest.warns(DeprecationWarning, match="open_fastervit.tasks.classification"):
        from open_fastervit.train import TrainConfig as old_config
    with pytest.warns(DeprecationWarning, match="open_fastervit.train.loader"):
        from open_fastervit.data import LoaderOptions as old_options
    assert old_config is TrainConfig and old_options is LoaderOptions
    with pytest.raises(ImportError):
        from open_fastervit.train import NoSuchName  # noqa: F401


def test_every_task_is_registered_with_its_config():
    from open_fastervit.tasks.classification import ClassificationTask, TrainConfig
    from open_fastervit.tasks.detection import DetectionConfig, DetectionTask
    from open_fastervit.tasks.segmentation import SegmentationConfig, SegmentationTask
    from open_fastervit.train import Trainer, get_task, task_for_config

    for task, config in ((ClassificationTask, TrainConfig), (DetectionTask, DetectionConfig),
                         (SegmentationTask, SegmentationConfig)):
        assert get_task(task.name) is task and task_for_config(config()) is task and task.config_class is config
        assert not issubclass(task, Trainer)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        get_task("nope")


@pytest.mark.parametrize("module, code, words", [
    ("open_fastervit.train", 2, "fastervit train"),  # a library package: the message names the command
    ("open_fastervit.detection", 1, "cannot be directly executed"),  # a moved package: Python's own one line
])
def test_python_m_on_library_modules_says_what_to_run(module, code, words):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", module], capture_output=True, text=True, timeout=300)
    assert done.returncode == code and words in done.stderr and "Traceback" not in done.stderr
