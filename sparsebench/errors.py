"""The one exception type for user errors; the CLI prints it as a single line."""


class ConfigError(ValueError):
    """A user error (bad override, missing data, no GPU for a GPU backend): one clear line."""


def require(ok: bool, key: str, value: object, allowed: str) -> None:
    """Raise ConfigError("key=value is not allowed: allowed") unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")
