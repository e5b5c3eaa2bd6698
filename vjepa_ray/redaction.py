"""Credentials never leave the process: ``redact`` is applied to everything the package writes or logs.

A user may put a credential where the package only sees a string: ``s3://KEY:SECRET@bucket/...`` (pyarrow
reads the key pair from the URI), ``https://user:password@mlflow/``, a presigned URL's ``X-Amz-Signature``
query, or a ``deepspeed.overrides`` entry such as ``comet: {api_key: ...}``. Configs, summaries, prepared
manifests, MLflow parameters and log lines are shared, so every one of them goes through ``redact`` first;
the process itself keeps the real values to reach the stores with. ``install_log_redaction`` puts ``redact``
in front of every log record a process creates.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any

MASK = "***"
_TRACEBACKS = logging.Formatter()

# The user information of a URI ("user:password@"): percent-encoded, so it holds no "/", "@", "?" or "#".
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)[^/\s@?#]+@")
_QUERY_PAIR = re.compile(r"(?P<sep>[?&])(?P<key>[^=&\s#]+)=(?P<value>[^&\s#]*)")
# Names of values that are secrets: anywhere in the name, or (short, common words) as a whole word of it.
_SECRET_NAME = re.compile(r"password|passwd|secret|credential|signature|api[_-]?key|access[_-]?key|private[_-]?key"
                          r"|(?:^|[_.\-])(?:token|sig|pwd|auth)(?:[_.\-]|$)", re.IGNORECASE)
_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def is_secret_name(name: str) -> bool:
    """Whether a key or query parameter named ``name`` holds a secret (``session_token``, ``X-Amz-Signature``)."""
    return bool(_SECRET_NAME.search(_CAMEL_BOUNDARY.sub("_", name)))


def redact_text(text: str) -> str:
    """``text`` with the user information of every URI in it and the values of secret query keys masked."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    return _QUERY_PAIR.sub(lambda m: f"{m['sep']}{m['key']}={MASK}" if is_secret_name(m["key"]) else m[0], text)


def redact(value: Any) -> Any:
    """A copy of ``value`` (text, or a tree of dataclasses, dicts, lists and scalars, e.g. a ``Config``) safe
    to write: URIs as in ``redact_text``, and every value under a secret-looking dict key masked."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{field.name: redact(getattr(value, field.name))
                                             for field in dataclasses.fields(value) if field.init})
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {key: MASK if isinstance(key, str) and is_secret_name(key) and not isinstance(item, (dict, list))
                else redact(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(item) for item in value)
    return value


def install_log_redaction() -> None:
    """Every log record this process creates from now on carries its message redacted (``redact_text``),
    whatever logger and handler it goes to. Idempotent."""
    factory = logging.getLogRecordFactory()
    if getattr(factory, "redacts", False):
        return

    def redacting_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # bad arguments: logging reports them when the record is emitted
            return record
        redacted = redact_text(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            # Handlers format a traceback once and keep the text here: the error's message may hold a URI.
            record.exc_text = redact_text(_TRACEBACKS.formatException(record.exc_info))
        return record

    redacting_factory.redacts = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(redacting_factory)
