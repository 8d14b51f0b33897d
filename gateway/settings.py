"""The one table of settings: every config key and every ``GATEWAY_*`` variable, once.

Each ``Setting`` has its name, its kind, its default and a one-line meaning
(gunicorn's ``Setting`` classes are the model). The config schema takes its
integer ranges from here, the loaders take their defaults from here,
``check-config`` prints the settings that differ from their defaults, and the
reference in the docs is generated from it (a test keeps it current).

The bottom of the house, like ``errors``: plain Python with no import of the
gateway or of any other package, so gunicorn.conf.py can read it by path
without importing the app.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "CONFIG",
    "ENVIRONMENT",
    "GLOBAL",
    "Setting",
    "default",
    "markdown_table",
    "setting",
]


@dataclass(frozen=True)
class Setting:
    """One config key (``key`` is its path) or one environment variable."""

    key: str
    kind: str
    meaning: str
    default: Any = None  # None: absent unless written (``required`` says whether it must be)
    required: bool = False
    low: int | None = None  # an integer's range, inclusive
    high: int | None = None
    shown: str | None = None  # the default as the reference writes it, when not the value

    @property
    def name(self) -> str:
        """Return the key's last part: the field's name in its schema."""
        return self.key.rsplit(".", 1)[-1]

    def default_text(self) -> str:
        """Return the default as the reference writes it."""
        if self.shown is not None:
            return self.shown
        if self.required:
            return "required"
        if self.default is None:
            return "–"
        if isinstance(self.default, bool):
            return f"`{str(self.default).lower()}`"
        return f"`{self.default}`"


def _integer(key: str, between: tuple[int, int], meaning: str, **more: Any) -> Setting:
    return Setting(key, "integer", meaning, low=between[0], high=between[1], **more)


def _limits(scope: str, who: str) -> tuple[Setting, ...]:
    return (
        Setting(
            f"{scope}.limits.requests",
            "list of rates",
            f"Request limits {who}, e.g. `[10/second, 1000/day]`; over one, `429 rate_limited`.",
        ),
        Setting(
            f"{scope}.limits.concurrent",
            "integer",
            f"Calls {who} at once, streams included; over it, `429 too_many_concurrent`.",
            low=1,
            high=1_000_000,
        ),
        Setting(
            f"{scope}.limits.tokens",
            "list of rates",
            f"Token budgets {who}, e.g. `[200000/day]`, reserved at admission and settled "
            "to the usage the answer reports; spent, `429 quota_exhausted`.",
        ),
    )


_TARGET = "targets.<name>"
_CLIENT = "clients.<name>"
_SESSIONS = "clients.<name>.sessions"

CONFIG: tuple[Setting, ...] = (
    Setting("targets", "map", "The upstreams, by name.", required=True),
    Setting(
        f"{_TARGET}.baseUrl",
        "URL",
        "Upstream base URL (http or https, may carry a path); calls go to `baseUrl + path`.",
        required=True,
    ),
    Setting(
        f"{_TARGET}.defaultHeaders",
        "map",
        "Headers on every call to this target; a client header of the same name overrides one.",
    ),
    Setting(
        f"{_TARGET}.caBundle",
        "path",
        "PEM file of the CA(s) this target's certificate must chain to, instead of the default.",
    ),
    Setting(
        f"{_TARGET}.clientCert",
        "path",
        "PEM certificate presented to an upstream that requires mutual TLS.",
    ),
    Setting(
        f"{_TARGET}.clientKey",
        "path",
        "Unencrypted PEM private key of `clientCert` (left out when it is in that file).",
    ),
    *_limits(_TARGET, "for all clients of this target together"),
    Setting(
        f"{_TARGET}.injectUsage",
        "boolean",
        "Ask an OpenAI-style stream to report its usage when a token budget applies.",
        default=True,
    ),
    Setting(
        "secrets",
        "map",
        "Secrets by name, each a string with `${VAR}` references to the environment or "
        "`.env`; a variable unset or a secret empty is an error.",
    ),
    Setting(
        "clients",
        "map",
        "The clients, by name (or, seed style, by plaintext key).",
        required=True,
    ),
    Setting(
        f"{_CLIENT}.keys",
        "list of key items",
        "`sha256:<hex>` of each key the client accepts, or a map with `sha256`, `expires`, "
        "`notBefore`.",
    ),
    Setting(f"{_CLIENT}.name", "string", "A seed-style client's name in logs and messages."),
    Setting(f"{_CLIENT}.target", "target name", "The target this client may reach.", None, True),
    Setting(
        f"{_CLIENT}.authHeaderRef",
        "secret name",
        "Secret sent as `Authorization`, after the client's headers (never overridden).",
    ),
    Setting(
        f"{_CLIENT}.rapidApiKeyRef",
        "secret name",
        "Secret sent as `X-RapidAPI-Key`, after the client's headers.",
    ),
    Setting(
        f"{_CLIENT}.secretHeaders",
        "map",
        "Any other header name -> secret name, sent after the client's headers.",
    ),
    Setting(
        f"{_CLIENT}.allowedMethods",
        "list of strings",
        'Methods the client may use, or `"*"`; never empty.',
        required=True,
    ),
    Setting(
        f"{_CLIENT}.allowedPaths",
        "list of strings",
        "Paths: exact, `*` one segment, `**` any number of segments; never empty.",
        required=True,
    ),
    Setting(
        f"{_CLIENT}.allowedOrigins",
        "list of strings",
        'Browser origins that may use the client\'s keys, or `"*"`; none by default.',
    ),
    _integer(
        f"{_CLIENT}.timeoutMs",
        (1, 3_600_000),
        "How long to wait for the upstream's first byte and between bytes (a stream that "
        "keeps sending is never cut).",
        default=30_000,
    ),
    _integer(
        f"{_CLIENT}.connectTimeoutMs",
        (1, 600_000),
        "How long to wait for the TCP and TLS connection.",
        default=5_000,
    ),
    *_limits(_CLIENT, "for this client"),
    Setting(
        f"{_CLIENT}.allowedModels",
        "list of strings",
        "Models the client may name (`*` matches any run of characters); any when left out.",
    ),
    _integer(
        f"{_CLIENT}.maxTokens",
        (1, 100_000_000),
        "The largest output ceiling (`max_tokens`) a call may ask for; a call must set one.",
    ),
    Setting(
        f"{_SESSIONS}.ttl", "duration", "Longest token it mints (`90s`, `15m`; 24h at most).", "15m"
    ),
    *_limits(_SESSIONS, "for each end user of this client's session tokens"),
    Setting(f"{_SESSIONS}.notBefore", "date-time", "Its session tokens minted before are refused."),
    _integer(
        "maxRequestBytes",
        (1024, 2**40),
        "Largest request body, however it is framed; over it, `413 request_too_large`.",
        default=10 * 1024 * 1024,
        shown="10 MiB",
    ),
    _integer(
        "bodyTimeoutMs",
        (100, 3_600_000),
        "Deadline for a client's whole request body; past it, `408 request_timeout`.",
        default=30_000,
    ),
    _integer(
        "writeTimeoutMs",
        (100, 3_600_000),
        "A client that accepts no byte of the answer this long is disconnected.",
        default=60_000,
    ),
    Setting(
        "egressGuard",
        "boolean",
        "Refuse an answer that holds a secret (`502 secret_in_response`).",
        default=True,
    ),
    Setting(
        "limits.storage",
        "string",
        "Where limit counts live: `sqlite` (the instance folder), `sqlite:////path`, "
        "`redis://host:port/db`.",
        default="sqlite",
    ),
    Setting(
        "limits.failOpen",
        "boolean",
        "When the storage is down, admit calls uncounted instead of `503 limits_unavailable`.",
        default=False,
    ),
    _integer(
        "upstreamIdleMs",
        (0, 600_000),
        "A pooled upstream connection idle this long is closed, not reused; `0` never reuses.",
        default=4_000,
    ),
    _integer(
        "trustedProxies",
        (0, 16),
        "How many proxies in front add to `X-Forwarded-For`; 0 ignores forwarded headers.",
        default=0,
    ),
    Setting(
        "metrics.tokenRef",
        "secret name",
        "Secret (16+ characters) that `GET /metrics` requires as a bearer token; without "
        "`metrics`, no `/metrics`.",
    ),
    _integer(
        "metrics.maxModelLabels",
        (0, 100_000),
        "Distinct values of the `model` label each worker keeps; clients choose model names, "
        'so further names count under `model="other"`.',
        default=100,
    ),
    Setting("sessionSecretRef", "secret name", "Secret (32+ characters) signing session tokens."),
    Setting("sessionSecretRefs", "list of secret names", "Instead, rotating: `[new, old]`."),
)

ENVIRONMENT: tuple[Setting, ...] = (
    Setting(
        "GATEWAY_CONFIG",
        "path",
        "The config file.",
        shown="`instance/config.yaml`",
    ),
    Setting(
        "GATEWAY_ENV_FILE",
        "path",
        "The `.env` file secrets are read from (real environment variables win over it).",
        shown="`.env` in the project folder",
    ),
    Setting(
        "GATEWAY_LOG_FORMAT",
        "`json` or `text`",
        "The access log's format on stdout.",
        default="json",
    ),
    Setting("GATEWAY_BIND", "address", "Where gunicorn listens.", default="127.0.0.1:8787"),
    Setting(
        "GATEWAY_WORKERS",
        "integer",
        "gunicorn worker processes.",
        shown="the number of cores",
    ),
    Setting(
        "GATEWAY_WORKER_CLASS",
        "string",
        "gunicorn's worker class; gevent holds hundreds of open streams per worker.",
        default="gevent",
    ),
    Setting(
        "GATEWAY_WORKER_CONNECTIONS",
        "integer",
        "Open requests (streams included) per gevent worker.",
        default=1000,
    ),
    Setting(
        "GATEWAY_THREADS",
        "integer",
        "Threads per worker, used only with `GATEWAY_WORKER_CLASS=gthread`.",
        default=1,
    ),
    Setting(
        "GATEWAY_WORKER_TIMEOUT",
        "integer",
        "Seconds without a heartbeat before a worker is restarted; also how long a "
        "concurrency slot of a killed worker stays held.",
        default=30,
    ),
    Setting(
        "GATEWAY_GRACEFUL_TIMEOUT",
        "integer",
        "Seconds in-flight calls may go on after a restart or reload begins.",
        default=120,
    ),
    Setting(
        "GATEWAY_KEEPALIVE",
        "integer",
        "Seconds an idle client connection is held open.",
        default=5,
    ),
    Setting(
        "GATEWAY_POOL_SIZE",
        "integer",
        "Upstream connections each worker keeps for reuse; gunicorn.conf.py sets it to the "
        "worker's concurrency.",
        default=100,
    ),
    Setting("GATEWAY_LOG_LEVEL", "string", "gunicorn's error log level.", default="info"),
    Setting(
        "GATEWAY_ERROR_LOG",
        "path",
        "gunicorn's error log; `-` is stderr.",
        default="-",
    ),
    Setting(
        "GATEWAY_CONTROL_SOCKET",
        "path",
        "gunicorn's control socket (for `gunicornc`); off when unset.",
    ),
    Setting(
        "GATEWAY_CHECKED_CONFIG_FD",
        "file descriptor",
        "Set by gunicorn.conf.py, never by hand: the config its master checked, which every "
        "worker builds from instead of reading the file.",
    ),
    Setting(
        "GATEWAY_EXPLAIN_KEY",
        "string",
        "The client key `flask explain` sends when `--key` is not given.",
    ),
)

# The config's settings for the whole gateway that have a default (check-config shows
# those a config changes).
GLOBAL: tuple[Setting, ...] = tuple(s for s in CONFIG if "<" not in s.key and s.default is not None)

_BY_KEY = {s.key: s for s in (*CONFIG, *ENVIRONMENT)}


def setting(key: str) -> Setting:
    """Return the setting named ``key`` (a config path or a variable)."""
    return _BY_KEY[key]


def default(key: str) -> Any:
    """Return the default of the setting named ``key``."""
    return _BY_KEY[key].default


def markdown_table(settings: tuple[Setting, ...]) -> str:
    """Return the reference table of ``settings``: key, kind, default, meaning."""
    rows = ["| key | kind | default | meaning |", "| --- | --- | --- | --- |"]
    for s in settings:
        kind = s.kind if s.low is None else f"{s.kind} ({s.low:,} to {s.high:,})"
        rows.append(f"| `{s.key}` | {kind} | {s.default_text()} | {s.meaning} |")
    return "\n".join(rows)
