"""``examples/python/*.py`` run as scripts, and the README's "From Python"
code runs as written, locally and on the mesh."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

PYTHON = sys.executable

EXPECT = {
    "lens": "layer 29:     ' Paris'",
    "patch": "clean +5.1",
    "steer": "steered: 'Yesterday I went for a walk and saw a lot of the ocean.",
    "ablate": "plain: ' Paris'",
    "attention": "rows sum to 1",
}


def run(args, cwd=ROOT, timeout=300):
    p = subprocess.run([PYTHON, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{args} failed:\n{p.stdout}\n{p.stderr}"
    return p.stdout


@pytest.mark.parametrize("name", list(EXPECT))
def test_example_on_the_mesh(name, mesh_addr):
    out = run([os.path.join("examples", "python", f"{name}.py"), "--mesh", mesh_addr])
    assert EXPECT[name] in out, out


def test_example_locally():
    # The other scripts' local path is the same code; their functions run
    # locally in test_equivalence.
    out = run([os.path.join("examples", "python", "lens.py")])
    assert EXPECT["lens"] in out, out


def readme_code() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text.split("## From Python", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1
    return blocks[0]


@pytest.mark.parametrize("where", ["local", "mesh"])
def test_readme_from_python_runs_as_written(where, tmp_path, request):
    code = readme_code()
    local_line = 'model = LanguageModel("models/SmolLM2-135M-Instruct.Q4_1.gguf")'
    assert local_line in code
    if where == "mesh":
        addr = request.getfixturevalue("mesh_addr")
        code = code.replace(local_line, f"model = LanguageModel(mesh={addr!r})")
    # Run from a folder that looks like the checkout (models/), so the files
    # the code writes land there.
    os.symlink(os.path.join(ROOT, "models"), tmp_path / "models")
    script = tmp_path / "readme.py"
    script.write_text(code)
    out = run([str(script)], cwd=tmp_path)
    lines = out.splitlines()
    assert lines[0] == "torch.Size([1, 9, 576])" and lines[1] == " Paris", out
    assert "' Paris'" in lines[2] and " Rome" in out
    assert (tmp_path / "last.json").exists()
