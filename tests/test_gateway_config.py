"""``mcp-gateway check`` / ``serve`` on bad configs, ``--version``, and the published JSON Schema.

Problems are asserted by where they point (``file:line:col``), one line per problem, all of
them in one run; never by their wording.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

import gateway
from gateway.cli import main as cli_main
from gateway.config.model import load_config
from gateway.config.yamlloc import load_text
from tests.support.components import REPO
from tests.support.gw_helpers import ALLOW_ALL_POLICY, run_cli

SCHEMA_PATH = REPO / "gateway" / "schema" / "gateway.schema.json"
EXAMPLES = sorted(p for p in (REPO / "deploy").rglob("*.yaml")
                  if p.read_text().startswith("# yaml-language-server: $schema="))
PROBLEM = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): \S")

BASE = """\
listen: {host: 127.0.0.1, port: 18080}
admin: {host: 127.0.0.1, port: 19464}
public_url: http://127.0.0.1:18080
auth: {mode: none}
policies: POLICIES
servers:
  up:
    url: http://127.0.0.1:3001/mcp
"""


def write(tmp_path: Path, text: str, name: str = "gateway.yaml") -> Path:
    policies = tmp_path / "policies"
    policies.mkdir(exist_ok=True)
    (policies / "allow.yaml").write_text(ALLOW_ALL_POLICY)
    path = tmp_path / name
    path.write_text(text.replace("POLICIES", str(policies)))
    return path


def problems(stderr: str, path: Path) -> list[tuple[int, int]]:
    """(line, col) of every problem line; every line but the count must be ``file:line:col: msg``."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines and re.fullmatch(r"\d+ problem\(s\) found", lines[-1]), stderr
    found = []
    for line in lines[:-1]:
        m = PROBLEM.match(line)
        assert m and Path(m["file"]).resolve() == path.resolve(), line
        found.append((int(m["line"]), int(m["col"])))
    return found


