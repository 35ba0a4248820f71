"""The command line: --version, a fast --help that imports no JAX, and every subcommand's help ending with an
example that the parser accepts."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest

from nextquill_jax import __version__, cli


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"nextquill-jax {__version__}"


def test_help_lists_every_subcommand_without_importing_jax():
    code = "import sys; from nextquill_jax import cli; cli.build_parser(); print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    text = cli.build_parser().format_help()
    assert "fine-tuning" in text and "dispatcher" not in text
    for name in cli.subcommands():
        assert name in text


@pytest.mark.parametrize("name", sorted(cli.subcommands()))
def test_every_subcommand_help_ends_with_an_example_the_parser_accepts(name):
    parser = cli.build_parser()
    command = cli.subcommands()[name]
    sub = next(a for a in parser._subparsers._group_actions if a.dest == "command").choices[name]
    assert sub.format_help().rstrip().endswith(command.example)
    words = shlex.split(command.example, comments=True)
    assert words[:2] == ["nextquill-jax", name]
    assert parser.parse_args(words[1:]).command == name
