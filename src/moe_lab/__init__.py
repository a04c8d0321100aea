"""moe_lab: mixture-of-experts layers and controlled experiments comparing them with plain networks."""

__version__ = "0.1.0"
