"""``chatapp serve``: the engine behind an OpenAI-compatible HTTP API (app.py: the HTTP side,
runner.py: the engine thread, its queue and metrics). This package's own module is light (no
torch, no web framework): the command line imports it for its defaults."""

DEFAULT_API_KEY_ENV = "CHATAPP_API_KEY"  # where the API key clients must send is read from by default
