"""Policy metrics (module-level singletons, as in gateway.telemetry.metrics).

Reload results are counted by ``mcpgw_config_reloads_total{what="policies"}``
from the telemetry catalogue; decisions are counted here by server, effect and
reason, all from closed sets (server names come from the config).
"""
from __future__ import annotations

from prometheus_client import Counter, Gauge

from ..telemetry.metrics import Tally

POLICY_DECISIONS = Counter(
    "mcpgw_policy_decisions_total",
    "Authorization decisions on calls (tools/call, resources/read, prompts/get, other methods), "
    "by server, effect (allow, deny, step_up) and reason.",
    ["server", "effect", "reason"],
)
DECISIONS_TALLY = Tally(POLICY_DECISIONS)   # (server, effect, reason): counted on every call
TOOL_CALLS = Counter(
    "mcpgw_tool_calls_total",
    "tools/call decisions by server, tool and effect. The tool label is a tool the server listed "
    "or its pins approve (at most limits.max_tools_per_page per server, redacted) or 'other' for "
    "names it never listed.",
    ["server", "tool", "effect"],
)
TOOL_CALLS_TALLY = Tally(TOOL_CALLS)        # (server, tool label, effect)
POLICY_HIDDEN = Counter(
    "mcpgw_policy_hidden_items_total",
    "Tools, resources, templates and prompts removed from list results for the caller, by server.",
    ["server"],
)
POLICY_GENERATION = Gauge(
    "mcpgw_policy_generation", "Policy set generation in force (1 at start, +1 per successful reload).",
    multiprocess_mode="max",
)
POLICY_RULES = Gauge("mcpgw_policy_rules", "Rules in the policy set in force.", multiprocess_mode="max")
POLICY_LAST_RELOAD = Gauge(
    "mcpgw_policy_last_reload_timestamp_seconds", "When the policy set in force was loaded.",
    multiprocess_mode="max",
)
