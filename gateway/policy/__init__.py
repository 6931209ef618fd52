"""Policies as code: per-server rules for tools, resources, prompts and methods.

``load`` reads a directory of YAML files into a frozen ``PolicySet``;
``decide`` answers one call (and, with ``ANY`` arguments, one list entry);
``lint`` finds dead rules for ``mcp-gateway check``; ``reload`` swaps sets
atomically on file change or SIGHUP.  The language is documented in
docs/policy.md.
"""
from .decide import ANY, Decision, decide
from .load import load_policies, load_policies_strict
from .model import PolicySet

__all__ = ["ANY", "Decision", "PolicySet", "decide", "load_policies", "load_policies_strict"]
