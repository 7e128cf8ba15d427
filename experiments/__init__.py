"""Presets shipped with twml: `twml <command> --preset NAME` reads NAME.toml from here."""
