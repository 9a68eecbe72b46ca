"""The one exception type for problems with the user's data, URLs or credentials."""


class DataError(Exception):
    """Bad data, an unreachable or malformed URL, missing credentials. The message is one line for people."""


class ObjectNotFound(DataError):
    """A named object (file or S3 key) does not exist; callers that expect absence can catch this alone."""
