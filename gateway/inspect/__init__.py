"""Response-direction inspection: SSE framing, tool pinning, poisoning scan."""
