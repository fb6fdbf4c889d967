"""User-facing entry points: the offline `LLM` (llm.py)."""
