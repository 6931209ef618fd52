"""Bench-only ablation (never loaded by the product): the per-request metric work switched off.

The gateway has no switch for its metrics; to measure what "logging, audit and metrics on"
costs against all three off, the ``gateway-dark`` target runs the gateway through
``bench.instr _preload`` with this file, which replaces the per-request bookkeeping
(``telemetry.audit.start``/``finish``: in-flight gauge, request, duration, overhead and
upstream-wait tallies, and the audit record) with nothing.  Counters bumped elsewhere on
rare paths (refusals, pin events) stay.
"""
import gateway.stages.authz as _authz
import gateway.telemetry.audit as _audit

_audit.start = lambda ex: None
_audit.finish = lambda *args, **kwargs: None
_authz.Authz.count_call = lambda self, ex: None
