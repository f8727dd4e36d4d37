"""Packaging: device code ships as probact_gpu.kernels (never a top-level `kernels`), the version
has one home, importing the package does no work, and every public name resolves."""

import ast
import importlib.metadata
import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import probact_gpu

ROOT = pathlib.Path(__file__).resolve().parents[1]
_VERSION = re.compile(r"\d+\.\d+\.\d+([.-]?(a|b|rc|dev|post)\d*)*")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, check=True,
                          timeout=120, env=dict(os.environ), cwd=ROOT)


def test_kernels_are_a_subpackage_not_top_level():
    import probact_gpu.kernels.softmax as k

    assert k.__name__ == "probact_gpu.kernels.softmax"
    assert pathlib.Path(k.__file__).resolve().parent == ROOT / "kernels"


def _import_kernels_from_root(*python_flags: str, pythonpath: str | None = None) -> str:
    """What ``import kernels`` gives in a fresh interpreter started in the repository root, the
    way a user's ``python``, ``python -m pytest`` and the scripts start (the root first on
    sys.path): the module's file, or the error."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    code = ("import sys\n"
            "try:\n    import kernels\n"
            "except ImportError as e:\n    print(type(e).__name__, e)\n"
            "else:\n    print('FILE', kernels.__file__, getattr(kernels, 'MARK', None))\n")
    out = subprocess.run([sys.executable, *python_flags, "-c", code], capture_output=True,
                         text=True, timeout=120, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_package_kernels_folder_never_shadows_a_top_level_kernels(tmp_path):
    """transformers imports Hugging Face's package ``kernels``; from the repository root our
    device-code folder of the same name must never be what it gets (it did, with transformers
    5.25: ``cannot import name 'CUDAProperties' from 'kernels'``)."""
    # Another package named kernels on the path: the import reaches it, not this folder.
    other = tmp_path / "site" / "kernels"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("MARK = 'the other kernels'\n")
    got = _import_kernels_from_root(pythonpath=str(tmp_path / "site"))
    assert got == f"FILE {other / '__init__.py'} the other kernels", got
    # No other kernels at all (-S: no site-packages, where Hugging Face's may be installed): the
    # import fails as it would without this folder.
    got = _import_kernels_from_root("-S")
    assert got == "ModuleNotFoundError No module named 'kernels'", got
    # And with whatever this environment has installed: never a file of this repository.
    got = _import_kernels_from_root()
    assert not got.startswith(f"FILE {ROOT}"), got


def test_package_version_has_one_home():
    # pyproject.toml declares the version dynamic and reads probact_gpu.__version__ ...
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^dynamic\s*=\s*\[\s*"version"\s*\]', pyproject, re.M), "version not dynamic"
    assert not re.search(r'^version\s*=\s*"', pyproject, re.M), "a literal version in pyproject"
    assert re.search(r'version\s*=\s*\{\s*attr\s*=\s*"probact_gpu.__version__"\s*\}', pyproject)
    # ... which is a literal in __init__.py, so setuptools reads it without importing anything.
    tree = ast.parse((ROOT / "probact_gpu" / "__init__.py").read_text())
    literals = [n.value.value for n in tree.body if isinstance(n, ast.Assign)
                and [getattr(t, "id", None) for t in n.targets] == ["__version__"]
                and isinstance(n.value, ast.Constant)]
    assert literals == [probact_gpu.__version__]
    assert _VERSION.fullmatch(probact_gpu.__version__), probact_gpu.__version__
    # The installed metadata agrees (the package is installed editable by scripts/install.sh).
    assert importlib.metadata.version("probact-gpu") == probact_gpu.__version__


def test_package_version_option_of_the_command():
    out = _run("-m", "probact_gpu", "--version")
    assert out.stdout.strip() == f"probact-gpu {probact_gpu.__version__}"


def test_package_import_is_lazy():
    code = ("import sys, probact_gpu; probact_gpu.__version__; dir(probact_gpu); "
            "print(sorted(m for m in ('torch', 'triton', 'numpy') if m in sys.modules))")
    assert _run("-c", code).stdout.strip() == "[]"


def test_package_version_option_imports_no_torch():
    code = ("import sys; from probact_gpu.cli import main\n"
            "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, 'triton' in sys.modules)")
    assert _run("-c", code).stdout.strip().splitlines()[-1] == "False False"


def test_package_all_names_resolve():
    assert probact_gpu.__all__ == sorted(probact_gpu.__all__)
    assert set(probact_gpu.__all__) == set(probact_gpu._EXPORTS)
    for name in probact_gpu.__all__:
        value = getattr(probact_gpu, name)
        assert value is not None, name
        assert getattr(value, "__name__", name) == name, (name, value)
        assert name in dir(probact_gpu)


def test_package_type_checking_imports_cover_all():
    """Every exported name is imported under ``if TYPE_CHECKING:`` from the module the lazy
    table names, so IDEs and type checkers see the real objects."""
    tree = ast.parse((ROOT / "probact_gpu" / "__init__.py").read_text())
    seen = {}
    for node in ast.walk(tree):
        if (isinstance(node, ast.If) and isinstance(node.test, ast.Name)
                and node.test.id == "TYPE_CHECKING"):
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom) and imp.level == 1, ast.dump(imp)
                for alias in imp.names:
                    seen[alias.asname or alias.name] = imp.module
    expected = dict(probact_gpu._EXPORTS)
    # functional re-exports the ops' functions; the lazy table may name either home
    for name, module in seen.items():
        assert name in expected, f"{name} imported for type checkers but not exported"
        home = importlib.import_module(f"probact_gpu.{module}")
        assert getattr(home, name) is getattr(probact_gpu, name), name
    assert set(seen) == set(expected)


def test_package_ships_py_typed():
    assert (ROOT / "probact_gpu" / "py.typed").is_file()
    assert re.search(r'probact_gpu\s*=\s*\[\s*"py.typed"\s*\]',
                     (ROOT / "pyproject.toml").read_text())


def test_package_missing_name_raises_attribute_error():
    try:
        probact_gpu.no_such_name  # noqa: B018
    except AttributeError as e:
        assert "no_such_name" in str(e)
    else:
        raise AssertionError("no AttributeError")


def test_package_scripts_run_the_installed_interpreter():
    """test.sh and main.sh run the Python that install.sh printed, never `python3` or
    `probact-gpu` from the PATH (which, on an externally managed system, is not the one the
    package was installed into)."""
    for name in ("test.sh", "main.sh"):
        text = (ROOT / "scripts" / name).read_text()
        code = [line.split("#")[0] for line in text.splitlines()]
        assert 'PY=$(bash scripts/install.sh)' in text, name
        for line in code:
            words = line.replace('"', " ").split()
            assert "python3" not in words and "python" not in words, (name, line)
            assert "probact-gpu" not in words, (name, line)
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in ci
    assert "scripts/test_transformers_oldest.sh" in ci


def test_package_install_script_names_a_missing_interpreter():
    out = subprocess.run(["bash", str(ROOT / "scripts" / "install.sh")], capture_output=True,
                         text=True, timeout=60, env=dict(os.environ, PYTHON="/nonexistent/py"))
    assert out.returncode == 1
    assert out.stdout == ""
    assert "/nonexistent/py" in out.stderr
