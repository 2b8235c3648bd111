"""What each CLI command does, kept out of cli.py so that it stays a thin parsing layer."""
