"""Secret redaction for everything that leaves the process as text.

Applied as the last structlog processor before rendering, so no call site can
forget it.  Two rules: values under sensitive-looking keys are replaced
whole; string values anywhere are scrubbed of things that look like bearer
tokens, JWTs, API keys or credentials in URLs.  Metrics never carry free text
(labels come from closed sets), so they need no scrubbing.
"""
from __future__ import annotations

import re
from typing import Any

REDACTED = "[REDACTED]"

_SENSITIVE_KEY = re.compile(
    r"(?i)(authorization|cookie|password|passwd|secret|token|api[_-]?key|apikey|"
    r"private[_-]?key|credential|session[_-]?key|client[_-]?assertion|bearer|code[_-]?verifier|^code$)"
)
# Keys that match the pattern above but only ever hold non-secret values.
_SAFE_KEYS = frozenset({
    "token_type", "token_kind", "token_hash", "tokens", "max_tokens",
    "token_cache", "token_source", "secret_ref", "credential_kind",
})

# Linear on any text: every token pattern starts only where a token can start (the
# look-behind), so a run like "eyJeyJeyJ…" is tried once, not once per position, and
# quantifiers are possessive where what follows cannot be part of the run.
_B = r"(?<![A-Za-z0-9_-])"
_KEYS = r"access_token|refresh_token|id_token|client_secret|api_key|apikey|code_verifier|password|passwd|pwd|secret|token"
_SECRET_VALUE = re.compile(
    r"(?i)(?<![a-z])bearer\s++[A-Za-z0-9._~+/=-]{8,}+"          # Authorization: Bearer …
    r"|(?<![a-z])basic\s++[A-Za-z0-9+/]{8,}+=*+"               # Authorization: Basic …
    r"|" + _B + r"eyJ[A-Za-z0-9_-]{5,}+\.[A-Za-z0-9_-]{5,}+\.[A-Za-z0-9_-]*+"   # JWT / JWS
    r"|" + _B + r"(?:sk|pk|rk)-[A-Za-z0-9_-]{16,}+"            # OpenAI/Anthropic-style keys
    r"|" + _B + r"(?:sk|pk|rk)_(?:live|test)_[A-Za-z0-9]{16,}+"   # Stripe keys
    r"|" + _B + r"gh[pousr]_[A-Za-z0-9]{20,}+"                 # GitHub tokens
    r"|" + _B + r"github_pat_[A-Za-z0-9_]{20,}+"               # GitHub fine-grained tokens
    r"|" + _B + r"glpat-[A-Za-z0-9_-]{20,}+"                   # GitLab tokens
    r"|" + _B + r"npm_[A-Za-z0-9]{36}"                         # npm tokens
    r"|" + _B + r"xox[abposr]-[A-Za-z0-9-]{10,}+"              # Slack tokens
    r"|" + _B + r"(?:AKIA|ASIA)[0-9A-Z]{16}"                   # AWS access key ids
    r"|" + _B + r"AIza[0-9A-Za-z_-]{30,}+"                     # Google API keys
    r"|AccountKey=[^;\s]++"                                    # Azure storage connection strings
    # A PEM private key, whole: its base64 body holds no '-', so [^-]*+ runs to the END line.
    r"|-----BEGIN [A-Z ]{0,40}PRIVATE KEY-----[^-]*+(?:-----END [A-Z ]{0,40}PRIVATE KEY-----)?+"
    r"|(?<=://)[^/\s:@]++:[^/\s@]++(?=@)"                     # user:password@ in URLs, connection strings
    r"|(?<![A-Za-z_])(?:" + _KEYS + r")\s*+[=:]\s*+[^&\s,;\"'}]++"   # key=value, key: value
    r"|\"(?:" + _KEYS + r"|token|code|refresh|authorization)\"\s*+:\s*+\"[^\"\\]*+\""  # "key": "value"
    r"|(?<=[?&])code=[^&\s#]++"                                # OAuth authorization code in a URL
)


