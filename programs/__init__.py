"""Runnable example DSPy programs built with detot-agent (`python -m programs.<name> --help`)."""
