"""Typed errors of the agent. Each carries a one-line message meant for the user, and an exit code."""

EXIT_SUCCEEDED = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PREEMPTED = 3


class AgentError(Exception):
    """Base class of every error the agent raises on purpose."""

    exit_code = EXIT_FAILED


class ConfigError(AgentError):
    """Bad flags, environment or config file. The message names the setting and the expected form."""

    exit_code = EXIT_USAGE


class SpawnError(AgentError):
    """A worker process could not be started (command not found, not executable, ...)."""

    exit_code = EXIT_FAILED
