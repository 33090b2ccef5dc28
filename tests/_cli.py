"""Run the ``crossret`` console entry point in-process, as a shell would: argv in; exit code, stdout, stderr out."""

from __future__ import annotations

import sys

from crossret.cli import main


def cli(monkeypatch, capsys, *args: object) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["crossret", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err
