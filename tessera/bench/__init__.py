"""The serving benchmark behind `tessera bench serve` only (its client needs the `bench` extra)."""
