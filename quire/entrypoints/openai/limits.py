"""The bounds on one request to the HTTP server: no single request can make it allocate without limit.

Prompt length and ``max_tokens`` are bounded by the engine's ``max_model_len``; everything else a
body can make large is bounded here, in the request models (so ``/openapi.json`` states each bound
and a violation is a 400 naming the field) or, for the body itself, by the app's body-size middleware.
"""

from __future__ import annotations

from quire.sampling_params import MAX_SEED, MIN_SEED  # the engine's bound, stated in the schema too

# Default of --max-request-bytes: a full-context prompt as token ids is ~100 KB of JSON.
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
# vLLM's default max_logprobs: the most top logprobs a request may ask for.
MAX_LOGPROBS = 20
MAX_N = 64  # n and best_of: sequences per prompt
MAX_PROMPTS = 64  # prompts in one completions request (each is a request in the engine)
MAX_STOP_STRINGS = 32
MAX_STOP_STRING_CHARS = 256  # a stop string's possible start is held back from the stream
MAX_STOP_TOKEN_IDS = 256
# Per-request timeouts (the request_timeout field) are whole seconds up to a day.
MAX_REQUEST_TIMEOUT_S = 86400.0

__all__ = [
    "DEFAULT_MAX_REQUEST_BYTES", "MAX_LOGPROBS", "MAX_N", "MAX_PROMPTS", "MAX_REQUEST_TIMEOUT_S", "MAX_SEED",
    "MAX_STOP_STRINGS", "MAX_STOP_STRING_CHARS", "MAX_STOP_TOKEN_IDS", "MIN_SEED",
]
