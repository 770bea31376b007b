"""The web live view: its own process; the page, the live state and replays (docs/WEB.md)."""
