"""feedrank: a news-feed ranking system you can train on your own logs, serve, and measure."""

__version__ = "0.1.0"
