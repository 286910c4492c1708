"""Errors a user can cause. The CLI prints them as one line and exits 1; anything else is a bug."""


class CgtoolsError(Exception):
    """Base class of every error that is the user's to fix (bad input, bad file, impossible config)."""


class ConfigError(CgtoolsError, ValueError):
    """Impossible or inconsistent parameters (e.g. more synonyms than the vocabulary allows)."""


class InputError(CgtoolsError):
    """An input file is missing, unreadable, or not what the command expects."""


class SchemaError(InputError):
    """An input file is readable but has the wrong columns, shapes or metadata."""


class OutputError(CgtoolsError):
    """An output cannot be written (exists without --force, binary data to a terminal, ...)."""


class MissingDependencyError(ConfigError):
    """An optional package (of the `text` or `images` extra) is not installed."""


def require_modules(what: str, modules: list[str] | tuple[str, ...], extra: str) -> None:
    """MissingDependencyError naming the extra ("pip install 'cgtools[EXTRA]'") unless every module
    can be imported; checked with importlib.util.find_spec, without importing them."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependencyError(f"{what} needs {', '.join(missing)}: pip install 'cgtools[{extra}]'")
