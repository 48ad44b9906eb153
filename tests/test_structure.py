"""The code's shape, read from the source: imports run one way, no circles, no dead functions, a help line per flag."""
from __future__ import annotations

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("trainer", "benchmark")
# Imported inside the functions that need them: each costs a second or more of start-up.
HEAVY = {"tensorflow", "keras", "keras_cv", "tf2onnx", "onnx", "onnxruntime", "matplotlib"}


def project_files() -> dict[str, str]:
    """{module name: path} of every module in the packages, and the submission's files as 'submission.<name>'."""
    found = {f"submission.{name}": os.path.join(ROOT, "submission", f"{name}.py") for name in ("model", "interpreter")}
    for package in PACKAGES:
        for name in sorted(os.listdir(os.path.join(ROOT, package))):
            if name.endswith(".py"):
                module = package if name == "__init__.py" else f"{package}.{name[:-3]}"
                found[module] = os.path.join(ROOT, package, name)
    return found


def imports_of(module: str, path: str) -> list[tuple[str, bool]]:
    """(imported module, inside a function?) for every import statement; `from . import x` resolves to x."""
    tree = ast.parse(open(path).read(), path)
    package = module if module in PACKAGES else module.rsplit(".", 1)[0]
    known = project_files()
    out = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((alias.name, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = f"{package}.{base}" if base else package
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    out.append((sub if sub in known else base, in_function))
            visit(child, inner)

    visit(tree, False)
    return out


def graph() -> dict[str, set[str]]:
    files = project_files()
    edges = {}
    for module, path in files.items():
        targets = {name for name, _ in imports_of(module, path)}
        edges[module] = {t for t in targets if t in files and t != module}
    return edges


def test_no_import_circle_counting_imports_inside_functions():
    edges = graph()
    circles = []

    def walk(node, path):
        for nxt in edges[node]:
            if nxt in path:
                circles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in done:
                walk(nxt, path + [nxt])
        done.add(node)

    done: set[str] = set()
    for start in edges:
        walk(start, [start])
    assert not circles, f"import circles: {circles}"


def test_package_rule_benchmark_may_import_trainer_never_the_reverse():
    files = project_files()
    broken = []
    for module, path in files.items():
        tops = {name.split(".")[0] for name, _ in imports_of(module, path)}
        if module.startswith("trainer") and "benchmark" in tops:
            broken.append(f"{module} imports benchmark")
        # The submission may reach for the grader's TensorFlow as a fallback, inside a function, never at import.
        at_top = {name.split(".")[0] for name, inside in imports_of(module, path) if not inside}
        if module.startswith("submission.") and (tops & {"trainer", "benchmark", "keras"}
                                                 or at_top & {"tensorflow", "onnxruntime"}):
            broken.append(f"{module} imports {sorted(tops & {'trainer', 'benchmark', 'keras'})} or imports "
                          f"{sorted(at_top & {'tensorflow', 'onnxruntime'})} at its top")
    assert not broken, broken


def heavy_modules() -> set[str]:
    """Project modules that import a heavy library at their top level, directly or through another such module."""
    files = project_files()
    top = {m: {name for name, inside in imports_of(m, p) if not inside} for m, p in files.items()}
    heavy = {m for m, names in top.items() if {n.split(".")[0] for n in names} & HEAVY}
    grew = True
    while grew:
        more = {m for m, names in top.items() if m not in heavy and names & heavy}
        heavy |= more
        grew = bool(more)
    return heavy


def test_imports_inside_functions_only_where_they_buy_start_up_time():
    files = project_files()
    heavy = heavy_modules()
    needless = []
    for module, path in files.items():
        # model.py stands alone and picks its runtime inside Model(); child.py pins its cores before numpy starts
        # its threads, then imports the submission as the grader does.
        if module in ("submission.model", "submission.interpreter", "benchmark.child"):
            continue
        for name, inside in imports_of(module, path):
            if inside and name.split(".")[0] not in HEAVY and name not in heavy:
                needless.append(f"{module}: {name}")
    assert not needless, f"move these imports to the top of their module: {sorted(set(needless))}"


def test_every_function_is_used_somewhere():
    """A top-level function or class that nothing calls, imports or names is dead code (a registering decorator
    counts as a use)."""
    files = project_files()
    sources = {p: open(p).read() for p in files.values()}
    for folder in ("tests",):
        for name in os.listdir(os.path.join(ROOT, folder)):
            if name.endswith(".py"):
                path = os.path.join(ROOT, folder, name)
                sources[path] = open(path).read()
    used: set[str] = set()
    for text in sources.values():
        tree = ast.parse(text)
        aliases = {alias.asname or alias.name for node in ast.walk(tree)
                   if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
        # A module loaded by path (model.py's interpreter.py, a test's copy of it) is an import too.
        aliases |= {target.id for node in ast.walk(tree) if isinstance(node, ast.Assign)
                    and isinstance(node.value, ast.Call) and ast.unparse(node.value.func).endswith(
                        ("module_from_spec", "_interpreter_module")) for target in node.targets
                    if isinstance(target, ast.Name)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Name):
                used.add(node.id)
            elif isinstance(node, ast.Attribute) and ast.unparse(node.value) in aliases:
                used.add(node.attr)  # module.function; obj.method of another class does not count
            elif isinstance(node, ast.alias):
                used.add(node.name.split(".")[-1])
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
                used.add(node.value)  # a registry by name, like corrupt.FAMILIES
    dead = []
    for module, path in files.items():
        for node in ast.parse(sources[path]).body:
            registered = isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.decorator_list
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name not in used and not registered \
                    and node.name not in ("main", "Model"):
                dead.append(f"{module}.{node.name}")
    assert not dead, f"defined but never used: {dead}"


def test_train_help_has_a_line_for_every_flag():
    done = subprocess.run([sys.executable, "-m", "trainer", "train", "--help"], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert done.returncode == 0, done.stderr
    from dataclasses import fields

    from trainer.config import Config
    lines = done.stdout.splitlines()
    bare = []
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        at = next((i for i, line in enumerate(lines) if line.strip().startswith(flag + " ")
                   or line.strip() == flag or line.strip().startswith(flag + "  ")), None)
        if at is None:
            bare.append(f"{flag} (not listed)")
            continue
        rest = lines[at].strip()[len(flag):].split(maxsplit=1)
        follow = lines[at + 1].strip() if at + 1 < len(lines) else ""
        text = rest[1] if len(rest) > 1 else follow
        if not text or text.startswith("--"):
            bare.append(flag)
    assert not bare, f"flags without a help line: {bare}"


def test_options_page_is_generated_from_the_config():
    from trainer.config import options_markdown
    with open(os.path.join(ROOT, "docs", "options.md")) as fh:
        page = fh.read()
    assert page == options_markdown() + "\n", "docs/options.md is stale: run make options"
    # a dependent option's help ends its sentence before "Acts only with ..." follows it
    assert page.count(". Acts only with --") == page.count("Acts only with --") > 5
