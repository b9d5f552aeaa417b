"""Test and benchmark support shipped in neither the SDK nor the CLI (local fleets of real services)."""
