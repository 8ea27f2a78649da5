"""Errors that speak to the user: one line, what was expected, what was found, what to do."""

from __future__ import annotations


class CvlabError(RuntimeError):
    """Base class of every user-facing error. The CLI prints it as one line and exits non-zero."""


class DatasetNotFoundError(CvlabError, FileNotFoundError):
    """A dataset is not on disk and may not be downloaded."""
