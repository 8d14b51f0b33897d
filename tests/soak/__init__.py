"""Minutes of mixed load (-m slow): memory and descriptors stay flat."""
