"""Integrations of FastVLM with serving engines and evaluation harnesses; each module is loaded by its engine or harness
itself, never at import."""
