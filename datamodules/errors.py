"""Errors of the data layer (the base class lives in :mod:`cvlab.errors`)."""

from __future__ import annotations

from cvlab.errors import CvlabError

__all__ = ["CvlabError", "DatasetCorruptError", "DatasetNotFoundError", "UnofficialDataWarning"]


class DatasetNotFoundError(CvlabError, FileNotFoundError):
    """A dataset is not on disk and may not be downloaded."""


class DatasetCorruptError(CvlabError, ValueError):
    """A dataset file is truncated, damaged, or holds something other than plain data (e.g. a crafted pickle)."""


class UnofficialDataWarning(UserWarning):
    """A data file is read although its MD5 is not the official release's (re-packed, rebuilt or generated data)."""