def check(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``mcp-gateway check -c path`` in this process (the CLI as a process is tested below)."""
    capsys.readouterr()
    code = cli_main(["check", "-c", str(path)])
    return code, capsys.readouterr().err


def test_the_base_config_of_these_tests_passes_check_as_a_process(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    result = run_cli("check", "-c", str(path))
    assert (result.returncode, result.stderr) == (0, "")


CHECK_CASES = [
    # (id, edit of BASE, (line, col) the problem must point at)
    ("unknown top-level key", BASE + "bogus_key: 1\n", (9, 1)),
    ("unknown server key", BASE.replace("    url:", "    urll: x\n    url:"), (8, 5)),
    ("duplicate key", BASE + "  up:\n    url: http://127.0.0.1:3002/mcp\n", (9, 3)),
    ("YAML 1.1 boolean 'no'", BASE + "logging: {audit: no}\n", (9, 18)),
    ("YAML 1.1 boolean 'off' as a value", BASE + "logging: {level: off}\n", (9, 18)),
    ("missing auth", BASE.replace("auth: {mode: none}\n", ""), (1, 1)),
    ("inline secret instead of env:/file:",
     BASE + "    credentials: {header: X-Api-Key, value: sk-live-0123456789}\n", (9, 38)),
    ("unresolvable env: reference", BASE + "    credentials: {header: X-Api-Key, value: 'env:E2E_NOT_SET_ANYWHERE'}\n",
     (9, 38)),
    ("negative stream limit", BASE + "limits: {max_streams_per_principal: -1}\n", (9, 10)),
    ("stream idle timeout that is not a duration", BASE + "limits: {stream_idle_timeout: soon}\n", (9, 10)),
    # PyYAML's constructors raise plain ValueError/KeyError on these (found by the fuzzer in CI).
    ("an explicit tag the value does not fit", BASE + "limits: {max_streams_per_principal: !!int lots}\n", (9, 37)),
    ("an invalid !!timestamp", BASE + "logging: {level: !!timestamp soon}\n", (9, 18)),
    ("a tag on a collection", BASE + "limits: !!set {a}\n", (9, 9)),
    ("an alias inside its own anchor", BASE + "limits: &l {x: [*l]}\n", (9, 9)),
    ("aliases that expand a billion-fold",
     BASE + "".join(f"x{i}: &x{i} [{', '.join([f'*x{i - 1}' if i else '1'] * 9)}]\n" for i in range(7)),
     (14, 5)),
    ("mode none on a non-loopback listener without the second flag",
     BASE.replace("listen: {host: 127.0.0.1", "listen: {host: 0.0.0.0"), (4, 8)),
]


@pytest.mark.parametrize(("text", "where"), [c[1:] for c in CHECK_CASES], ids=[c[0] for c in CHECK_CASES])
def test_check_points_at_each_problem_as_file_line_col_and_exits_non_zero(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, where: tuple[int, int]) -> None:
    path = write(tmp_path, text)
    code, err = check(path, capsys)
    assert code != 0
    assert where in problems(err, path), (where, err)


MERGED = BASE.replace("  up:\n", "  up: &server\n") + """\
    scan_results: {action: mask, min_severity: medium}
  mirror:
    <<: *server
    url: http://127.0.0.1:3002/mcp
"""


def test_a_key_written_over_a_merge_key_is_an_override_not_a_duplicate(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``<<: *anchor`` then a key of its own: the YAML way to share a server's settings."""
    path = write(tmp_path, MERGED)
    code, err = check(path, capsys)
    assert (code, err) == (0, "")
    config = load_config(str(path))
    up, mirror = config.servers["up"], config.servers["mirror"]
    assert (up.url, mirror.url) == ("http://127.0.0.1:3001/mcp", "http://127.0.0.1:3002/mcp")
    assert mirror.scan_results is not None and mirror.scan_results.action == "mask"
    assert mirror.scan_results.min_severity == "medium"


MERGE_CASES = [
    # (id, YAML, the mapping "b" it reads as, or the (line, col) of the problem)
    ("a key written here wins", "a: &a {k: 1, j: 1}\nb:\n  <<: *a\n  k: 2\n", {"k": 2, "j": 1}),
    ("the first of a list of merged mappings wins", "a: &a {key_one: 1, j: 1}\nc: &c {key_one: 2, m: 2}\n"
     "b:\n  <<: [*a, *c]\n", {"key_one": 1, "j": 1, "m": 2}),
    # PyYAML 6.0.4 alone keeps the last here: it dedupes merged keys by object identity, and a
    # long key is not interned.
    ("the first wins for a long key too", "a: &a {a_key_long_enough_not_to_be_interned: 1}\n"
     "c: &c {a_key_long_enough_not_to_be_interned: 2}\nb:\n  <<: [*a, *c]\n",
     {"a_key_long_enough_not_to_be_interned": 1}),
    ("a merge inside a merged mapping", "a: &a {k: 1, j: 1}\nc: &c {<<: *a, k: 2}\nb: {<<: *c, j: 3}\n",
     {"k": 2, "j": 3}),
    ("a key written twice next to a merge", "a: &a {k: 1}\nb:\n  <<: *a\n  k: 2\n  k: 3\n", (5, 3)),
    ("a merge of a scalar", "b:\n  <<: 3\n  k: 1\n", (2, 7)),
    ("a merge of a list holding a scalar", "a: &a {k: 1}\nb:\n  <<: [*a, 3]\n", (3, 12)),
    ("a merge of itself", "a: &a {<<: *a}\n", (1, 4)),
    ("merges that expand a billion-fold", "a0: &a0 {" + ", ".join(f"k{i}: {i}" for i in range(9)) + "}\n" + "".join(
        f"a{j}: &a{j} {{<<: [{', '.join([f'*a{j - 1}'] * 9)}], own{j}: 1}}\n" for j in range(1, 8)), (5, 14)),
    ("a problem inside a merged mapping, reported once", "a: &a {k: no}\nb: {<<: *a}\n", (1, 11)),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in MERGE_CASES], ids=[c[0] for c in MERGE_CASES])
def test_the_merge_key_reads_as_yaml_says_whatever_the_pyyaml_release(text: str, expected: Any) -> None:
    value, found = load_text(text, "f.yaml")
    if isinstance(expected, dict):
        assert found == [] and dict(value["b"]) == expected
    else:
        assert [(p.loc.line, p.loc.col) for p in found] == [expected], found


def test_check_reports_every_problem_in_one_run(tmp_path: Path) -> None:
    text = (BASE.replace("auth: {mode: none}\n", "")
            + "  up:\n    url: http://127.0.0.1:3002/mcp\n"
            + "bogus_key: 1\nlogging: {audit: no}\n")
    path = write(tmp_path, text)
    result = run_cli("check", "-c", str(path))
    assert result.returncode != 0
    assert {(1, 1), (8, 3), (10, 1), (11, 18)} <= set(problems(result.stderr, path)), result.stderr


