"""Browser sessions: gs_ tokens minted, checked, and limited per end user."""
