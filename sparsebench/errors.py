"""The exception for user errors, which the CLI prints as a single line, and the stop request."""


class ConfigError(ValueError):
    """A user error (bad override, missing data, no GPU for a GPU backend): one clear line."""


class StopRequested(BaseException):
    """Training saved a checkpoint and stopped on SIGTERM. Not an Exception, like KeyboardInterrupt: a
    sweep stops with it instead of recording one failed job and starting the next."""


def require(ok: bool, key: str, value: object, allowed: str) -> None:
    """Raise ConfigError("key=value is not allowed: allowed") unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")
