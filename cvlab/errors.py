"""Errors that speak to the user: one line, what was expected, what was found, what to do.

This module is the ground floor of the house: every layer may import it, and it imports nothing of cvlab.
"""

from __future__ import annotations


class CvlabError(RuntimeError):
    """Base class of every user-facing error. The CLI prints it as one line and exits non-zero."""
