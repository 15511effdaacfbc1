"""The docs stay honest: the flag and family tables are the code's, every relative link resolves (files and
GitHub #anchors), the README's commands are the ones the tests and the demo run, and the package exports
what the docs show."""

import re
import shlex
from pathlib import Path

import yaml

import swift_gradpruner
from swift_gradpruner.swift.args import flag_help

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def _prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def _code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.M | re.S)


def github_anchors(text: str) -> set[str]:
    """The #anchors GitHub gives a page's headings: lower case, punctuation other than - and _ dropped,
    spaces to -, and -1, -2, ... on repeats."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} +(.+?) *#* *$", FENCE.sub("", text), re.M):
        heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link shows its text
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def test_github_anchors_follow_githubs_rules():
    text = "# Accuracy (SmolLM2-135M): measured, not assumed\n```\n# not a heading\n```\n"
    text += "## Plain question/answer rows\n## `gradprune eval`\n## Plain question/answer rows\n"
    assert github_anchors(text) == {
        "accuracy-smollm2-135m-measured-not-assumed",
        "plain-questionanswer-rows",
        "gradprune-eval",
        "plain-questionanswer-rows-1",
    }


def test_options_page_lists_every_flag_with_its_default_and_help():
    options = (DOCS / "options.md").read_text()
    rows = [f"| `{flag}` | `{default}` | {text} |" for flag, default, text in flag_help()]
    for row in rows:
        assert row in options, row.split(" |")[0]
    shown = [line for line in options.splitlines() if line.startswith("| `--gradprune")]
    assert shown == rows, "docs/options.md has a flag row the code does not have, or another order"


def test_models_page_table_of_model_families_is_the_codes():
    from swift_gradpruner.families import FAMILIES, markdown_table

    models = (DOCS / "models.md").read_text()
    assert markdown_table() in models
    assert all(f"| `{family.model_type}` |" in models for family in FAMILIES)


def test_every_relative_link_resolves_to_a_file_and_anchor():
    checked = 0
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", _prose(page.read_text())):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            assert file.exists(), f"{page.relative_to(ROOT)}: link to missing {target}"
            if anchor:
                assert file.suffix == ".md", f"{page.relative_to(ROOT)}: anchor into a non-page {target}"
                assert anchor in github_anchors(file.read_text()), f"{page.relative_to(ROOT)}: no heading {target}"
            checked += 1
    assert checked >= 20  # the README links every docs page; the pages link each other


def test_repository_paths_named_in_the_docs_exist():
    pattern = r"\b((?:examples/yaml|scripts|tests|benchmarks|swift_gradpruner|docs)/[\w/.-]*\w\.(?:py|sh|yaml|md|png))"
    for page in PAGES:
        for path in re.findall(pattern, page.read_text()):
            assert (ROOT / path).exists(), f"{page.relative_to(ROOT)} names {path}, which does not exist"


def test_readme_is_short_and_starts_with_the_two_setup_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    first_block = _code_blocks(text, "bash")[0].splitlines()
    # CI (.ci/run) runs `bash scripts/test.sh`; tests/test_demo.py runs what `bash scripts/demo.sh` runs.
    assert [line.split("#")[0].strip() for line in first_block] == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    assert "arxiv.org/abs/2601.19503" in text


def _commands(block: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.split(" #")[0].strip() for line in joined.splitlines() if line.strip()]


def test_readme_commands_are_the_ones_the_tests_and_the_demo_run():
    """Every command in a README bash block is run by CI, the demo test, or is the typed-out form of the
    YAML that tests/test_demo.py runs (key for key, value for value)."""
    commands = [c for block in _code_blocks(README.read_text(), "bash") for c in _commands(block)]
    twin = ROOT / "examples" / "yaml" / "tiny_cpu.yaml"
    assert "examples/yaml/tiny_cpu.yaml" in (ROOT / "tests" / "test_demo.py").read_text()
    runnable = {"bash scripts/demo.sh", "bash scripts/test.sh", "swift sft examples/yaml/tiny_cpu.yaml"}
    typed_out = [c for c in commands if c not in runnable]
    assert len(typed_out) == 1 and set(commands) >= runnable, commands
    words = shlex.split(typed_out[0])
    assert words[:2] == ["swift", "sft"] and len(words[2:]) % 2 == 0, words
    flags = dict(zip(words[2::2], words[3::2]))
    assert all(flag.startswith("--") for flag in flags)

    def text(value) -> str:
        return str(value).lower() if isinstance(value, bool) else str(value)

    expected = {f"--{key}": text(value) for key, value in yaml.safe_load(twin.read_text()).items()}
    assert flags == expected


def test_public_names_are_the_modules_documented_objects():
    import importlib

    for name, module in swift_gradpruner._EXPORTS.items():
        value = getattr(swift_gradpruner, name)
        assert value is getattr(importlib.import_module(f"swift_gradpruner.{module}"), name), name
        assert (value.__doc__ or "").strip(), f"{name} has no docstring"
    assert set(swift_gradpruner.__all__) == {"__version__", *swift_gradpruner._EXPORTS}
