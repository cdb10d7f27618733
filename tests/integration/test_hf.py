"""Hugging Face interop: `prefix export` gives a folder transformers' LlamaForCausalLM loads with the same
logits, `model.init_from` starts a run from such a folder (and from a Llama made by transformers, under
torchrun, resuming exactly after SIGTERM), bad folders exit 2 with one line, `prefix sample DIR` works."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch
from helpers import Launch, assert_clean_exit_2, assert_same_weights, checkpoint, losses, run, train_cmd

from prefix import config, hf, pretrained
from prefix.config import ModelConfig
from prefix.data.tokenizers import BYTES
from prefix.model import GPT
from prefix.runs import read_jsonl

TOL = 1e-4
"""Max abs logit difference allowed between prefix and transformers (float32, CPU); measured ~3e-7."""
TOKENS = torch.randint(0, 257, (2, 64), generator=torch.Generator().manual_seed(5))
LLAMA = ("model.n_layer=2", "model.n_head=4", "model.d_model=64", "model.mlp_hidden=100", "model.norm_eps=1e-6",
         "model.tie_embeddings=false")
"""The model.* keys matching `llama_config()` (tiny.yaml already has vocab_size 257, rope_theta 10000)."""


def transformers():
    import transformers as tf

    return tf


def llama_config(**changes):
    settings = dict(vocab_size=257, hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=64, tie_word_embeddings=False)
    return transformers().LlamaConfig(**{**settings, **changes})


def random_llama(seed: int = 0, **changes):
    """A random LlamaForCausalLM made by transformers itself; norm gains randomised so they matter."""
    tf = transformers()
    torch.manual_seed(seed)
    model = tf.LlamaForCausalLM(llama_config(**changes))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def hf_logits(folder: Path, idx: torch.Tensor = TOKENS) -> torch.Tensor:
    model = transformers().LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(idx).logits


def prefix_logits(state: dict, cfg: dict, idx: torch.Tensor = TOKENS) -> torch.Tensor:
    model = GPT(config.from_dict(cfg).model)
    model.load_state_dict(state)
    with torch.no_grad():
        return model.eval()(idx)[0]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def export_cmd(run_name: str, root: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "prefix.cli", "export", run_name, "--runs-root", str(root), "--out", str(out),
            *extra]


# -- the conversion itself, in process ------------------------------------------------------------------

@pytest.mark.parametrize("tie", [True, False])
def test_prefix_weights_give_transformers_the_same_logits(tie, tmp_path):
    from safetensors.torch import save_file

    m = ModelConfig(vocab_size=257, seq_len=64, n_layer=2, n_head=2, d_model=64, mlp_hidden=96,
                    tie_embeddings=tie, rope_theta=500.0)
    torch.manual_seed(0)
    model = GPT(m).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
    assert (model.head.weight is model.tok_emb.weight) is tie, "model.tie_embeddings"
    tensors = hf.to_hf(model.state_dict(), m)
    assert ("lm_head.weight" in tensors) is not tie
    save_file(tensors, str(tmp_path / hf.WEIGHTS), metadata={"format": "pt"})
    (tmp_path / hf.CONFIG).write_text(json.dumps(hf.hf_config(m, eos_id=256)))
    with torch.no_grad():
        assert max_diff(model(TOKENS)[0], hf_logits(tmp_path)) < TOL
        back = pretrained.load_model(tmp_path)
        assert torch.equal(back(TOKENS)[0], model(TOKENS)[0])


def test_a_sharded_transformers_llama_loads_with_the_same_logits(tmp_path):
    llama = random_llama(tie_word_embeddings=True)
    llama.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / hf.INDEX).is_file() and len(list(tmp_path.glob("*.safetensors"))) > 1
    model = pretrained.load_model(tmp_path)
    assert model.cfg.tie_embeddings and model.cfg.mlp_hidden == 100 and model.cfg.norm_eps == 1e-6
    with torch.no_grad():
        assert max_diff(model(TOKENS)[0], llama(TOKENS).logits) < TOL


# -- prefix export and model.init_from, with real processes ----------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A runs root with `tiny`: configs/tiny.yaml trained for 6 steps, checkpoints at 3 and 6."""
    root = tmp_path_factory.mktemp("runs")
    result = run(train_cmd(0, "tiny", root, "trainer.max_steps=6", "checkpoint.every_steps=3",
                           "trainer.eval_every=0"))
    assert result.returncode == 0, result.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def exported(trained) -> Path:
    out = trained.parent / f"{trained.name}-export"
    result = run(export_cmd("tiny", trained, out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "exported step 6 (latest.pt" in result.stdout
    return out


def test_export_loads_in_transformers_with_the_same_logits(trained, exported):
    assert sorted(p.name for p in exported.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer", "tokenizer.json", "tokenizer_config.json"]
    hf_cfg = json.loads((exported / "config.json").read_text())
    assert hf_cfg["architectures"] == ["LlamaForCausalLM"] and hf_cfg["tie_word_embeddings"] is True
    assert (hf_cfg["intermediate_size"], hf_cfg["rms_norm_eps"], hf_cfg["eos_token_id"]) == (192, 1e-5, 256)
    saved = checkpoint(trained / "tiny")
    assert max_diff(prefix_logits(saved.model, saved.config), hf_logits(exported)) < TOL

    text = "def f(x):\n    return 'héllo' ∑ 日本\n"
    tokenizer = transformers().AutoTokenizer.from_pretrained(exported)
    assert tokenizer(text)["input_ids"] == BYTES.encode(text).tolist()
    assert tokenizer.decode(BYTES.encode(text).tolist()) == text and tokenizer.eos_token_id == 256


def test_export_refuses_a_non_empty_out_unless_forced(trained, exported, tmp_path):
    before = (exported / "model.safetensors").read_bytes()
    assert_clean_exit_2(run(export_cmd("tiny", trained, exported)), "not empty; pass --force")
    assert (exported / "model.safetensors").read_bytes() == before
    out = tmp_path / "prev"
    result = run(export_cmd("tiny", trained, out, "--checkpoint", "prev"))
    assert result.returncode == 0 and "exported step 3 (prev.pt" in result.stdout, result.stderr
    result = run(export_cmd("tiny", trained, out, "--checkpoint", "latest", "--force"))
    assert result.returncode == 0 and "exported step 6" in result.stdout, result.stderr
    assert (out / "model.safetensors").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary folder left behind"
    assert_clean_exit_2(run(export_cmd("nope", trained, tmp_path / "x")), "no such run")


def test_export_imports_back_with_the_same_logits(trained, exported, tmp_path):
    saved = checkpoint(trained / "tiny")
    expected = prefix_logits(saved.model, saved.config)
    with torch.no_grad():
        assert torch.equal(pretrained.load_model(exported)(TOKENS)[0], expected), "the loader is exact"

    # A real start from the folder. One step at lr 1e-12 moves no float32 weight visibly, so the
    # checkpoint it leaves holds the weights training started from.
    result = run(train_cmd(0, "imported", tmp_path, f"model.init_from={exported}", "trainer.max_steps=1",
                           "trainer.lr=1e-12", "trainer.min_lr=0", "trainer.eval_every=0"))
    assert result.returncode == 0, result.stderr[-3000:]
    started = checkpoint(tmp_path / "imported")
    assert started.config["model"]["init_from"] == str(exported)
    assert max_diff(prefix_logits(started.model, started.config), hf_logits(exported)) < TOL
    events = [e["event"] for e in read_jsonl(tmp_path / "imported" / "logs" / "rank0.jsonl")]
    assert "initialised from a Hugging Face folder" in events


def test_sample_from_an_exported_folder(trained, exported):
    result = run([sys.executable, "-m", "prefix.cli", "sample", str(exported), "--prompt", "def ",
                  "--tokens", "20"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("def ") and len(result.stdout) > len("def \n")
    same = run([sys.executable, "-m", "prefix.cli", "sample", "tiny", "--runs-root", str(trained),
                "--prompt", "def ", "--tokens", "20"])
    assert same.stdout == result.stdout, "the same weights and tokenizer as the run's latest checkpoint"


# -- a Llama made by transformers, trained under torchrun ------------------------------------------------

@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("llama")
    random_llama().save_pretrained(folder)
    return folder


def test_llama_trains_under_torchrun_and_resumes_exactly_after_sigterm(llama_dir, tmp_path):
    steps = 30
    settings = (*LLAMA, f"model.init_from={llama_dir}", f"trainer.max_steps={steps}", "checkpoint.every_steps=5",
                "trainer.eval_every=0")
    base = Launch(train_cmd(2, "base", tmp_path, *settings), tmp_path / "log-base")
    assert base.wait() == 0, (tmp_path / "log-base").read_text()[-3000:]  # one at a time: streaming's shared memory
    first = Launch(train_cmd(2, "r", tmp_path, *settings), tmp_path / "log1")
    first.wait_for_step(tmp_path / "r", random.randint(4, 10))
    first.sigterm()
    first.wait()
    stopped_at = max(losses(tmp_path / "r"))
    assert stopped_at < steps, "the signal must land before the end for this test to mean anything"
    second = Launch(train_cmd(2, "r", tmp_path, *settings), tmp_path / "log2")
    assert second.wait() == 0, (tmp_path / "log2").read_text()[-3000:]

    assert losses(tmp_path / "r") == losses(tmp_path / "base")
    assert_same_weights(checkpoint(tmp_path / "r").model, checkpoint(tmp_path / "base").model)
    log = read_jsonl(tmp_path / "r" / "logs" / "rank0.jsonl")
    assert [e["event"] for e in log if "Hugging Face" in e["event"] or "init_from" in e["event"]] == [
        "initialised from a Hugging Face folder", "model.init_from ignored: resuming from the checkpoint"]
    # Training started from the Llama: its untrained loss is near ln(257) and the run's first one is it.
    first_loss = losses(tmp_path / "base")[1]
    assert abs(first_loss - torch.log(torch.tensor(257.0)).item()) < 0.5


# -- bad folders ---------------------------------------------------------------------------------------

def bad_folder(kind: str, tmp_path: Path, llama_dir: Path) -> tuple[str, tuple[str, ...]]:
    folder = tmp_path / "model"
    if kind == "missing":
        return str(folder), LLAMA
    folder.mkdir()
    if kind == "gpt2":
        (folder / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                                                        "n_embd": 64, "n_layer": 2, "vocab_size": 257}))
    elif kind == "small-vocab":
        random_llama(vocab_size=100).save_pretrained(folder)
        return str(folder), (*LLAMA, "model.vocab_size=100")
    elif kind == "other-shape":
        return str(llama_dir), ()
    return str(folder), LLAMA


@pytest.mark.parametrize("kind,fragment", [
    ("missing", "no such folder"),
    ("no-config", "has no config.json"),
    ("gpt2", "model_type 'gpt2' is not a Llama"),
    ("small-vocab", "has 100 token ids, too few for data (its tokenizer needs 257)"),
    ("other-shape", "set model.n_head=4 model.mlp_hidden=100 model.norm_eps=1e-06 model.tie_embeddings=false"),
])
def test_a_bad_init_from_folder_exits_2_with_one_line(kind, fragment, tmp_path, llama_dir):
    folder, shape = bad_folder(kind, tmp_path, llama_dir)
    result = run(train_cmd(0, "bad", tmp_path, *shape, f"model.init_from={folder}"))
    assert_clean_exit_2(result, fragment)
    assert not (tmp_path / "bad").exists(), "a refused start writes nothing"
