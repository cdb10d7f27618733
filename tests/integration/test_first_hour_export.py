"""What a new user meets in the first hour with an export, each as docs/interop.md shows it:

- `model.generate(**tok("def ", return_tensors="pt"))` on the exported folder: the tokenizer returns only
  what LlamaForCausalLM takes (no token_type_ids);
- `from transformers import AutoModelForCausalLM` and loading the folder work in a fresh interpreter of
  the project's own environment, with no workaround (no broken torchvision installed beside the CPU torch);
- `pip install` by a distribution name of the project's own (`prefix` on PyPI is another project), which
  the installed package reports its version under; the import name and the command stay `prefix`.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from pathlib import Path

import pytest
from helpers import REPO, run, train_cmd

import prefix
from prefix.data.tokenizers import BYTES
from prefix.runs import RunDir
from prefix.runs.environment import snapshot
from prefix.tools.export import export


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def project() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """configs/tiny.yaml (byte tokenizer) trained for 4 steps, exported as `prefix export` does."""
    root = tmp_path_factory.mktemp("runs")
    result = run(train_cmd(0, "tiny", root, "trainer.max_steps=4", "trainer.eval_every=0"))
    assert result.returncode == 0, result.stderr[-3000:]
    out = root.parent / f"{root.name}-export"
    assert "exported step 4" in export(RunDir(root / "tiny"), out)
    return out


def test_generate_takes_what_the_exported_tokenizer_returns(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(exported)
    model = AutoModelForCausalLM.from_pretrained(exported).eval()
    out = model.generate(**tok("def ", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    prompt = BYTES.encode("def ").tolist()
    assert out.shape[0] == 1 and len(prompt) < out.shape[1] <= len(prompt) + 5  # greedy may end at eos
    assert out[0, :len(prompt)].tolist() == prompt
    assert sorted(tok("def ")) == ["attention_mask", "input_ids"], "what LlamaForCausalLM.forward takes"


def test_a_fresh_interpreter_of_the_environment_loads_the_export(exported):
    code = ("import sys; from transformers import AutoModelForCausalLM; "
            "print(type(AutoModelForCausalLM.from_pretrained(sys.argv[1])).__name__)")
    result = run([sys.executable, "-c", code, str(exported)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["LlamaForCausalLM"]


def test_the_distribution_has_a_name_of_its_own_and_is_installed_under_it():
    meta = project()
    name = meta["name"]
    assert normalized(name) != "prefix", "`prefix` on PyPI is an unrelated project"
    dist = importlib.metadata.distribution(name)  # PackageNotFoundError: installed under another name
    assert dist.version == meta["version"] == prefix.__version__, "prefix reads its version under that name"
    assert snapshot(1)["packages"][name] == meta["version"], "a run's meta/environment records it"
    scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert scripts == {"prefix": "prefix.cli:main"}, "the command stays `prefix`"
    assert meta["scripts"] == scripts


def test_the_docs_install_the_distribution_by_that_name():
    name = project()["name"]
    lines = [line for path in [REPO / "README.md", REPO / "Dockerfile", *sorted((REPO / "docs").glob("*.md"))]
             for line in path.read_text().splitlines() if "pip install" in line]
    assert not [line for line in lines if re.search(r"""pip install\s+['"]?prefix(\[|['"\s]|$)""", line)]
    assert [line for line in lines if f"pip install '{name}[" in line or f"pip install {name}" in line]
