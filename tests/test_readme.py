"""The README is a short guide whose example runs as written, prints what it says, and whose links lead somewhere."""

import contextlib
import io
import re
from dataclasses import fields
from pathlib import Path

import pytest

from hf_xsam import XSAMConfig

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"


def test_notebook_example_runs_and_prints_what_the_readme_says(tmp_path, monkeypatch):
    text = README.read_text()
    example = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    assert len(example.strip().splitlines()) <= 16
    printed = re.search(r"The last line prints `(.*?)` on every run", text)[1]
    monkeypatch.chdir(tmp_path)
    namespace = {}
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(compile(example, "README example", "exec"), namespace)
    assert output.getvalue().splitlines()[-1] == printed
    trainer = namespace["trainer"]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0]


def test_readme_is_a_short_guide():
    assert len(README.read_text()) <= 15_000


def test_settings_table_lists_every_field_of_the_config():
    text = README.read_text().split("## Settings", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    listed = {name for row in rows for name in re.findall(r"`(\w+)`", row.split(" | ")[0])}
    assert listed == {f.name for f in fields(XSAMConfig)}


def markdown_links():
    for page in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not re.match(r"[a-z]+:", target):  # not http(s): or mailto:
                yield pytest.param(page, target, id=f"{page.relative_to(ROOT)}->{target}")


@pytest.mark.parametrize("page, target", list(markdown_links()))
def test_relative_links_lead_to_files_in_the_repository(page, target):
    assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to {target}, which does not exist"
