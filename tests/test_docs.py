"""The README documents every flag with its current default; the package exports what it shows."""

from pathlib import Path

import swift_gradpruner
from swift_gradpruner.swift.args import flag_help

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_readme_lists_every_flag_with_its_default_and_help():
    for flag, default, text in flag_help():
        assert f"| `{flag}` | `{default}` | {text} |" in README, flag


def test_readme_table_of_model_families_is_the_codes():
    from swift_gradpruner.families import FAMILIES, markdown_table

    assert markdown_table() in README
    assert all(f"| `{family.model_type}` |" in README for family in FAMILIES)


def test_public_names_are_the_modules_documented_objects():
    import importlib

    for name, module in swift_gradpruner._EXPORTS.items():
        value = getattr(swift_gradpruner, name)
        assert value is getattr(importlib.import_module(f"swift_gradpruner.{module}"), name), name
        assert (value.__doc__ or "").strip(), f"{name} has no docstring"
    assert set(swift_gradpruner.__all__) == {"__version__", *swift_gradpruner._EXPORTS}
