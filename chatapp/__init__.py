"""chatapp front end: the Textual UI and the command line. Knows the engine only through engine.client, events and the headless session."""
