"""Per-server ``pinning`` settings (parsed here, enforced by ``gateway.stages.pinning``).

::

    servers:
      github:
        url: ...
        pinning:
          mode: tofu                 # off | warn | enforce | tofu   (default: tofu)
          lock_file: github.lock.yaml  # default <pins dir>/<server>.lock.yaml
          findings: {medium: block}  # per poisoning severity: block | warn | ignore
          rules: [extra-rules.yaml]  # poisoning rule files merged over the built-in ones
          ignore_fields: []          # top-level tool fields left out of the fingerprint
          recheck_after: 5m          # a call re-fetches the live definitions after this long

Why ``tofu`` is the default: it is the strictest mode that needs no setup.
The first tool set the gateway sees is pinned (in the shared store) and every
later change to it (a description, a schema, an annotation, a tool added,
removed or renamed) is held until an operator approves it; the first set is
still scanned for poisoning.  ``enforce`` is stricter (nothing is trusted
until a lock file says so) but a server without a lock file would expose no
tools at all; a lock file, once written, is authoritative in every mode.
``warn`` and ``off`` loosen this and must be written down.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..config.reader import Reader
from ..config.yamlloc import Loc
from ..errors import ConfigError

MODES = ("off", "warn", "enforce", "tofu")
DEFAULT_MODE = "tofu"
ACTIONS = ("block", "warn", "ignore")
SEVERITIES = ("info", "low", "medium", "high", "critical")
DEFAULT_FINDINGS: Mapping[str, str] = {"critical": "block", "high": "block", "medium": "warn",
                                       "low": "warn", "info": "warn"}
# Fields that can never be left out of a fingerprint: they are the tool.
_UNIGNORABLE = frozenset({"name", "description", "inputSchema", "outputSchema", "annotations", "title"})


@dataclass(frozen=True, slots=True)
class PinningConfig:
    mode: str = DEFAULT_MODE
    lock_file: str | None = None             # as written; resolved against the pins dir
    findings: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_FINDINGS))
    rule_files: tuple[str, ...] = ()         # absolute paths
    rules: Any = None                        # compiled gateway.inspect.poisoning.RuleSet
    ignore_fields: frozenset[str] = frozenset()
    recheck_after: float = 300.0
    loc: Loc | None = None

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def action(self, severity: str) -> str:
        return self.findings.get(severity, "warn")


_RULESETS: dict[tuple[str, ...], Any] = {}


def _ruleset(files: tuple[str, ...], s: Reader) -> Any:
    """Compile (once per distinct file list) the built-in rules plus ``files``."""
    from .poisoning import RuleSet

    if files not in _RULESETS:
        try:
            _RULESETS[files] = RuleSet.load(files)
        except ConfigError as exc:
            s.problems.extend(exc.problems)
            return None
    return _RULESETS[files]


def parse_pinning(s: Reader, ctx: dict[str, Any]) -> PinningConfig:
    if not s.has("pinning"):
        s.seen.add("pinning")
        return PinningConfig(rules=_ruleset((), s), loc=s.loc)
    sub = s.mapping("pinning")
    mode = sub.str("mode", DEFAULT_MODE, choices=MODES)
    lock_file = sub.str("lock_file")
    findings = dict(DEFAULT_FINDINGS)
    fr = sub.mapping("findings")
    for sev in list(fr.node):
        if sev not in SEVERITIES:
            fr.seen.add(sev)
            fr.error(sev, f"unknown severity {sev!r} (known: {', '.join(SEVERITIES)})")
            continue
        findings[sev] = fr.str(sev, findings[sev], choices=ACTIONS)
    fr.done()
    base = ctx.get("base_dir", ".")
    rule_files = tuple(p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p))
                       for p in sub.str_list("rules"))
    ignore = frozenset(sub.str_list("ignore_fields"))
    for name in sorted(ignore & _UNIGNORABLE):
        sub.error("ignore_fields", f"{s.path}.pinning.ignore_fields: {name!r} is what the model reads "
                                   f"and cannot be left out of the fingerprint")
    recheck = sub.duration("recheck_after", 300.0, min=1.0)
    sub.done()
    return PinningConfig(mode=mode, lock_file=lock_file, findings=findings, rule_files=rule_files,
                         rules=_ruleset(rule_files, sub), ignore_fields=ignore - _UNIGNORABLE,
                         recheck_after=recheck, loc=sub.loc)
