"""Reading stored results only: the tidy table, figures, the report, sweep comparisons."""
