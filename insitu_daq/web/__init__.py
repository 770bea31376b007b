"""The web live view (`insitu-daq web`, docs/WEB.md): its own process, serving runs to people."""
