"""Reading a finished run file back: summary, analysis series, events and the report figure."""
