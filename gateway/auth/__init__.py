"""Token termination: the gateway as an OAuth 2.1 resource server."""
