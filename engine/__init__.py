"""chatapp's inference engine: checkpoints, the Llama model, decoding, the worker.

Nothing here imports the UI (``chatapp``)."""
