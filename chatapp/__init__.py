"""chatapp front end: the Textual UI and the command line. Knows the engine only through engine.serving.client, events and the headless session."""
