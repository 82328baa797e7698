"""A fast start: `import jaxft` and `jaxft --help` import none of the heavy libraries (asserted on
the modules imported, never on seconds); the lazily exported names still all work."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

HEAVY = ("pandas", "matplotlib", "orbax", "tiktoken", "tqdm")


def _python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env={**os.environ})
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_import_jaxft_imports_no_heavy_library():
    out = _python(f"import jaxft, sys; print([m for m in {HEAVY!r} if m in sys.modules])")
    assert out.strip() == "[]"


@pytest.mark.parametrize("name", ["make_steps", "load", "adamw", "apply", "get_tokenizer"])
def test_the_functional_api_imports_heavy_libraries_only_when_used(name):
    out = _python(f"import jaxft, sys; jaxft.{name}; print([m for m in {HEAVY!r} if m in sys.modules])")
    assert out.strip() == "[]"


def test_help_lists_every_command_without_jax_or_a_command_module():
    code = (
        "import sys, contextlib, io\n"
        "from jaxft.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    try:\n"
        "        main(['--help'])\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code == 0, exc.code\n"
        "print([m for m in sys.modules if m == 'jax' or m.startswith('jaxft.cli.') and m not in "
        "('jaxft.cli.app', 'jaxft.cli.commands')] + [m for m in " + repr(HEAVY) + " if m in sys.modules])\n"
        "print(out.getvalue())\n"
    )
    out = _python(code)
    imported, _, help_text = out.partition("\n")
    assert imported == "[]"
    from jaxft.cli.commands import COMMANDS

    for name, command in COMMANDS.items():
        assert name in help_text and command.help.split()[0] in help_text


def test_the_command_list_is_the_full_parsers_top_level():
    from jaxft.cli.app import build_parser, command_list_parser

    assert command_list_parser().format_help() == build_parser().format_help()


def test_a_command_imports_its_own_module_only(monkeypatch):
    from jaxft.cli import app

    chosen = []
    monkeypatch.setattr(app, "build_parser", lambda modules=None: chosen.append(modules) or app.command_list_parser())
    app.parser_for(["convert", "a", "b"])
    assert chosen == [["jaxft.cli.weights"]]
    assert app.parser_for(["--help"]).format_help() == app.command_list_parser().format_help()
    assert app.parser_for(["no-such-command"]).format_help() == app.command_list_parser().format_help()


def test_unknown_command_and_no_command_are_one_line_usage_errors(capsys):
    from jaxft.cli import main

    for argv in (["no-such-command"], []):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("jaxft: error:")


def test_every_public_name_resolves():
    import jaxft

    for name in jaxft.__all__:
        assert getattr(jaxft, name) is not None, name
    assert set(jaxft.__all__) <= set(dir(jaxft))
    assert jaxft.train.fit is not None  # submodules as attributes too
    from jaxft import make_steps, with_classifier_head  # noqa: F401
    from jaxft.cli import CLIError

    assert issubclass(CLIError, Exception)
    with pytest.raises(AttributeError):
        jaxft.no_such_name  # noqa: B018
