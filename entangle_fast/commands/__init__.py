"""Subcommands of the ``entangle-fast`` CLI (see :mod:`entangle_fast.cli`)."""
