"""Command-line entry points (``advft-train``, ``advft-sweep``, ... once installed; ``python launch/X.py``
works too). They parse, call advft and report; no training code lives here."""
