"""What `spsft-jax --help` tells a person: what the tool does, each command's purpose, and
every option with its meaning and default; one meaning per option name across commands."""
from __future__ import annotations

import argparse

import pytest

from spsft_jax import cli


def _commands() -> dict[str, argparse.ArgumentParser]:
    top = cli.parser()
    return next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_top_level_help_says_what_the_tool_does_and_the_version(capsys):
    with pytest.raises(SystemExit) as done:
        cli.parser().parse_args(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "Fine-tune" in text and "SPSFT" in text and "GGUF" in text
    with pytest.raises(SystemExit):
        cli.parser().parse_args(["--version"])
    assert capsys.readouterr().out.startswith("spsft-jax ")


@pytest.mark.parametrize("command", sorted(_commands()))
def test_every_option_has_help_and_shows_its_default(command, capsys):
    parser = _commands()[command]
    assert parser.description  # the command's --help opens with what it does
    for action in parser._actions:
        if action.dest != "help":
            assert action.help, f"{command} {action.option_strings or action.dest}: no help text"
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for action in parser._actions:
        shown = action.default not in (None, False, argparse.SUPPRESS) and action.option_strings
        if shown and "default" not in action.help:
            assert f"(default: {action.default})" in text, f"{command} {action.option_strings}"


def test_one_meaning_per_option_name():
    """--format is what export writes (the data's format is --data-format); every command that
    writes takes --out; plan's --rank means finetune's."""
    commands = _commands()
    options = {name: set(parser._option_string_actions) for name, parser in commands.items()}
    assert all("--format" not in options[c] and "--data-format" in options[c] for c in ("finetune", "select"))
    assert "--format" in options["export"]
    assert all("--out" in options[c] for c in ("finetune", "select", "export", "convert"))
    assert not [a for a in commands["convert"]._actions if not a.option_strings and a.dest != "gguf"]
    assert commands["plan"].get_default("rank") == commands["finetune"].get_default("rank")
