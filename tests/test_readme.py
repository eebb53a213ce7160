"""The README's notebook example runs as written."""

import re
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def test_notebook_example_runs(tmp_path, monkeypatch):
    example = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    assert len(example.strip().splitlines()) <= 15
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(example, "README example", "exec"), namespace)
    trainer = namespace["trainer"]
    assert 0.0 <= trainer.xsam.alpha <= 2.0
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0]
