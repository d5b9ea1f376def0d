"""Integrations of FastVLM with serving engines; each module is loaded by the engine itself, never at import."""