def test_the_second_flag_allows_mode_none_on_a_non_loopback_listener(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = BASE.replace("listen: {host: 127.0.0.1", "listen: {host: 0.0.0.0").replace(
        "auth: {mode: none}", "auth: {mode: none, allow_none_on_public_listener: true}")
    code, err = check(write(tmp_path, text), capsys)
    assert code == 0, err


def test_serve_refuses_to_start_without_an_auth_key(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("auth: {mode: none}\n", ""))
    result = run_cli("serve", "-c", str(path), timeout=20)
    assert result.returncode not in (0, None)
    assert (1, 1) in [(int(m["line"]), int(m["col"])) for ln in result.stderr.splitlines()
                      if (m := PROBLEM.match(ln))]


CONSOLE_SCRIPT = Path(sys.executable).parent / "mcp-gateway"


@pytest.mark.parametrize("argv", [[sys.executable, "-m", "gateway"], [str(CONSOLE_SCRIPT)]],
                         ids=["python -m gateway", "mcp-gateway"])
def test_version_prints_the_package_version(argv: list[str]) -> None:
    result = subprocess.run([*argv, "--version"], capture_output=True, text=True, cwd=REPO, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["mcp-gateway", gateway.__version__]


# --------------------------------------------------------------------------- JSON Schema

@pytest.fixture(scope="module")
def validator() -> Any:
    schema = json.loads(SCHEMA_PATH.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def test_there_is_a_minimal_and_a_fuller_example() -> None:
    names = {p.relative_to(REPO).as_posix() for p in EXAMPLES}
    assert {"deploy/examples/minimal.yaml", "deploy/examples/full.yaml"} <= names


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.relative_to(REPO).as_posix() for p in EXAMPLES])
def test_every_example_names_the_schema_and_validates_against_it(example: Path, validator: Any) -> None:
    first = example.read_text().splitlines()[0]
    target = (example.parent / first.split("$schema=", 1)[1].strip()).resolve()
    assert target == SCHEMA_PATH.resolve()
    errors = [e.message for e in validator.iter_errors(yaml.safe_load(example.read_text()))]
    assert errors == []


@pytest.mark.parametrize("name", ["minimal.yaml", "full.yaml"])
def test_the_examples_pass_check(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """``check`` resolves what an example references, so give it the files and variables it names."""
    source = REPO / "deploy" / "examples" / name
    text = source.read_text()
    secret = tmp_path / "files-api-key"
    secret.write_text("test-key\n")
    text = text.replace("file:/run/secrets/files-api-key", f"file:{secret}")
    text = re.sub(r"^policies: (\S+)", lambda m: f"policies: {source.parent / m[1]}", text, flags=re.M)
    path = tmp_path / name
    path.write_text(text)
    monkeypatch.setenv("EVERYTHING_TOKEN", "test-token")
    code, err = check(path, capsys)
    assert code == 0, err


UNKNOWN_KEY_EDITS = [
    ("top level", lambda c: c.update(bogus=1)),
    ("listen", lambda c: c["listen"].update(hots="127.0.0.1")),
    ("server", lambda c: c["servers"]["everything"].update(urll="http://x")),
    ("server credentials", lambda c: c["servers"]["everything"].update(
        credentials={"header": "X-Api-Key", "value": "env:K", "extra": 1})),
    ("inline secret", lambda c: c["servers"]["everything"].update(
        credentials={"header": "X-Api-Key", "value": "sk-inline"})),
]


@pytest.mark.parametrize("edit", [e[1] for e in UNKNOWN_KEY_EDITS], ids=[e[0] for e in UNKNOWN_KEY_EDITS])
def test_the_schema_rejects_unknown_keys_and_inline_secrets(validator: Any, edit: Any) -> None:
    config = yaml.safe_load((REPO / "deploy" / "examples" / "minimal.yaml").read_text())
    assert validator.is_valid(config)
    edit(config)
    assert not validator.is_valid(config)


SECRET_CONFIG = BASE.replace("    url: http://127.0.0.1:3001/mcp\n", """\
    url: http://127.0.0.1:3001/mcp
    credentials:
      header: X-Api-Key
      value: SECRET_REF
""")


@pytest.mark.parametrize("value,kind", [
    ("token\n", "env"), ("token\r\n", "env"), (" token", "env"), ("", "env"),
    ("to\nken", "file"), ("", "file"), ("\n", "file"),
])
def test_an_empty_or_newline_secret_is_refused_by_check_and_at_start(tmp_path: Path, value: str, kind: str) -> None:
    """check and serve agree: a secret that could never be a header value stops the gateway before it
    answers anything (it used to start, report ready, and fail every request with 500)."""
    if kind == "env":
        ref, env = "env:E2E_BAD_SECRET", {"E2E_BAD_SECRET": value}
    else:
        (tmp_path / "secret").write_text(value)
        ref, env = f"file:{tmp_path / 'secret'}", {}
    path = write(tmp_path, SECRET_CONFIG.replace("SECRET_REF", ref))
    for command in ("check", "serve"):
        result = run_cli(command, "-c", str(path), env=env, timeout=20)
        assert result.returncode not in (0, None), (command, result.stderr)
        located = [(int(m["line"]), int(m["col"])) for ln in result.stderr.splitlines() if (m := PROBLEM.match(ln))]
        assert (11, 7) in located, (command, result.stderr)
        assert value.strip() == "" or value.strip() not in result.stderr     # the value itself is never printed


def test_a_file_secret_keeps_its_value_without_the_trailing_newline(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("good-token\n")
    path = write(tmp_path, SECRET_CONFIG.replace("SECRET_REF", f"file:{tmp_path / 'secret'}"))
    result = run_cli("check", "-c", str(path), timeout=20)
    assert result.returncode == 0, result.stderr
