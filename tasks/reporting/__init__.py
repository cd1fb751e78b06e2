"""Results tables from tracked runs (report) and the published MedMNIST v2 figures (paper)."""
