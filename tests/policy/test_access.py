"""Path safety, path patterns, methods and origins: attacked, not just used."""

from __future__ import annotations

import time

import pytest

from gateway.errors import PolicyError
from gateway.policy.access import Client, PathPattern, Target, normalize_path

HOSTILE_PATHS = [
    "chat/completions",  # relative
    "",
    "/chat/../admin",
    "/chat/./completions",
    "/..",
    "/.",
    "/chat/..",
    "/chat/..;/admin",  # servlet-style dot segment
    "/chat/...",
    "//evil.example/x",
    "/chat//completions",
    "/chat\\..\\admin",
    "/chat/%2e%2e/admin",
    "/chat/%2E%2E/admin",
    "/chat/.%2e/admin",
    "/chat/%2e/admin",
    "/a%2Fb",
    "/a%2fb",
    "/a%5Cb",
    "/a%5cb",
    "/chat/%252e%252e/admin",  # double encoding
    "/chat/%25",
    "/chat/%c0%ae%c0%ae/admin",  # overlong UTF-8 dot
    "/chat/%e2%80%a4",  # one dot leader
    "/chat/%ef%bc%8f",  # fullwidth solidus
    "/chat/\u2024\u2024/admin",
    "/chat/\uff0fadmin",
    "/chat/%00",
    "/chat/\x00",
    "/chat/a b",
    "/chat/\tx",
    "/chat/\r\nHost: evil",
    "/chat?x=1",
    "/chat#frag",
    "/@evil.example/x",
    "/chat/user@evil.example",
    "http://evil.example/x",
    "/http://evil.example/x",
    "/chat/%zz",
    "/chat/%4",
    "/x" * 2000,
]


@pytest.mark.parametrize("raw", HOSTILE_PATHS)
def test_hostile_paths_are_refused(raw):
    with pytest.raises(PolicyError) as info:
        normalize_path(raw)
    assert info.value.code == "invalid_path"


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("/chat/completions", "/chat/completions"),
        ("/models/gpt-4o", "/models/gpt-4o"),
        ("/chat/%63ompletions", "/chat/completions"),  # unreserved escapes mean the plain char
        ("/search/a%20b", "/search/a%20b"),
        ("/v1beta/models/gemini:generateContent", "/v1beta/models/gemini:generateContent"),
        ("/files/", "/files/"),
        ("/a/.well-known", "/a/.well-known"),
        ("/a/x..y", "/a/x..y"),
    ],
)
def test_plain_paths_pass_normalized(raw, normalized):
    assert normalize_path(raw) == normalized


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("/chat/completions", "/chat/completions", True),
        ("/chat/completions", "/chat/completions/", False),
        ("/chat/completions", "/chat/completions/x", False),
        ("/chat/completions", "/chat", False),
        ("/models/*", "/models/gpt-4o", True),
        ("/models/*", "/models", False),
        ("/models/*", "/models/", False),
        ("/models/*", "/models/a/b", False),
        ("/v1/**", "/v1", True),
        ("/v1/**", "/v1/a", True),
        ("/v1/**", "/v1/a/b/c", True),
        ("/v1/**", "/v2/a", False),
        ("/v1/**", "/v1x", False),
        ("/**", "/anything/at/all", True),
        ("/a/*/c", "/a/b/c", True),
        ("/a/*/c", "/a/b/d", False),
        ("/a/**/z", "/a/z", True),
        ("/a/**/z", "/a/b/c/z", True),
        ("/a/**/z", "/a/b/c/y", False),
    ],
)
def test_path_patterns_match_whole_segments(pattern, path, expected):
    assert PathPattern.compile(pattern).matches(path) is expected


@pytest.mark.parametrize(
    "pattern",
    ["", "models", "/models/*x", "/v1/a**", "/../x", "/a//b", "/%2e", "/a?b", "/%63hat"],
)
def test_bad_patterns_are_refused(pattern):
    with pytest.raises(ValueError):
        PathPattern.compile(pattern)


def _client(methods=("GET",), paths=("/models",), origins=()):
    return Client(
        label="client#1",
        target=Target("api", "http://upstream.test"),
        secret_headers=(),
        methods=frozenset(methods),
        paths=tuple(PathPattern.compile(p) for p in paths),
        origins=frozenset(origins),
    )


def test_method_outside_policy_is_refused():
    with pytest.raises(PolicyError) as info:
        _client().check("POST", "/models")
    assert info.value.code == "method_not_allowed"


def test_star_allows_every_method():
    _client(methods=("*",)).check("DELETE", "/models")


def test_path_outside_policy_is_refused():
    with pytest.raises(PolicyError) as info:
        _client().check("GET", "/admin")
    assert info.value.code == "path_not_allowed"


def test_origins_are_exact():
    client = _client(origins=("https://app.example.com",))
    assert client.allows_origin("https://app.example.com")
    assert client.allows_origin("HTTPS://APP.EXAMPLE.COM")
    assert not client.allows_origin("https://app.example.com.evil.test")
    assert not client.allows_origin("http://app.example.com")
    assert not client.allows_origin("null")


def _reference_match(pattern, parts) -> bool:
    """The old recursive matcher: exponential, but obviously right."""
    if not pattern:
        return not parts
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_reference_match(rest, parts[i:]) for i in range(len(parts) + 1))
    if not parts:
        return False
    if head == "*":
        return parts[0] != "" and _reference_match(rest, parts[1:])
    return head == parts[0] and _reference_match(rest, parts[1:])


def test_redundant_double_stars_are_refused_in_config():
    for text in ("/**/**", "/a/**/**/z", "/**/**/**/**/z"):
        with pytest.raises(ValueError, match="write \\*\\* once"):
            PathPattern.compile(text)


def test_a_200_segment_path_is_matched_in_linear_time():
    pattern = PathPattern.compile("/**/a/**/a/**/a/**/a/**/a/**/z")
    path = "/" + "/".join(["a"] * 200) + "/y"
    started = time.monotonic()
    assert not pattern.matches(path)
    assert time.monotonic() - started < 1  # the recursive matcher took minutes here


def test_the_linear_matcher_agrees_with_the_reference_on_generated_cases():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    segment = st.sampled_from(["a", "b", "*", "**", ""])

    @given(
        pattern=st.lists(segment, min_size=1, max_size=6),
        parts=st.lists(st.sampled_from(["a", "b", ""]), max_size=8),
    )
    @settings(max_examples=2000, deadline=None)
    def check(pattern, parts):
        pattern = [
            p for i, p in enumerate(pattern) if not (p == "**" and pattern[i - 1 : i] == ["**"])
        ]
        if "" in pattern[:-1]:
            return
        compiled = PathPattern("/" + "/".join(pattern), tuple(pattern))
        path = "/" + "/".join(parts)
        assert compiled.matches(path) == _reference_match(tuple(pattern), path.split("/")[1:])

    check()


@pytest.mark.parametrize("raw", ["/a/..%20/b", "/a/x./b", "/a/x.", "/a/%20", "/files/x%20"])
def test_segments_ending_in_a_dot_or_space_are_refused(raw):
    with pytest.raises(PolicyError):
        normalize_path(raw)