# Every pattern above contains one of these (in lower case); substring tests cost ~40 ns
# where the regex costs ~0.4 µs per character, and almost no logged string holds any.
_MARKERS = ("=", "@", "k-", "eyj", "bearer", "basic", "gh", "xox", "akia", "asia", "aiza", "private",
            "_live_", "_test_", "glpat", "npm_", "token", "secret", "passw", "pwd", "api_key", "apikey",
            "code", "authorization")

# Operator additions (``logging.redact``): field names whose values are secrets, and
# patterns of their own secret formats.  Set once at start by ``configure``.
_EXTRA_FIELDS: frozenset[str] = frozenset()
_EXTRA: re.Pattern[str] | None = None


def configure(fields: tuple[str, ...] = (), patterns: tuple[str, ...] = ()) -> None:
    """Add the operator's field names and patterns (patterns were validated by the config loader)."""
    global _EXTRA_FIELDS, _EXTRA
    _EXTRA_FIELDS = frozenset(f.lower() for f in fields)
    _EXTRA = re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None
    _MEMO.clear()
    _KEY_VERDICTS.clear()


# Longer texts are cut before they are scanned (and logged): the scan is linear, but a
# client-chosen megabyte would still cost ~0.3 s of event loop per log line.
MAX_SCRUB_CHARS = 16384


def scrub(text: str) -> str:
    """Replace anything that looks like a credential inside ``text`` (cut to ``MAX_SCRUB_CHARS``)."""
    if len(text) > MAX_SCRUB_CHARS:
        text = f"{text[:MAX_SCRUB_CHARS]}…[{len(text) - MAX_SCRUB_CHARS} more characters not logged]"
    if _EXTRA is not None:
        text = _EXTRA.sub(REDACTED, text)
    lower = text.lower()
    for marker in _MARKERS:
        if marker in lower:
            return _SECRET_VALUE.sub(REDACTED, text)
    return text


def mask(text: str) -> tuple[str, int]:
    """Every secret in ``text`` replaced, and how many (no length cut: for relayed content)."""
    n = 0
    if _EXTRA is not None:
        text, n = _EXTRA.subn(REDACTED, text)
    lower = text.lower()
    for marker in _MARKERS:
        if marker in lower:
            text, m = _SECRET_VALUE.subn(REDACTED, text)
            return text, n + m
    return text, n


# Texts seen before and what scrub() made of them.  Most logged strings repeat (tool
# names, principals, issuers, rule ids), so a dict lookup replaces the marker scan.
# Bounded in entries and in text length: clients choose some of these strings.
_MEMO: dict[str, str] = {}
_MEMO_MAX = 4096
_MEMO_TEXT_MAX = 256


def scrub_text(text: str) -> str:
    """``scrub(text)`` for texts of 8 characters or more, ``text`` itself for shorter ones; memoised."""
    out = _MEMO.get(text)
    if out is None:
        out = scrub(text) if len(text) >= 8 else text
        if len(text) <= _MEMO_TEXT_MAX:
            if len(_MEMO) >= _MEMO_MAX:
                _MEMO.clear()       # a client cycling through names costs a rescan, never memory
            _MEMO[text] = out
    return out


_KEY_VERDICTS: dict[str, bool] = {}


def sensitive_key(key: str) -> bool:
    """Whether values under ``key`` are secrets; cached (keys come from a small set)."""
    verdict = _KEY_VERDICTS.get(key)
    if verdict is None:
        verdict = key.lower() in _EXTRA_FIELDS or (key not in _SAFE_KEYS and bool(_SENSITIVE_KEY.search(key[:128])))
        if len(_KEY_VERDICTS) < 4096:
            _KEY_VERDICTS[key] = verdict
    return verdict


def redact_value(key: str, value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        if sensitive_key(key):
            return REDACTED if value else value
        return scrub_text(value)
    if depth > 6:
        return value
    if isinstance(value, dict):
        return {k: redact_value(str(k), v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_value(key, v, depth + 1) for v in value]
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    return redact_value(key, str(value), depth + 1)


def redact_processor(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: scrub every field of the event."""
    for key, value in event.items():
        if isinstance(value, str):
            if sensitive_key(key):
                event[key] = REDACTED if value else value
            elif len(value) >= 8:
                event[key] = scrub(value)
        elif not (value is None or isinstance(value, (int, float, bool))):
            event[key] = redact_value(key, value)
    return event
