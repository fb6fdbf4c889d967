"""The OpenAI-compatible HTTP server (`pagedinfer serve`). Needs the `serve` extra: pip install pagedinfer[serve]."""
