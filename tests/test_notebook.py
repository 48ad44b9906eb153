"""docs/train_on_gpu.ipynb: a valid notebook with no outputs, and every code cell run in order at smoke scale.

The runner is a few lines instead of Jupyter: each code cell runs in one shared namespace, and a line that starts
with `!` (after its indentation) becomes a shell call with IPython's `{expression}` expansion, failing the test
when it exits non-zero. Any other IPython syntax fails the test, so the notebook stays plain Python plus `!`.
The notebook runs in a copy of this checkout, so neither the working tree nor its runs/, submission/ and dist/
change. The whole run took 72-100 s on 2 shared cores (2026-12-02), most of it the smoke training: heavy.
"""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import time
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join("docs", "train_on_gpu.ipynb")
HOSTED_ONLY = "hosted-only"
KNOBS = {"HOSTED", "REPO_URL", "KIT", "DATA", "PROFILE", "TRAIN_ARGS", "NAME", "OUT", "SMOKE"}


def load(root: str = ROOT) -> dict:
    with open(os.path.join(root, NOTEBOOK)) as fh:
        return json.load(fh)


def code_cells(nb: dict) -> list[tuple[int, dict]]:
    return [(i, c) for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"]


def label(i: int, cell: dict) -> str:
    return f"cell {i} ({cell['id']})"


def python_of(cell: dict) -> str:
    """The cell as plain Python: `!cmd` lines become _sh(f'cmd') at the same indentation."""
    out = []
    for line in "".join(cell["source"]).splitlines():
        body = line.lstrip()
        indent = line[:len(line) - len(body)]
        if body.startswith("!"):
            command = body[1:].strip()
            # IPython also expands $name; the notebook does not use it, so this runner need not either.
            assert "$" not in command, f"`{body}`: use {{name}}, not $name"
            out.append(f"{indent}_sh(f{command!r})")
        elif body.startswith("%"):
            raise AssertionError(f"`{body}`: the notebook keeps to Python and `!` lines (use os.chdir for %cd)")
        else:
            out.append(line)
    return "\n".join(out) + "\n"


def hosted_guard(cell: dict) -> ast.expr | None:
    """The condition when the whole cell is one `if` on HOSTED with no else, else None."""
    body = ast.parse(python_of(cell)).body
    if len(body) == 1 and isinstance(body[0], ast.If) and not body[0].orelse:
        names = {n.id for n in ast.walk(body[0].test) if isinstance(n, ast.Name)}
        if "HOSTED" in names:
            return body[0].test
    return None


def tagged(nb: dict, tag: str) -> list[str]:
    return [label(i, c) for i, c in code_cells(nb) if tag in c["metadata"].get("tags", [])]


# ---- the file itself -----------------------------------------------------------------------------------------

def test_notebook_is_nbformat_4_without_outputs():
    nb = load()
    assert nb["nbformat"] == 4 and nb["nbformat_minor"] >= 5
    assert nb["metadata"]["kernelspec"]["language"] == "python"
    ids = [c["id"] for c in nb["cells"]]
    assert len(set(ids)) == len(ids) and all(1 <= len(i) <= 64 for i in ids)
    for i, cell in enumerate(nb["cells"]):
        assert cell["cell_type"] in ("code", "markdown"), label(i, cell)
        assert isinstance(cell["metadata"], dict) and all(isinstance(s, str) for s in cell["source"]), label(i, cell)
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, f"{label(i, cell)} has outputs"
            compile(python_of(cell), label(i, cell), "exec")


def test_one_parameters_cell_holds_every_knob_with_the_gpu_defaults():
    nb = load()
    cells = [c for _, c in code_cells(nb) if "parameters" in c["metadata"].get("tags", [])]
    assert len(cells) == 1
    tree = ast.parse(python_of(cells[0]))
    top = {t.id: node.value for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
           if isinstance(t, ast.Name)}
    anywhere = {t.id for node in ast.walk(tree) if isinstance(node, ast.Assign) for t in node.targets
                if isinstance(t, ast.Name)}
    assert KNOBS <= anywhere, f"missing from the parameters cell: {KNOBS - anywhere}"
    assert ast.literal_eval(top["PROFILE"]) == "gpu"
    assert ast.literal_eval(top["TRAIN_ARGS"]) == ""
    assert ast.literal_eval(top["SMOKE"]) is False
    first = nb["cells"].index(cells[0])
    assert first <= 3, "the parameters cell belongs near the top"


def test_cells_guarded_by_hosted_are_exactly_the_hosted_only_cells():
    nb = load()
    guarded = [label(i, c) for i, c in code_cells(nb) if hosted_guard(c) is not None]
    assert guarded == tagged(nb, HOSTED_ONLY)
    assert guarded, "the notebook has Colab/Kaggle steps; they must be tagged and guarded"


# ---- running it ----------------------------------------------------------------------------------------------

def test_runner_expands_like_ipython_and_fails_on_a_failed_command(tmp_path):
    cell = {"source": ["if n:\n", "    !test {n + 1} = 3 && touch {str(tmp_path / 'ran')}\n"]}
    ns = {"n": 2, "tmp_path": tmp_path, "_sh": shell(dict(os.environ))}
    exec(compile(python_of(cell), "cell", "exec"), ns)
    assert (tmp_path / "ran").exists()
    with pytest.raises(pytest.fail.Exception, match="exited 1"):
        exec(compile(python_of({"source": ["!test {n} = 3"]}), "cell", "exec"), ns)


def copy_checkout(dest: str) -> None:
    """This checkout's files (tracked and untracked, not ignored) with their times, and .venv as a link to ours."""
    venv = os.path.realpath(os.path.join(ROOT, ".venv"))
    stamp = os.path.join(venv, ".installed")
    if not os.path.isfile(stamp):
        pytest.skip(f"no {stamp}: run make setup first")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, listed):
        src = os.path.join(ROOT, rel)
        if rel == ".venv" or not os.path.isfile(src) or os.path.islink(src):
            continue
        os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
        shutil.copy2(src, os.path.join(dest, rel))
    os.symlink(venv, os.path.join(dest, ".venv"))
    # make zip's downloaded wheels and fresh environments are ours too: fetched and built once, not per copy.
    os.makedirs(os.path.join(dest, "dist"), exist_ok=True)
    for cache in ("wheels", "grader-envs"):
        os.makedirs(os.path.join(ROOT, "dist", cache), exist_ok=True)
        os.symlink(os.path.join(ROOT, "dist", cache), os.path.join(dest, "dist", cache))
    # The venv is given: the pins must not look newer than it, or the notebook's make would rebuild (and touch)
    # a venv this test only borrows. Only the copy's file times change; make -q then confirms setup is done.
    built = os.path.getmtime(stamp)
    for pin in ("requirements.txt", "constraints.txt"):
        path = os.path.join(dest, pin)
        if os.path.getmtime(path) >= built:
            os.utime(path, (built - 1, built - 1))
    assert subprocess.run(["make", "-q", "setup"], cwd=dest).returncode == 0, "make setup would rebuild the venv"


