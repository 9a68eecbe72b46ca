"""The one exception type for problems with the user's data, URLs or credentials."""


class DataError(Exception):
    """Bad data, an unreachable or malformed URL, missing credentials. The message is one line for people."""


class ObjectNotFound(DataError):
    """A named object (file or S3 key) does not exist; callers that expect absence can catch this alone."""


def first_line(error: BaseException | str) -> str:
    """The first line of a message, or of an exception's (its type's name when it has none): errors are
    one line."""
    text = str(error).strip()
    if text:
        return text.splitlines()[0]
    return "" if isinstance(error, str) else type(error).__name__
