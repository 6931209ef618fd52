"""Find policy files, read them, and build a ``PolicySet`` (or every problem).

``policies:`` in the config names a directory (or one file).  Policy files are
the ``*.yaml``/``*.yml`` files directly in it, in name order; subdirectories
(``tests/``, pin lock files) and ``*.lock.*`` files are not policy.  Reading and
building are separate so the hot-reload watcher can hash what it read and
build aside, off the event loop.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Iterable

from ..config.yamlloc import Loc, load_text
from ..errors import ConfigError, Problem
from .model import KINDS, PolicySet, RuleIndex, ServerPolicy
from .parse import Counter, ServerDraft, parse_file

POLICY_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True, slots=True)
class Sources:
    """The raw text of every policy file, and a digest over all of it."""

    root: str
    files: tuple[tuple[str, str], ...]
    digest: str


def policy_files(root: str) -> list[str]:
    if os.path.isfile(root):
        return [root]
    out = []
    with os.scandir(root) as it:
        for entry in it:
            name = entry.name
            if (name.startswith(".") or not name.endswith(POLICY_SUFFIXES) or ".lock." in name
                    or not entry.is_file()):
                continue
            out.append(entry.path)
    return sorted(out)


def read_sources(root: str) -> tuple[Sources | None, list[Problem]]:
    if not os.path.exists(root):
        return None, [Problem(Loc(root, 1, 1), "policies path does not exist")]
    try:
        paths = policy_files(root)
    except OSError as exc:
        return None, [Problem(Loc(root, 1, 1), f"cannot list policies: {exc.strerror}")]
    files, problems, h = [], [], hashlib.sha256()
    for path in paths:
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            problems.append(Problem(Loc(path, 1, 1), f"cannot read file: {exc.strerror}"))
            continue
        except UnicodeDecodeError:
            problems.append(Problem(Loc(path, 1, 1), "file is not valid UTF-8"))
            continue
        files.append((path, text))
        h.update(path.encode() + b"\0" + text.encode() + b"\0")
    return Sources(root, tuple(files), h.hexdigest()), problems


def build(sources: Sources, known_servers: Iterable[str] | None) -> tuple[PolicySet | None, list[Problem]]:
    """Parse every file; return the set only if there was no problem at all."""
    problems: list[Problem] = []
    drafts: dict[str, ServerDraft] = {}
    order = Counter()
    known = tuple(known_servers) if known_servers is not None else None
    for path, text in sources.files:
        node, file_problems = load_text(text, path)
        problems.extend(file_problems)
        if node is not None or not file_problems:
            parse_file(node, path, problems, drafts, known, order)
    rules_by_id = {}
    limit_ids: dict = {}
    for draft in drafts.values():
        for kind in KINDS:
            for rule in draft.rules[kind]:
                first = rules_by_id.get(rule.id)
                if first is not None:
                    problems.append(Problem(rule.loc, f"duplicate rule id {rule.id!r} (first used at "
                                                      f"{first.loc}); test cases and audit records "
                                                      "name rules by id"))
                else:
                    rules_by_id[rule.id] = rule
        for limit in draft.limits:
            first = rules_by_id.get(limit.id) or limit_ids.get(limit.id)
            if first is not None:
                problems.append(Problem(limit.loc, f"duplicate id {limit.id!r} (first used at {first.loc})"))
            else:
                limit_ids[limit.id] = limit
    if problems:
        return None, problems
    servers = {}
    for name, d in drafts.items():
        rules = {k: tuple(d.rules[k]) for k in KINDS}
        servers[name] = ServerPolicy(name=name, loc=d.loc, default=d.default, destructive=d.destructive,
                                     rules=rules, index={k: RuleIndex(v) for k, v in rules.items()},
                                     limits=d.limits)
    files = tuple(p for p, _ in sources.files)
    return PolicySet(servers=servers, files=files, digest=sources.digest, rules_by_id=rules_by_id), []


def load_policies(root: str, known_servers: Iterable[str] | None = None) -> tuple[PolicySet | None, list[Problem]]:
    sources, problems = read_sources(root)
    if sources is None or problems:
        return None, problems
    return build(sources, known_servers)


def load_policies_strict(root: str, known_servers: Iterable[str] | None = None) -> PolicySet:
    """Load or raise ``ConfigError`` listing every problem (for ``serve`` at start)."""
    policy_set, problems = load_policies(root, known_servers)
    if policy_set is None:
        raise ConfigError(problems)
    return policy_set
