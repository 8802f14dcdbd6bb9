"""Data: reading files and hub datasets, and converting every layout to one canonical form."""
