"""MM1 chat: a Textual terminal UI for chatting with an on-device MM1 model about images."""
