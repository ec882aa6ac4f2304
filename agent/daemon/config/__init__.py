"""Configuration and the command line: every flag in one table (``options``), value parsers,
the layers that make an ``AgentConfig`` (flags > environment > TOML > defaults), the
console routing of worker output, the default node id, and docs/configuration.md
rendered from the table (``reference``). Read once at start; the loop never reaches here.
"""
