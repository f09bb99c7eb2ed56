"""`feedrank serve`: start the feed service (uvicorn) over a two-tower bundle and an optional ranker.

Exit codes: 0 clean shutdown (or ``--dry-run`` passed); 2 the inputs could not be used (missing
bundle, bad config); 3 the app failed to start; uvicorn's own code otherwise.

At start it prints the URL it serves on (``--port 0`` picks a free port; the URL names it).
``--workers`` defaults to one worker per CPU core, at most two (``default_workers``). With several
workers a supervisor pings each worker; one that does not answer within
``--healthcheck-timeout`` seconds is killed and replaced, and every replaced worker is logged with
why (no answer, exit status or signal). Workers load the models before they serve, so on a busy
machine give them time: the default, 30 s, is six times uvicorn's.

Example::

    feedrank serve runs/demo/bundle --ranker runs/demo/ranker/bundle --log runs/demo/log \\
        --config configs/serving.yaml --port 8000 --workers 2 --redis-url redis://127.0.0.1:6379/0
    curl '127.0.0.1:8000/feed?user_id=u17&k=10'
    feedrank serve runs/demo/bundle --dry-run        # build the service once, print /healthz, exit
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

APP_FACTORY = "feedrank.serving.app:app_from_env"
DEFAULT_HEALTHCHECK_TIMEOUT_S = 30
MAX_DEFAULT_WORKERS = 2  # each worker holds every model and the catalogue arrays: more only when asked


def default_workers() -> int:
    """Workers when ``--workers`` is not given: one per CPU core this process may run on, at most
    ``MAX_DEFAULT_WORKERS``. A worker serves one feed at a time on one intra-op thread
    (``serving.torch_threads``), so a second core idles unless a second worker uses it."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_DEFAULT_WORKERS))


def serve_command(
    bundle: Path = typer.Argument(..., help="Two-tower or blend bundle directory (feedrank train retrieval; a blend serves as its parts)."),
    ranker: Optional[Path] = typer.Option(None, "--ranker", help="Ranker bundle directory; without it the two-tower score ranks."),
    log: Optional[Path] = typer.Option(None, "--log", help="Canonical event log that seeds user histories."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML with a `serving` section (ServingConfig)."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    workers: Optional[int] = typer.Option(
        None, "--workers", min=1, show_default=False,
        help=f"uvicorn worker processes, each loading the models and serving on one thread; default: one per "
             f"CPU core, at most {MAX_DEFAULT_WORKERS}. Without --redis-url workers share events through the "
             "serving log (about a second's delay between workers).",
    ),  # fmt: skip
    healthcheck_timeout: int = typer.Option(
        DEFAULT_HEALTHCHECK_TIMEOUT_S, "--healthcheck-timeout", min=1,
        help="With --workers > 1: seconds a worker may take to answer the supervisor's ping (also while "
             "it starts) before it is killed and replaced.",
    ),  # fmt: skip
    redis_url: Optional[str] = typer.Option(None, "--redis-url", help="Use Redis at this URL for the user-vector cache."),
    serving_log: Optional[Path] = typer.Option(None, "--serving-log", help="Where POST /events rows go (overrides the config)."),
    quantize: Optional[str] = typer.Option(
        None, "--quantize", help="Serve a quantized ranker: int8, int8_linear, int8_embeddings or fp16_embeddings "
                                 "(overrides serving.quantize; measure yours first with `feedrank lab quantize`).",
    ),  # fmt: skip
    compare: Optional[Path] = typer.Option(None, "--compare", help="A candidate bundle the inspector at / shows beside the serving one."),
    item2item: Optional[Path] = typer.Option(
        None, "--item2item", help="An item2item bundle (retrieval.kind ease or covisit): candidate source `item2item` beside the ANN."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Build the service once, print its health report and exit."),
) -> None:
    """Serve GET /feed, POST /events, /healthz and /metrics."""
    from feedrank.bundle import BundleError
    from feedrank.config import ConfigError
    from feedrank.serving.app import ServeSettings, build_service, serving_config

    settings = ServeSettings(
        bundle=str(bundle), ranker=None if ranker is None else str(ranker), log=None if log is None else str(log),
        config=None if config is None else str(config), redis_url=redis_url,
        serving_log=None if serving_log is None else str(serving_log), quantize=quantize,
        compare=None if compare is None else str(compare), item2item=None if item2item is None else str(item2item),
        answer_while_loading=workers == 1,  # one process: say "model still loading" (503) rather than hang
    )  # fmt: skip
    try:
        for path in (bundle, ranker, log, compare, item2item):
            if path is not None and not path.is_dir():
                raise FileNotFoundError(f"{path}: no such directory")
        cfg = serving_config(settings)  # fail here, once, rather than in every worker
        if not _loopback(host) and cfg.auth.api_key_env is None:
            typer.echo(f"warning: serving on {host} with no API key: anyone who can reach it may post events "
                       "(set serving.auth.api_key_env, and consider serving.rate_limit)", err=True)
        if dry_run:
            service = build_service(settings)
            typer.echo(json.dumps(service.health(), indent=2))
            service.close()
            return
    except (OSError, ValueError, ConfigError, BundleError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    workers = default_workers() if workers is None else workers
    os.environ.update(settings.to_env())  # uvicorn workers inherit the environment
    import uvicorn

    from feedrank.serving.supervisor import serve

    server_config = uvicorn.Config(APP_FACTORY, factory=True, host=host, port=port, workers=workers,
                                   timeout_worker_healthcheck=healthcheck_timeout)  # fmt: skip
    announce = f"{workers} workers, health-check timeout {healthcheck_timeout} s" if workers > 1 else "1 worker"
    started = serve(server_config, lambda url: typer.echo(f"feedrank serve: {url} ({announce}); inspector at {url}/ ; try {url}/healthz"))
    if not started:
        raise typer.Exit(3)


def _loopback(host: str) -> bool:
    """Whether ``host`` is reachable only from this machine (the default 127.0.0.1, ::1, localhost)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def register(app: typer.Typer) -> None:
    """Add ``feedrank serve`` to the root app."""
    app.command("serve")(serve_command)
