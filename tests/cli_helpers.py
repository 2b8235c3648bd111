"""What the CLI tests share: invoking the click app in-process, and checking a one-line error."""

from __future__ import annotations

from click.testing import CliRunner

from edgelm.cli import main


def invoke(*args, **kwargs):
    return CliRunner().invoke(main, [str(a) for a in args], **kwargs)


def assert_one_line_error(result, code, fragment):
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output
