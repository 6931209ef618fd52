"""Reading poisoning rule files: the built-in ``poisoning_rules.yaml`` and users' files.

Files are merged in order by rule id (a later file changes or disables a rule,
or adds one); detectors are configured by name.  Every problem is collected
with its ``file:line`` so ``mcp-gateway check`` reports them all at once.
"""
from __future__ import annotations

from typing import Any

from ..config.reader import Reader
from ..config.yamlloc import LList, Loc, load_file
from ..errors import Problem
from .poisoning import DETECTORS, RULE_ID, SEVERITIES


def read_rules_file(path: str, rules: dict[str, dict[str, Any]], detectors: dict[str, dict[str, Any]],
                     problems: list[Problem]) -> None:
    node, file_problems = load_file(path)
    problems.extend(file_problems)
    if node is None:
        return
    r = Reader(node, problems, "", Loc(path, 1, 1))
    version = r.int("version", 1)
    if version != 1:
        r.error("version", f"unsupported rules file version {version} (this gateway reads version 1)")
    det = r.mapping("detectors")
    for name in list(det.node):
        det.seen.add(name)
        if name not in DETECTORS:
            det.error(name, f"unknown detector {name!r} (known: {', '.join(sorted(DETECTORS))})")
            continue
        d = Reader(det.node[name], problems, f"detectors.{name}", det.at(name))
        spec = detectors[name]
        if d.has("severity"):
            spec["severity"] = d.str("severity", choices=SEVERITIES)
        spec["enabled"] = d.bool("enabled", spec.get("enabled", True))
        for param, default in DETECTORS[name].items():
            spec[param] = d.int(param, spec.get(param, default), min=1)
        d.done()
    items = r.list("rules")
    for i, item in enumerate(items):
        s = Reader(item, problems, f"rules[{i}]", items.at(i) if isinstance(items, LList) else None)
        rid = s.str("id", required=True, pattern=RULE_ID)
        if rid is None:
            s.done()
            continue
        if rid in DETECTORS:
            s.error("id", f"rule id {rid!r} is a detector name; configure it under detectors:")
        spec = rules.setdefault(rid, {"loc": s.loc})
        if spec.get("_file") == path:
            s.error("id", f"duplicate rule id {rid!r} in this file (first at line {spec['loc'].line})")
        spec["_file"] = path
        for key, getter in (("severity", lambda k: s.str(k, choices=SEVERITIES)),
                            ("message", s.str), ("pattern", s.str),
                            ("where", lambda k: s.str(k, choices=("text", "description"))),
                            ("enabled", s.bool), ("case_sensitive", s.bool),
                            ("triggers", s.str_list)):
            if s.has(key):
                value = getter(key)
                if value is not None:
                    spec[key] = value
            else:
                s.seen.add(key)
        if s.has("pattern"):
            spec["loc"] = s.at("pattern")
        s.done()
    r.done()
