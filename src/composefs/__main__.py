"""``python -m composefs`` runs mkcomposefs."""

from composefs.cli.mkcomposefs import entry

entry()
