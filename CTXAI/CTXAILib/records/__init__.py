"""What a run leaves behind: its record (provenance), the output files and pictures. Imports the engine and the
checks."""
