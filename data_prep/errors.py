"""Errors of the data side (``data_prep``).

Every failure a user can fix (a missing package, an unknown model name, an empty input) raises
:class:`DataPrepError` with a one-line message that says what is wrong and what to do.
"""

from __future__ import annotations


class DataPrepError(RuntimeError):
    """A data-preparation step cannot go on; the message is one line meant for the user."""
