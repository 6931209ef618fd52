"""``servers.<name>.scan_results``: which answers of a server are scanned for prompt injection.

    servers:
      github:
        scan_results: true              # every tool result and resource read, action annotate
      files:
        scan_results:
          action: mask                  # annotate (default) | mask | block
          tools: ["read_*", "search"]   # tool-name globs: true (default, every tool), false, or globs
          resources: ["file:///srv/**"] # resources/read: true (default), false, or URI globs
          min_severity: high            # findings below this are not acted on (default high)
          max_chars: 262144             # characters scanned per message; past it: fail closed

Off unless configured, like ``mask_secrets``: scanning rewrites what the model reads, so an
operator turns it on knowing which servers relay third-party text.  The rules are the
server's poisoning rule set (``pinning.rules`` over the built-in file), restricted to the
results profile (``result_scan.RESULT_RULES``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config.reader import Reader
from ..config.yamlloc import Loc
from .poisoning import SEVERITIES
from .result_scan import ResultScanner

ACTIONS = ("annotate", "mask", "block")
DEFAULT_MAX_CHARS = 256 * 1024


@dataclass(frozen=True, slots=True)
class ScanResults:
    action: str = "annotate"
    tools: tuple[Any, ...] = ()          # compiled globs (gateway.policy.glob)
    resources: tuple[Any, ...] = ()      # compiled URI globs; () for none
    min_severity: str = "high"
    max_chars: int = DEFAULT_MAX_CHARS
    scanner: ResultScanner | None = None
    loc: Loc | None = None

    def covers_every_tool(self) -> bool:
        return len(self.tools) == 1 and self.tools[0].text == "**"     # the default

    def covers_tool(self, name: str) -> bool:
        return self.covers_every_tool() or any(g.regex.fullmatch(name) for g in self.tools)

    def covers_resource(self, uri: str) -> bool:
        return any(g.regex.fullmatch(uri) for g in self.resources)


_SCANNERS: dict[tuple[int, str], ResultScanner] = {}


def parse_scan_results(s: Reader, rules: Any) -> ScanResults | None:
    """Read ``scan_results`` of one server; ``rules`` is its compiled poisoning ``RuleSet``."""
    if not s.has("scan_results"):
        s.seen.add("scan_results")
        return None
    value = s.node["scan_results"]
    if value is False:
        s.seen.add("scan_results")
        return None
    if value is True:
        s.seen.add("scan_results")
        sub = Reader(None, s.problems, f"{s.path}.scan_results", s.at("scan_results"))
    else:
        sub = s.mapping("scan_results")
    action = sub.str("action", "annotate", choices=ACTIONS)
    tools = _globs(sub, "tools")
    resources = _globs(sub, "resources")
    min_severity = sub.str("min_severity", "high", choices=SEVERITIES)
    max_chars = sub.int("max_chars", DEFAULT_MAX_CHARS, min=1024, max=16 * 1024 * 1024)
    sub.done()
    if rules is None:            # the rule files did not load: reported already
        return None
    key = (id(rules), min_severity)
    scanner = _SCANNERS.get(key)
    if scanner is None:
        scanner = _SCANNERS[key] = ResultScanner(rules, min_severity)
    return ScanResults(action=action, tools=tools, resources=resources,
                       min_severity=min_severity, max_chars=max_chars, scanner=scanner,
                       loc=sub.loc)


def _globs(sub: Reader, key: str) -> tuple[Any, ...]:
    """true (everything, the default), false (nothing) or a list of globs."""
    from ..policy.glob import compile_glob

    value = sub.node.get(key, True)
    if value is True or value is False:
        sub.seen.add(key)
        return (compile_glob("**"),) if value else ()
    return sub.glob_list(key)
