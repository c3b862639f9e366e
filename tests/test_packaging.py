"""The installed package is the tree: every Python package under the project's top-level packages is listed
in pyproject.toml, so `pip install .` (not editable) ships it."""
from pathlib import Path

import tomllib
from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_in_pyproject():
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    tops = [p for p in listed if "." not in p]
    assert sorted(listed) == sorted(find_packages(ROOT, include=[f"{t}*" for t in tops]))
