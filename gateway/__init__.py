"""mcp-gateway: a security-enforcing MCP (Model Context Protocol) gateway."""

__version__ = "0.1.0"
