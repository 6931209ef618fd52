"""Virtual servers: one mount that publishes a namespaced union of several (``config.virtual``)."""
