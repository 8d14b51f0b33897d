"""Config validation: every problem reported at once, with its location, no secret."""

from __future__ import annotations

import copy
import os
import tempfile
from datetime import UTC, datetime

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import create_app
from gateway.config.load import parse_config
from gateway.config.source import hand_over, load_config, read_config
from gateway.errors import ConfigError, PolicyError

from ..live_gateway import LiveGateway
from ..support import CANARIES, CHAT_KEY, assert_no_canary, base_config, write_config


def problems_of(raw, env=None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, CANARIES if env is None else env)
    return info.value.problems


def client_of(config, key):
    """Return the client ``key`` opens now, or None if it opens none."""
    try:
        return config.client_for(key, datetime.now(UTC))[0]
    except PolicyError:
        return None


def test_valid_config_loads_clients_by_key():
    config = parse_config(base_config(), CANARIES)
    client = client_of(config, CHAT_KEY)
    assert client is not None and client.target.name == "api"
    assert ("Authorization", "Bearer " + CANARIES["CANARY_OPENAI"]) in client.secret_headers
    assert ("x-api-key", CANARIES["CANARY_ANTHROPIC"]) in client.secret_headers
    assert client.read_timeout == 30 and client.connect_timeout == 5
    assert client_of(config, "ck-unknown") is None
    assert config.max_request_bytes == 10 * 1024 * 1024
    assert config.upstream_idle == 4.0  # below the common 5 s server keep-alive
    assert parse_config({**base_config(), "upstreamIdleMs": 1500}, CANARIES).upstream_idle == 1.5


def test_seed_shaped_config_works_unchanged():
    seed = {
        "targets": {
            "openrouter": {
                "baseUrl": "https://openrouter.ai/api/v1",
                "defaultHeaders": {"HTTP-Referer": "https://x.example", "X-Title": "x"},
            },
            "rapid": {"baseUrl": "https://api.rapid.example"},
        },
        "secrets": {"or": "Bearer ${OPENROUTER_KEY_MAIN}", "rk": "${RAPID_KEY_1}"},
        "clients": {
            "robot-1": {
                "target": "openrouter",
                "authHeaderRef": "or",
                "allowedMethods": ["POST"],
                "allowedPaths": ["/chat/completions"],
                "timeoutMs": 60000,
            },
            "robot-2": {
                "target": "rapid",
                "rapidApiKeyRef": "rk",
                "allowedMethods": ["GET"],
                "allowedPaths": ["/v1/data"],
            },
        },
    }
    config = parse_config(seed, {"OPENROUTER_KEY_MAIN": "a", "RAPID_KEY_1": "b"})
    assert client_of(config, "robot-2").secret_headers == (("X-RapidAPI-Key", "b"),)
    assert client_of(config, "robot-1").read_timeout == 60
    assert [c.label for c in config.clients] == ["client#1", "client#2"]


