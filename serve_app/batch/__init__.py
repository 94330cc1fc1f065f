"""Batch inference: the OpenAI Files and Batches API, run on the same engines.

``service.BatchService`` is one Serve replica on the head: it keeps the files under
``batch.files_dir`` and their metadata, with every batch's state, in SQLite
(``store``); ``runner`` validates a batch's input file and runs its lines through the
engine deployments with bounded concurrency, appending each finished line to the
output or error file; a restarted replica resumes every unfinished batch from those
files.  The HTTP endpoints are ``serve_app.api.files`` and ``serve_app.api.batches``;
the object shapes are ``protocol``'s.
"""
