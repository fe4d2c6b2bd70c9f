"""A project of your own: `zhclip init` writes a DVC project for your raw data, without the demo."""
