"""The OpenAI-compatible HTTP server: ``build_app(engine, ...)`` and ``run_server(args)``."""