def run_cells(nb: dict, ns: dict, overrides: dict) -> list[str]:
    """Run every code cell in order in ns, overrides applied right after the parameters cell; returns the cells
    whose HOSTED guard was false here (so they did nothing)."""
    skipped = []
    for i, cell in code_cells(nb):
        guard = hosted_guard(cell)
        if guard is not None and not eval(compile(ast.Expression(guard), label(i, cell), "eval"), ns):
            skipped.append(label(i, cell))
        started = time.time()
        exec(compile(python_of(cell), label(i, cell), "exec"), ns)
        print(f"{label(i, cell)}: {time.time() - started:.1f} s", flush=True)
        if "parameters" in cell["metadata"].get("tags", []):
            ns.update(overrides)
    return skipped


def shell(env: dict):
    def _sh(command: str) -> None:
        print(f"$ {command}", flush=True)
        proc = subprocess.run(command, shell=True, env=env, capture_output=True, text=True, timeout=900)
        print(proc.stdout + proc.stderr, flush=True)
        if proc.returncode:
            pytest.fail(f"`{command}` exited {proc.returncode} in {os.getcwd()}:\n"
                        f"{(proc.stdout + proc.stderr)[-4000:]}")
    return _sh


def git_status() -> list[str]:
    """Changed, untracked and ignored paths of the checkout (runs/, dist/, submission/ files are ignored ones)."""
    lines = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    return [line for line in lines if "__pycache__" not in line and ".pytest_cache" not in line]


@pytest.mark.heavy
def test_notebook_runs_every_cell_at_smoke_scale(tmp_path, data_path, monkeypatch):
    kit = str(tmp_path / "kit")
    copy_checkout(kit)
    nb = load(kit)
    before = git_status()
    monkeypatch.chdir(os.path.join(kit, "docs"))  # where Jupyter starts a notebook; restored afterwards
    for marker in ("KAGGLE_KERNEL_RUN_TYPE", "COLAB_RELEASE_TAG"):  # this is the local path, wherever it runs
        monkeypatch.delenv(marker, raising=False)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ns = {"__name__": "__main__", "_sh": shell(env)}

    skipped = run_cells(nb, ns, {"SMOKE": True, "DATA": data_path})

    print("hosted-only cells, guarded off here:", skipped)
    assert skipped == tagged(nb, HOSTED_ONLY)
    assert ns["HOSTED"] is None and ns["PROFILE"] == "smoke" and ns["NAME"] == "notebook-smoke"
    assert os.path.realpath(os.getcwd()) == os.path.realpath(kit)
    run = os.path.join(kit, "runs", "notebook-smoke")
    with open(os.path.join(run, "config.json")) as fh:
        assert json.load(fh)["profile"] == "smoke"
    assert os.path.isfile(os.path.join(run, "benchmark.json"))
    with zipfile.ZipFile(os.path.join(kit, "dist", "notebook-smoke.zip")) as zf:
        names = zf.namelist()
        assert json.loads(zf.read("settings.json"))["run"] == "notebook-smoke"
    assert {"model.py", "interpreter.py", "model.onnx", "settings.json"} <= set(names)
    assert sum(n.endswith(".whl") for n in names) == 5, names  # the default zip: one wheel per Python 3.9-3.13
    # SMOKE leaves the user's model and zip alone.
    assert not os.path.exists(os.path.join(kit, "submission", "model.onnx"))
    assert not os.path.exists(os.path.join(kit, "dist", "submission.zip"))
    assert git_status() == before
