"""The OpenAI-compatible HTTP surface: one module per endpoint, one request pipeline.

A request goes through ``server.OpenAIServer.handle``: the pipeline's steps
(``pipeline``: authenticate, read the body, authorize the model, admit) run in order,
then the endpoint's handler (``models``, ``chat``, ``completions``), then the steps'
``after`` hooks in reverse (release, account usage) -- also when a stream ends.
"""
