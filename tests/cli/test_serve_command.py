"""`offspec serve` flags: bad values and a port in use are one line and an exit code, before any model loads."""

from __future__ import annotations

import socket

import pytest


def one_error_line(res) -> str:
    assert res.exit_code == 2, res.output
    assert res.stdout == "" and "Traceback" not in res.output
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]


@pytest.mark.parametrize("args,says", [
    (["--parallel", "0"], "--parallel"),
    (["--queue", "-1"], "--queue"),
    (["--max-tokens", "0"], "--max-tokens"),
    (["--port", "70000"], "--port"),
    (["--temp", "-1"], "--temperature"),
    (["--budget", "nine"], "--budget"),
])
def test_bad_values_fail_in_one_line(runner, cli_app, tiny, args, says):
    line = one_error_line(runner.invoke(cli_app, ["serve", "-m", str(tiny.target), *args]))
    assert says in line


def test_a_port_in_use_fails_before_loading(runner, cli_app, tiny):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        line = one_error_line(runner.invoke(cli_app, ["serve", "-m", str(tiny.not_a_model), "--port", str(port)]))
    assert f"127.0.0.1:{port}" in line and "in use" in line


def test_help_names_the_server_options(runner, cli_app):
    res = runner.invoke(cli_app, ["serve", "--help"])
    assert res.exit_code == 0
    for flag in ("--host", "--port", "--api-key", "--parallel", "--queue", "--alias", "--ctx-size", "--draft"):
        assert flag in res.stdout