def broken(mutate):
    raw = base_config()
    mutate(raw)
    return raw


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda c: c["clients"][CHAT_KEY].update(allowedMethods=[]),
            'clients.client#1.allowedMethods: must not be empty; write ["*"]',
        ),
        (
            lambda c: c["clients"][CHAT_KEY].update(allowedPaths=[]),
            'clients.client#1.allowedPaths: must not be empty; write ["/**"]',
        ),
        (
            lambda c: c["clients"][CHAT_KEY].pop("allowedPaths"),
            "clients.client#1.allowedPaths: is required",
        ),
        (
            lambda c: c["clients"][CHAT_KEY].update(allowedPath=["/x"]),
            "clients.client#1.allowedPath: unknown field; did you mean allowedPaths?",
        ),
        (lambda c: c.update(client={}), "client: unknown field; did you mean clients?"),
        (
            lambda c: c["targets"]["api"].update(baseURL="x"),
            "targets.api.baseURL: unknown field; did you mean baseUrl?",
        ),
        (
            lambda c: c["clients"][CHAT_KEY].update(target="nope"),
            "clients.client#1.target: unknown target 'nope'; known targets: api",
        ),
        (
            lambda c: c["clients"][CHAT_KEY].update(authHeaderRef="nope"),
            "clients.client#1.authHeaderRef: unknown secret 'nope'",
        ),
        (
            lambda c: c["clients"][CHAT_KEY].update(allowedMethods=["GETT"]),
            "clients.client#1.allowedMethods[0]: unknown method 'GETT'",
        ),
        (
            lambda c: c["clients"][CHAT_KEY].update(allowedPaths=["/ok", "/a/../b"]),
            "clients.client#1.allowedPaths[1]: the pattern must not hold . or ..",
        ),
        (
            lambda c: c["clients"][CHAT_KEY].update(allowedPaths=["models/*"]),
            "clients.client#1.allowedPaths[0]: must start with /",
        ),
        (
            lambda c: c["clients"][CHAT_KEY].update(allowedOrigins=["https://a.example/"]),
            "clients.client#1.allowedOrigins[0]: must be an exact origin",
        ),
        (
            lambda c: c["clients"][CHAT_KEY].update(timeoutMs="30s"),
            "clients.client#1.timeoutMs: not a valid integer",
        ),
        (
            lambda c: c["clients"][CHAT_KEY].update(timeoutMs=0),
            "clients.client#1.timeoutMs: must be greater than or equal to 1",
        ),
        (
            lambda c: c["clients"][CHAT_KEY].update(secretHeaders={"bad header": "openai"}),
            "clients.client#1.secretHeaders.bad header: not a valid header name",
        ),
        (
            lambda c: c["targets"]["api"].update(baseUrl="ftp://x.example"),
            "targets.api.baseUrl: must be an http or https URL",
        ),
        (
            lambda c: c["targets"]["api"].update(baseUrl="https://u:p@x.example"),
            "targets.api.baseUrl: must not hold credentials",
        ),
        (
            lambda c: c["targets"]["api"].update(defaultHeaders={"Host": "x"}),
            "targets.api.defaultHeaders.Host: the gateway sets this header itself",
        ),
        (
            lambda c: c["targets"]["api"].update(defaultHeaders={"X-A": "a\r\nX-B: b"}),
            "targets.api.defaultHeaders.X-A: value holds a line break",
        ),
        (lambda c: c.pop("targets"), "targets: is required"),
        (lambda c: c.update(targets=[]), "targets: not a valid mapping type"),
        (lambda c: c.update(maxRequestBytes=-1), "maxRequestBytes: must be greater than"),
        (lambda c: c.update(upstreamIdleMs=-1), "upstreamIdleMs: must be greater than or equal"),
        (lambda c: c.update(upstreamIdleMs="4s"), "upstreamIdleMs: not a valid integer"),
        (
            lambda c: c["clients"].update({"key with space": c["clients"][CHAT_KEY]}),
            "clients.client#4: a client key must be printable ASCII",
        ),
    ],
)
def test_each_problem_is_reported_with_its_location(mutate, expected):
    problems = problems_of(broken(mutate))
    assert any(p.startswith(expected) for p in problems), problems


def test_every_problem_is_reported_at_once():
    raw = base_config()
    raw["clients"][CHAT_KEY].update(allowedMethods=[], allowedPath=["/x"])
    raw["clients"][CHAT_KEY]["allowedPaths"] = ["/a/../b"]
    raw["targets"]["api"]["baseUrl"] = "ftp://x"
    raw["secrets"]["extra"] = "${NOT_SET_ANYWHERE}"
    problems = problems_of(raw)
    assert len(problems) == 5, problems


def test_missing_variable_is_an_error_naming_it_never_an_empty_secret():
    env = {k: v for k, v in CANARIES.items() if k != "CANARY_RAPID"}
    problems = problems_of(base_config(), env)
    assert problems == [
        "secrets.rapid: environment variable CANARY_RAPID is not set "
        "(set it in the environment or in .env)"
    ]


