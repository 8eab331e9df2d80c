"""Logging for migsecd: stderr, journald-friendly.

Under systemd (``JOURNAL_STREAM`` set) the journal adds its own timestamps, so
lines carry only a syslog level prefix like ``<6>``, which journald turns into
the entry's priority. Elsewhere lines get a timestamp.
"""
from __future__ import annotations

import logging
import os
import sys

_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


class JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_PRIORITY.get(record.levelno, 6)}>"
        text = super().format(record)
        # one journal entry per line: continuation lines get the prefix too
        return "\n".join(prefix + line for line in text.splitlines())


def setup_logging(level: int = logging.INFO, *, environ: dict[str, str] | None = None) -> None:
    env = os.environ if environ is None else environ
    handler = logging.StreamHandler(sys.stderr)
    if env.get("JOURNAL_STREAM"):
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
