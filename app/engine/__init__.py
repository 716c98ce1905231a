"""The engine: everything that turns tokens into tokens; no web, database or worker code."""
