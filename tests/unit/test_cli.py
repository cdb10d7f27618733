"""The front door, as a new user meets it: `prefix --help`, `--version`, `train --help`, `--print-config`,
overrides after flags, `prefix runs` on a root without its index. In-process, through `prefix.cli.main`."""

from __future__ import annotations

import json
from importlib import metadata

import pytest
import yaml
from helpers import TINY

import prefix
from prefix import cli, config, train
from prefix.runs.registry import DB_NAME


def exit_of(argv: list[str]) -> int:
    """cli.main's exit code, whether it returns it or argparse raises SystemExit (--help, --version)."""
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code


def test_help_goes_to_stdout_and_names_every_command(capsys):
    assert exit_of(["--help"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and all(name in out for name in cli.COMMANDS)


def test_version_is_the_installed_distributions(capsys):
    assert exit_of(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"prefix {metadata.version(prefix.DISTRIBUTION)}"


def test_no_command_is_a_one_line_usage_error(capsys):
    assert exit_of([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "prefix --help" in err


def test_train_help_lists_every_config_section(capsys):
    assert exit_of(["train", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert all(section in out for section in config.SECTIONS), out


def printed_config(capsys, argv: list[str]) -> dict:
    assert exit_of(argv) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_print_config_is_the_resolved_config_with_every_key_documented(capsys, tmp_path):
    out_argv = ["train", "--config", str(TINY), "--print-config", "trainer.max_steps=7"]
    assert exit_of(out_argv) == 0
    text = capsys.readouterr().out
    path = tmp_path / "printed.yaml"
    path.write_text(text)
    assert config.load(path) == config.load(TINY, ["trainer.max_steps=7"]), "loads back as the same config"
    printed = yaml.safe_load(text)
    for section, values in config.load(TINY).to_dict().items():
        keys = {config.KEYWORD_KEYS.get(k, k) for k in printed[section]}
        assert keys == set(values), section
    assert "max_steps: 7" in text and "# Sequences per optimizer step, across all ranks" in text


@pytest.mark.parametrize("entry", ["prefix train", "python -m prefix.train"])
def test_overrides_may_follow_the_flags(capsys, entry):
    argv = [str(TINY), "trainer.max_steps=3", "--print-config", "trainer.log_every=3", "--run-name", "x",
            "model.seq_len=32"]
    if entry == "prefix train":
        assert cli.main(["train", "--config", *argv]) == 0
    else:
        assert train.main(["--config", *argv]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["trainer"]["max_steps"], printed["trainer"]["log_every"], printed["model"]["seq_len"]) == (3, 3, 32)


def test_a_stray_argument_after_the_flags_is_still_refused(capsys):
    assert exit_of(["train", "--config", str(TINY), "--print-config", "stray"]) == 2
    assert capsys.readouterr().err.startswith("error: stray: overrides look like section.key=value")
    assert exit_of(["train", "--config", str(TINY), "trainer.lr=1", "--bogus", "x"]) == 2
    assert "error: unrecognized arguments: --bogus x" in capsys.readouterr().err


def test_a_bad_override_is_one_line_and_exit_2(capsys):
    assert exit_of(["train", "--config", str(TINY), "--print-config", "trainer.max_stepz=3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean 'max_steps'" in err


def write_run(root, name: str, **state) -> None:
    meta = root / name / "meta"
    meta.mkdir(parents=True)
    (meta / "run.json").write_text(json.dumps({"run": name, "experiment": "e", "status": "completed",
                                               "created": 1.0, "updated": 2.0, "step": 5, "target_step": 5,
                                               "restarts": 0, "exit_code": 0, **state}))


def test_runs_on_a_root_without_its_index_builds_it(capsys, tmp_path):
    write_run(tmp_path, "a")
    write_run(tmp_path, "b", created=3.0)
    assert cli.main(["runs", "--runs-root", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert [line.split()[0] for line in out.splitlines()] == ["RUN", "b", "a"]
    assert "indexed 2 runs" in err and (tmp_path / DB_NAME).is_file()


def test_runs_says_how_to_start_when_there_are_none(capsys, tmp_path):
    assert cli.main(["runs", "--runs-root", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert out == "" and "no runs under" in err and "prefix train" in err
    assert exit_of(["runs", "--runs-root", str(tmp_path / "missing")]) == 2
    assert "no such runs root" in capsys.readouterr().err
