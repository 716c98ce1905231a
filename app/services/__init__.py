"""Business logic, free of web imports: routers and workers both call it."""
