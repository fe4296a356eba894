"""The `apigate` command line: check and run, exit codes and what they print."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from tests.support.errors_helpers import apigate_cmd, clean_env, free_port, port_refuses

GOOD = """\
listen: 127.0.0.1:{port}
upstreams:
  backend:
    targets:
      - http://127.0.0.1:9001
      - url: http://127.0.0.1:9002
        weight: 3
routes:
  - path: /api/*
    upstream: backend
  - path: /users/{{id}}
    target: http://127.0.0.1:9003
    methods: [GET]
"""

# Four problems, each on its own line.
BAD = """\
listen: 127.0.0.1:{port}
timeouts:
  connect: fast
routes:
  - path: no-slash
    target: http://127.0.0.1:9001
  - path: /b
    target: ftp://example.invalid
    bogus: 1
"""

BAD_PROBLEMS = [
    "line 3: timeouts.connect: expected a duration",
    "line 5: routes[0].path: must start with /",
    "line 8: routes[1].target: must be an http:// or https:// URL",
    "line 9: routes[1].bogus: Extra inputs are not permitted",
]


def apigate(cwd: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        apigate_cmd(*args), cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout
    )


def write(path: Path, text: str, port: int = 0) -> Path:
    path.write_text(text.format(port=port or free_port()))
    return path


def test_version(tmp_path: Path) -> None:
    result = apigate(tmp_path, "--version")
    assert result.returncode == 0
    assert result.stdout.startswith("apigate ")


def test_check_good_config(tmp_path: Path) -> None:
    write(tmp_path / "good.yaml", GOOD)
    result = apigate(tmp_path, "check", "-c", "good.yaml")
    assert result.returncode == 0, result.stderr
    assert "good.yaml: OK (2 routes, 1 upstreams)" in result.stdout
    assert result.stderr == ""


def test_check_bad_config_prints_every_problem_with_path_and_line(tmp_path: Path) -> None:
    write(tmp_path / "bad.yaml", BAD)
    result = apigate(tmp_path, "check", "-c", "bad.yaml")
    assert result.returncode == 1
    assert "bad.yaml: 4 problems" in result.stderr
    for problem in BAD_PROBLEMS:
        assert problem in result.stderr, result.stderr
    # In file order.
    positions = [result.stderr.index(problem) for problem in BAD_PROBLEMS]
    assert positions == sorted(positions)
    assert "OK" not in result.stdout


def test_check_reports_field_and_reference_problems_together(tmp_path: Path) -> None:
    """A typo in one route and a dangling upstream name in another are both reported in one run."""
    (tmp_path / "mixed.yaml").write_text(
        "routes:\n"
        "  - path: /a\n"
        "    target: http://127.0.0.1:9001\n"
        "    tiemout: 5s\n"
        "  - path: /b\n"
        "    upstream: nowhere\n"
    )
    result = apigate(tmp_path, "check", "-c", "mixed.yaml")
    assert result.returncode == 1
    assert "line 4: routes[0].tiemout: Extra inputs are not permitted" in result.stderr, result.stderr
    assert "line 6: routes[1].upstream: no upstream named 'nowhere'" in result.stderr, result.stderr


def test_check_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "broken.yaml").write_text("routes:\n  - path: /a\n    target: [unclosed\n")
    result = apigate(tmp_path, "check", "-c", "broken.yaml")
    assert result.returncode == 1
    assert "YAML syntax error" in result.stderr
    assert "line " in result.stderr


def test_check_without_a_config(tmp_path: Path) -> None:
    result = apigate(tmp_path, "check")
    assert result.returncode == 2
    assert "no config to check" in result.stderr


def test_run_broken_config_exits_without_listening(tmp_path: Path) -> None:
    port = free_port()
    write(tmp_path / "broken.yaml", BAD, port)
    result = apigate(tmp_path, "run", "-c", "broken.yaml")
    assert result.returncode != 0
    assert "not valid" in result.stderr
    for problem in BAD_PROBLEMS:
        assert problem in result.stderr, result.stderr
    assert "listening" not in result.stdout + result.stderr
    assert port_refuses(port)


def test_run_missing_config_exits_2(tmp_path: Path) -> None:
    result = apigate(tmp_path, "run", "-c", "missing.yaml")
    assert result.returncode == 2
    assert "config file missing.yaml does not exist" in result.stderr


def test_run_rejects_zero_workers(tmp_path: Path) -> None:
    port = free_port()
    write(tmp_path / "good.yaml", GOOD, port)
    result = apigate(tmp_path, "run", "-c", "good.yaml", "--workers", "0")
    assert result.returncode == 2
    assert "--workers must be at least 1" in result.stderr
    assert port_refuses(port)


def test_run_on_a_taken_port_exits_1(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        write(tmp_path / "good.yaml", GOOD, port)
        result = apigate(tmp_path, "run", "-c", "good.yaml")
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