def test_secret_values_never_appear_in_problems():
    env = dict(CANARIES, CANARY_RAPID="line\r\nbreak-" + CANARIES["CANARY_RAPID"])
    raw = base_config()
    raw["clients"][CHAT_KEY]["authHeaderRef"] = "nope"
    problems = problems_of(raw, env)
    assert "secrets.rapid: value holds a line break or NUL" in problems
    for problem in problems:
        for value in env.values():
            assert value not in problem


def test_empty_secret_is_an_error():
    assert problems_of(base_config(), dict(CANARIES, CANARY_RAPID="")) == [
        "secrets.rapid: resolves to an empty value"
    ]


def test_yaml_syntax_error_has_line_and_column(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("targets:\n  api: {baseUrl: x\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert info.value.problems[0].startswith(f"{path}:3:1: ")


def test_duplicate_keys_are_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("targets: {}\nclients:\n  k1: {}\n  k1: {}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert info.value.problems == [f"{path}:4:3: a key written twice in the same mapping"]


def test_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml", {})
    assert "copy instance/config.example.yaml" in info.value.problems[0]


def test_problems_carry_the_file_path(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("targets: {}\nclients: {}\nbogus: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert info.value.problems == [f"{path}: bogus: unknown field"]


def test_shipped_example_config_is_valid():
    config = load_config(
        "instance/config.example.yaml",
        {"OPENROUTER_API_KEY": "placeholder", "RAPIDAPI_KEY": "placeholder"},
    )
    assert len(config.clients) == 2


def test_input_is_not_modified():
    raw = base_config()
    before = copy.deepcopy(raw)
    parse_config(raw, CANARIES)
    assert raw == before


# --- no config, however malformed, produces a traceback -------------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=12),
    st.dates(),
    st.sampled_from(["GET", "/**", "*", "api", "openai", "https://a.example", "${CANARY_RAPID}"]),
)
_keys = st.one_of(
    st.text(max_size=10),
    st.integers(),
    st.booleans(),
    st.sampled_from(
        [
            "targets",
            "clients",
            "secrets",
            "baseUrl",
            "baseURL",
            "target",
            "allowedPaths",
            "allowedMethods",
            "allowedOrigins",
            "authHeaderRef",
            "secretHeaders",
            "defaultHeaders",
            "timeoutMs",
            "maxRequestBytes",
            "api",
        ]
    ),
)
_yaml_data = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_keys, children, max_size=4),
    max_leaves=30,
)


def _graft(raw: dict, path: list, value) -> dict:
    """Put ``value`` somewhere inside a valid config, so errors are found deep inside it."""
    node = raw
    for step in path:
        if not isinstance(node, dict) or not node:
            break
        key = list(node)[step % len(node)]
        if not isinstance(node[key], dict):
            node[key] = value
            return raw
        node = node[key]
    if isinstance(node, dict) and node:
        node[list(node)[path[-1] % len(node)] if path else "extra"] = value
    return raw


def _assert_loads_or_locates(load) -> None:
    try:
        load()
    except ConfigError as exc:
        assert exc.problems and all(isinstance(p, str) and ": " in p for p in exc.problems)
        for problem in exc.problems:
            assert CHAT_KEY not in problem
            for secret in CANARIES.values():
                assert secret not in problem


@given(data=_yaml_data)
@settings(max_examples=300, deadline=None)
def test_any_yaml_shaped_data_loads_or_reports_located_problems(data):
    _assert_loads_or_locates(lambda: parse_config(data, CANARIES))


@given(path=st.lists(st.integers(0, 7), min_size=1, max_size=4), value=_yaml_data)
@settings(max_examples=400, deadline=None)
def test_any_value_anywhere_in_a_valid_config_loads_or_is_located(path, value):
    raw = _graft(base_config(), path, value)
    _assert_loads_or_locates(lambda: parse_config(raw, CANARIES))


@given(text=st.text(max_size=200) | _yaml_data.map(lambda d: yaml.safe_dump(d)))
@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_any_file_text_loads_or_reports_located_problems(tmp_path, text):
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _assert_loads_or_locates(lambda: load_config(path, CANARIES))


@pytest.mark.parametrize(
    "text",
    [
        "[" * 5000,
        "a: " + "[" * 5000 + "]" * 5000,
        "? [a, b]\n: 1\n",
        "clients:\n  ? {k: v}\n  : {}\n",
        "targets: {api: {baseURL: http://x}}\nclients: {}\n",
    ],
)
def test_pathological_files_are_reported_not_crashed(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, CANARIES)
    assert all(p.startswith(f"{path}") for p in info.value.problems)


def test_a_misspelt_target_field_is_named_not_crashed():
    raw = base_config()
    raw["targets"]["api"] = {"baseURL": "http://x.example"}
    assert sorted(problems_of(raw)) == [
        "targets.api.baseURL: unknown field; did you mean baseUrl?",
        "targets.api.baseUrl: is required",
    ]


def test_client_keys_are_never_printed_in_problems():
    raw = base_config()
    raw["clients"][CHAT_KEY]["nmae"] = "x"
    raw["clients"][CHAT_KEY]["allowedMethods"] = ["GETT"]
    raw["clients"]["ck-second-secretish-key"] = {"target": "nope"}
    problems = problems_of(raw)
    assert "clients.client#1.nmae: unknown field; did you mean name?" in problems
    assert any(p.startswith("clients.client#4.") for p in problems)
    for problem in problems:
        assert CHAT_KEY not in problem and "ck-second-secretish-key" not in problem


def test_yaml_errors_keep_both_marks(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("targets:\n  api: {baseUrl: http://x, a: b: c}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    (problem,) = info.value.problems
    assert problem.startswith(f"{path}:2:")
    assert "(while parsing a flow mapping at line 2, column 8)" in problem


# --- the hand-over from the gunicorn master (live: tests/observe/test_live.py) ------


def test_a_handed_over_config_is_built_without_the_file_and_carries_only_its_variables(
    tmp_path,
):
    path = write_config(tmp_path / "config.yaml", base_config())
    env = {**CANARIES, "UNRELATED_SECRET": "not-for-the-workers"}
    bundle = hand_over(path, read_config(path), env)
    assert b"not-for-the-workers" not in bundle
    os.remove(path)
    with tempfile.TemporaryFile() as handed:
        handed.write(bundle)
        handed.flush()
        app = create_app(
            {"GATEWAY_CONFIG": path, "GATEWAY_CHECKED_CONFIG_FD": str(handed.fileno())}
        )
    config = app.extensions["gateway.config"]
    assert config.client_for(CHAT_KEY, datetime.now(UTC))[0].label == "client#1"


def test_a_descriptor_without_a_handed_over_config_is_refused():
    with tempfile.TemporaryFile() as handed, pytest.raises(ConfigError) as caught:
        fd = handed.fileno()
        create_app({"GATEWAY_CHECKED_CONFIG_FD": str(fd)})
    assert caught.value.problems == [
        f"GATEWAY_CHECKED_CONFIG_FD: file descriptor {fd} holds no config checked by gunicorn"
    ]


def test_invalid_config_refuses_to_start(tmp_path):
    raw = base_config()
    raw["clients"][CHAT_KEY]["allowedPaths"] = []
    raw["secrets"]["extra"] = "${NOT_SET_FOR_THIS_TEST}"
    live = LiveGateway(write_config(tmp_path / "bad.yaml", raw), CANARIES, tmp_path / "log")
    with pytest.raises(RuntimeError, match="gunicorn exited early"):
        live.start()
    live.stop()
    assert live.process.returncode == 1
    log = live.log_text()
    assert 'allowedPaths: must not be empty; write ["/**"]' in log
    assert "environment variable NOT_SET_FOR_THIS_TEST is not set" in log
    assert "Traceback" not in log
    assert_no_canary(log)
