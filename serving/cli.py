"""``mixllm serve``: run the service with uvicorn (settings: flags > ``MIXLLM_*`` > defaults)."""

from __future__ import annotations

import argparse
import logging

from mixllm.errors import DataError
from serving.settings import Settings, add_arguments

log = logging.getLogger(__name__)


def settings_from_args(args: argparse.Namespace) -> Settings:
    from dataclasses import fields

    overrides = {f.name: getattr(args, f.name, None) for f in fields(Settings)}
    settings = Settings.from_env(**overrides)
    for name, path in settings.models.items():  # fail before uvicorn starts, in one line
        if not path.is_dir():
            raise DataError(f"--checkpoint {name}={path}: no such checkpoint directory")
    from serving.runtime import qa_checkpoint

    qa_checkpoint(settings)  # the same for an image QA model that was asked for
    return settings


def add_serve_parser(commands) -> None:
    serve = commands.add_parser("serve", help="run the service: ranking, recommendation and image QA (FastAPI + uvicorn)",
                                description="Every flag is also a MIXLLM_* environment variable (e.g. MIXLLM_PORT).")
    add_arguments(serve)
    serve.set_defaults(func=cli_serve)


def cli_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from serving.app import create_app

    settings = settings_from_args(args)
    app = create_app(settings)
    log.info("serving on http://%s:%d (docs at /docs); models %s", settings.host, settings.port, ", ".join(settings.models))
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", access_log=False)
    return 0
