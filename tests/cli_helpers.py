"""What the CLI tests share: running `maskprune ARGV` in this process and reading its exit code and output."""
from __future__ import annotations

from maskprune import cli


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `maskprune ARGV`, run in this process."""
    try:
        cli.main(argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err
