"""Policy cards (TOML data), installed as kvpolicy.cards_data."""
