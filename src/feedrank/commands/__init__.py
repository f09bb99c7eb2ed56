"""CLI command groups. Each module is a thin shell over library functions and registers its
commands on the root app in ``feedrank.cli``; no logic lives here that tests could not call directly."""
