"""One base for every error accord reports to a user, with the exit code the CLI returns for it.

- :class:`UsageError` (exit 2): the input is wrong — a config field, a file, a line, a model path; the
  message names it and nothing already on disk is touched.
- :class:`RunFailure` (exit 1): the input was fine but the run could not finish — a server down, a
  diverged loss, a collection with failed requests; re-running resumes.
"""

from __future__ import annotations


class AccordError(Exception):
    exit_code = 1


class UsageError(AccordError, ValueError):
    exit_code = 2


class RunFailure(AccordError, RuntimeError):
    exit_code = 1
