"""The README's two commands are the project's contract; CI must run the same test command."""

from __future__ import annotations

import re


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, re.S)]


def test_ci_runs_exactly_the_readme_test_command(repo):
    readme = (repo / "README.md").read_text()
    test_cmd = next(b for b in _bash_blocks(readme) if "pytest" in b)
    assert test_cmd in (repo / ".ci/run").read_text().splitlines()


def test_readme_main_command_installs_and_trains_the_sample_config(repo):
    readme = (repo / "README.md").read_text()
    main_cmd = _bash_blocks(readme)[0]
    assert "pip install" in main_cmd and "glotok train configs/tokenizer/sample.yaml" in main_cmd
    assert (repo / "configs/tokenizer/sample.yaml").is_file()
