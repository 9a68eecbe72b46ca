"""Credentials kept out of what is shown or logged: URLs' user:password@ parts and the values of the
AWS credential variables."""

from __future__ import annotations

import logging
import os
import re

# scheme://user:password@host, also with a password holding "/" (as AWS secret keys may)
_USERINFO = re.compile(r"(?<=://)(?:[^/@:]+:[^@]*|[^/@]*)@")


def redact(url: str) -> str:
    """``url`` with the credentials of a ``scheme://user:password@host`` replaced by ``***``."""
    return _USERINFO.sub("***@", url)


def scrub_credentials(text: str) -> str:
    """``text`` without the values of the AWS credential variables (for anything shown or logged)."""
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        value = os.environ.get(name, "")
        if len(value) >= 8:  # a shorter value is a placeholder, and would mangle ordinary words
            text = text.replace(value, f"<{name}>")
    return redact(text)


class CredentialFilter(logging.Filter):
    """A logging filter that scrubs credentials from every record a handler writes."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = scrub_credentials(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:  # the traceback, as the handler would format it
            record.exc_text = scrub_credentials(logging.Formatter().formatException(record.exc_info))
        return True
