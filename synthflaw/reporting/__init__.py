"""Reporting: figures and tables of a run, the cross-seed aggregate and the findings, and what notebooks display."""
