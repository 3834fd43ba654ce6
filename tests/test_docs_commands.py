"""Every command printed in README.md and RESULTS.md parses with today's flags.

The commands name checkpoints and data that are not in the repository, so they are not run here
(tests/test_run_commands.py runs the stored training commands for two steps, and each script's
own tests run it end to end on tiny models). What can drift silently is the command line itself:
a renamed or removed flag, a value a flag no longer accepts. So each command goes through its
script's own argparse parser, and stops right after parsing, before any file is opened.
"""
import argparse
import importlib
import re
import shlex

import pytest

from conftest import ROOT

SKIP = ("python -m pip", "python tests/test_notebook.py")


def printed_commands():
    """`python ...` commands of README and RESULTS: code lines (indented or fenced, continuation
    lines joined) and inline `python ...` spans."""
    found = []
    for name in ("README.md", "RESULTS.md"):
        fenced = False
        for line in (ROOT / name).read_text().replace("\\\n", " ").splitlines():
            fenced ^= line.startswith("```")
            if fenced or line.startswith("    "):
                commands = [line.strip()]
            else:
                commands = re.findall(r"`(python [^`]+)`", line)
            found += [(name, re.sub(r"\s+#.*$", "", c)) for c in commands
                      if c.startswith("python ") and not c.startswith(SKIP)]
    return found


class Parsed(Exception):
    """Raised by the patched parse_args: the command line parsed, nothing else ran."""


def test_the_documents_print_commands_of_every_script():
    scripts = {shlex.split(command)[1 if "-m" not in command.split()[:2] else 2] for _, command in
               printed_commands()}
    assert {"train.py", "oracle.py", "visualize.py", "experiments.bench", "experiments.tables",
            "experiments.placement", "experiments.label_free", "experiments.figures"} <= scripts


@pytest.mark.parametrize("source, command", printed_commands())
def test_printed_command_parses(source, command, monkeypatch):
    words = shlex.split(command)[1:]
    module = words.pop(1) if words[0] == "-m" else words[0][:-len(".py")]
    argv = words[1:]
    main = importlib.import_module(module).main
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        namespace = original(self, args, namespace)       # a bad flag exits here with status 2
        raise Parsed(namespace)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    try:
        main(argv)
    except Parsed:
        return
    except SystemExit as error:
        if "--help" in argv and error.code == 0:
            return
        pytest.fail(f"{source}: `{command}` does not parse (exit {error.code})")
    pytest.fail(f"{source}: `{command}` ran without parsing its command line")
