"""Config validation: every problem reported at once, with its location, no secret."""

from __future__ import annotations

import copy

import pytest

from gateway.config import ConfigError, load_config, parse_config

from .support import CANARIES, CHAT_KEY, base_config


def problems_of(raw, env=None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, CANARIES if env is None else env)
    return info.value.problems


def test_valid_config_loads_clients_by_key():
    config = parse_config(base_config(), CANARIES)
    client = config.client_for(CHAT_KEY)
    assert client is not None and client.target.name == "api"
    assert ("Authorization", "Bearer " + CANARIES["CANARY_OPENAI"]) in client.secret_headers
    assert ("x-api-key", CANARIES["CANARY_ANTHROPIC"]) in client.secret_headers
    assert client.read_timeout == 30 and client.connect_timeout == 5
    assert config.client_for("ck-unknown") is None
    assert config.max_request_bytes == 10 * 1024 * 1024


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
    assert config.client_for("robot-2").secret_headers == (("X-RapidAPI-Key", "b"),)
    assert config.client_for("robot-1").read_timeout == 60


def broken(mutate):
    raw = base_config()
    mutate(raw)
    return raw


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda c: c["clients"][CHAT_KEY].update(allowedMethods=[]),
            f'clients.{CHAT_KEY}.allowedMethods: must not be empty; write ["*"]',
        ),
        (
            lambda c: c["clients"][CHAT_KEY].update(allowedPaths=[]),
            f'clients.{CHAT_KEY}.allowedPaths: must not be empty; write ["/**"]',
        ),
        (
            lambda c: c["clients"][CHAT_KEY].pop("allowedPaths"),
            f"clients.{CHAT_KEY}.allowedPaths: is required",
        ),
        (
            lambda c: c["clients"][CHAT_KEY].update(allowedPath=["/x"]),
            f"clients.{CHAT_KEY}.allowedPath: unknown field; did you mean allowedPaths?",
        ),
        (lambda c: c.update(client={}), "client: unknown field; did you mean clients?"),
        (
            lambda c: c["targets"]["api"].update(baseURL="x"),
            "targets.api.baseURL: unknown field; did you mean baseUrl?",
        ),
        (
            lambda c: c["clients"][CHAT_KEY].update(target="nope"),
            f"clients.{CHAT_KEY}.target: unknown target 'nope'; known targets: api",
        ),
        (
            lambda c: c["clients"][CHAT_KEY].update(authHeaderRef="nope"),
            f"clients.{CHAT_KEY}.authHeaderRef: unknown secret 'nope'",
        ),
        (
            lambda c: c["clients"][CHAT_KEY].update(allowedMethods=["GETT"]),
            f"clients.{CHAT_KEY}.allowedMethods[0]: unknown method 'GETT'",
        ),
        (
            lambda c: c["clients"][CHAT_KEY].update(allowedPaths=["/ok", "/a/../b"]),
            f"clients.{CHAT_KEY}.allowedPaths[1]: the pattern must not hold . or ..",
        ),
        (
            lambda c: c["clients"][CHAT_KEY].update(allowedPaths=["models/*"]),
            f"clients.{CHAT_KEY}.allowedPaths[0]: must start with /",
        ),
        (
            lambda c: c["clients"][CHAT_KEY].update(allowedOrigins=["https://a.example/"]),
            f"clients.{CHAT_KEY}.allowedOrigins[0]: must be an exact origin",
        ),
        (
            lambda c: c["clients"][CHAT_KEY].update(timeoutMs="30s"),
            f"clients.{CHAT_KEY}.timeoutMs: not a valid integer",
        ),
        (
            lambda c: c["clients"][CHAT_KEY].update(timeoutMs=0),
            f"clients.{CHAT_KEY}.timeoutMs: must be greater than or equal to 1",
        ),
        (
            lambda c: c["clients"][CHAT_KEY].update(secretHeaders={"bad header": "openai"}),
            f"clients.{CHAT_KEY}.secretHeaders.bad header: not a valid header name",
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
            "targets.api.defaultHeaders.X-A: the value of header X-A holds a line break",
        ),
        (lambda c: c.pop("targets"), "targets: is required"),
        (lambda c: c.update(targets=[]), "targets: not a valid mapping type"),
        (lambda c: c.update(maxRequestBytes=-1), "maxRequestBytes: must be greater than"),
        (
            lambda c: c["clients"].update({"key with space": c["clients"][CHAT_KEY]}),
            "clients.key with space: a client key must be printable ASCII",
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
    assert "duplicate key 'k1'" in info.value.problems[0]


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
