"""Every command's --help: a description, help text on every flag, and examples that parse (the
cheap ones run)."""

import json
import os
import shlex

import pytest

from himap.cli import COMMANDS, _module, build_parser, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def examples(command: str) -> list[list[str]]:
    """The `himap COMMAND ...` lines of the command's docstring (continuations joined, comments
    and the leading `himap` dropped), except those that elide arguments with '...'."""
    lines, current = [], ""
    for raw in (_module(command).__doc__ or "").splitlines():
        line = raw.strip()
        if current:
            current += " " + line
        elif line.startswith("himap "):
            current = line
        else:
            continue
        if current.endswith("\\"):
            current = current[:-1].rstrip()
            continue
        lines.append(current)
        current = ""
    out = []
    for line in lines:
        tokens = shlex.split(line, comments=True)
        if "..." not in tokens and tokens[:2] == ["himap", command]:
            out.append(tokens[1:])
    return out


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_describes_every_flag_and_shows_examples(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert COMMANDS[command] in " ".join(text.split())
    assert f"himap {command}" in text.split("options:")[0]  # the examples come before the flags
    parser = build_parser(command)
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    parsers = [sub] + [p for a in sub._actions if a.dest == "analysis" for p in a.choices.values()]
    for p in parsers:
        for action in p._actions:
            if action.dest != "help" and action.dest != "analysis":
                assert action.help, f"himap {command}: {action.option_strings or action.dest} has no help"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_examples_parse(command):
    found = examples(command)
    assert found, f"himap {command} --help shows no complete example"
    for argv in found:
        build_parser(command).parse_args(argv)  # SystemExit (code 2) when an example is wrong


def test_cheap_examples_run(capsys, monkeypatch):
    """The examples that need no model weights and no data: flops on presets, a sweep's plan."""
    monkeypatch.chdir(ROOT)  # examples name configs/ relative to the repository
    ran = 0
    for command in ("flops", "sweep"):
        for argv in examples(command):
            if command == "sweep" and "--dry-run" not in argv:
                continue
            assert main(argv) == 0, argv
            last = capsys.readouterr().out.strip().splitlines()[-1]
            assert last
            if command == "sweep" or "--json" in argv:
                json.loads(last)
            ran += 1
    assert ran >= 3


def test_version_and_top_level_help(capsys):
    from himap import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"himap {__version__}"
    assert main([]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name in COMMANDS) and "HIMAP_DEBUG" in text
