"""The vocabulary the daemon and observability share: the agent's states and its workers'
progress records.

Below both ``agent.daemon`` and ``agent.observe``, so that observability never imports the
daemon it observes. Imports nothing from ``agent`` but ``agent.errors`` and
``agent.worker.protocol`` (no torch).
"""
