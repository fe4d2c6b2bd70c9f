"""A project of your own: `zhclip init` writes a DVC project for your raw data without the demo, and
`zhclip results` says where a project's results are and what they show."""
