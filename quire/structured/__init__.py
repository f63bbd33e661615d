"""Structured outputs: constraints compiled to grammars (xgrammar), and each sequence's matcher state."""
