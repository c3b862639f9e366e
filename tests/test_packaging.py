"""One import name: the installed distribution is `qkv_onnx` and nothing else, beside packages that own
the generic names (configobj's top-level `validate`); the format and the validator load no torch; neither
half of the flow reaches into the other."""

import ast
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
from setuptools import find_packages

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as the test extra's tomli
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_of_the_mapped_folders_is_listed():
    """`pip install .` (not editable) ships exactly what pyproject lists: every Python package under each
    mapped folder must be listed, under its qkv_onnx name."""
    setuptools = PYPROJECT["tool"]["setuptools"]
    found = {"qkv_onnx"}
    for name, folder in setuptools["package-dir"].items():
        found.add(name)
        found |= {f"{name}.{sub}" for sub in find_packages(ROOT / folder)}
    assert sorted(setuptools["packages"]) == sorted(found)


def test_console_scripts_point_into_qkv_onnx():
    scripts = PYPROJECT["project"]["scripts"]
    assert scripts == {
        "qkv-export": "qkv_onnx.export.cli:main",
        "qkv-validate": "qkv_onnx.validate.cli:main",
        "qkv-bench": "qkv_onnx.benchmarks.cli:main",
    }


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_configobj_validate_and_qkv_onnx_validate_side_by_side(tmp_path):
    """configobj installs a top-level module `validate`; ours is `qkv_onnx.validate`: both import, each its
    own (run outside the checkout, whose folder `validate/` would shadow configobj's as any folder would)."""
    pytest.importorskip("configobj", reason="configobj is in the test extra (pip install '.[test]')")
    code = (
        "import validate, qkv_onnx.validate.cli as v\n"
        "assert hasattr(validate, 'Validator'), validate.__file__\n"
        "assert 'site-packages' in validate.__file__, validate.__file__\n"
        "print(v.PROG)"
    )
    r = _run(code, tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "qkv-validate", r.stderr


@pytest.mark.slow
def test_wheel_holds_only_qkv_onnx_and_runs_from_a_fresh_venv(tmp_path):
    """A non-editable wheel: its RECORD's top-level names are exactly qkv_onnx and its dist-info; installed
    into a fresh venv (dependencies from this one), its three commands start and the validator imports."""
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    [wheel] = tmp_path.glob("qkv_onnx-*.whl")
    with zipfile.ZipFile(wheel) as z:
        record = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
        paths = [line.split(",")[0] for line in z.read(record).decode().splitlines() if line]
    tops = {p.split("/")[0] for p in paths}
    assert tops == {"qkv_onnx", record.split("/")[0]}, tops
    assert "qkv_onnx/validate/runtimes/ort.py" in paths and "qkv_onnx/artifact_format.py" in paths
    data = {"qkv_onnx/graph_table.json", "qkv_onnx/corpus/search.txt", "qkv_onnx/corpus/holdout.txt"}
    assert data <= set(paths), data - set(paths)

    env = tmp_path / "venv"
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    with zipfile.ZipFile(wheel) as z:  # a wheel is a zip laid out as site-packages (scripts aside)
        z.extractall(site)
    # the dependencies: this environment's site-packages as a plain path (its .pth files, the checkout's
    # editable install among them, are not processed from there), after the venv's own
    deps = next(p for p in sys.path if p.endswith("site-packages"))
    (Path(site) / "deps.pth").write_text(deps + "\n")
    code = (
        "import sys\n"
        "import qkv_onnx.validate.cli, qkv_onnx.export.cli, qkv_onnx.benchmarks.cli\n"
        "import qkv_onnx.validate.runtimes.ort, qkv_onnx.model_defs.checkpoint\n"
        "assert qkv_onnx.validate.cli.__file__.startswith(sys.argv[1]), qkv_onnx.validate.cli.__file__\n"
        "print('ok')"
    )
    r = subprocess.run([python, "-c", code, site], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@pytest.mark.parametrize("module", ["qkv_onnx.artifact_format", "qkv_onnx.validate", "qkv_onnx.validate.cli"])
def test_the_format_and_the_validator_load_no_torch(module):
    """Never-rule: a deployment machine validates without torch, so neither the artifact format nor the
    validator may import it (the live PyTorch comparison imports it lazily, when asked)."""
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    r = _run(code, ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout[:300], r.stderr)


def _qkv_imports(path: Path) -> set[str]:
    """The qkv_onnx modules a source file imports (relative imports resolved)."""
    package = "qkv_onnx." + ".".join(path.relative_to(ROOT).parent.parts)
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module and node.module.startswith("qkv_onnx"):
                names.add(node.module)
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith("qkv_onnx")}
    return names


@pytest.mark.parametrize(
    "half, other", [("export", "validate"), ("validate", "export"), ("model_defs", "export")]
)
def test_one_half_of_the_flow_never_imports_the_other(half, other):
    """export/ and validate/ share the artifact format through qkv_onnx.artifact_format, not each other;
    model_defs/ knows nothing of ONNX. One exception, by design: validate's rebuild calls the exporter's one
    graph-writing function (qkv_onnx.export.graph), so that a rebuild is the export's own code."""
    allowed = {"validate/rebuild.py": {"qkv_onnx.export.graph"}}
    offenders = {
        str(p.relative_to(ROOT)): sorted(
            n
            for n in _qkv_imports(p)
            if n.startswith(f"qkv_onnx.{other}") and n not in allowed.get(str(p.relative_to(ROOT)), ())
        )
        for p in (ROOT / half).rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}
