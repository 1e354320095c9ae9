"""``mixllm demo`` (``make demo``): start the service on the defaults and show what it does.

It starts ``mixllm serve`` (the committed distilled student, MovieLens-100K seeding the store on
first start), waits for ``/ready``, then sends real requests and prints the answers next to
ready-to-paste ``curl`` lines:

1. recommendations for MovieLens user 1, with movie titles;
2. a rerank of given candidates for the same user (``/v1/rank``);
3. a new movie added (``PUT /v1/items``), a new user who watched four animated films
   (``POST /v1/events``), and that user's recommendations, where the new movie can now appear;
4. image question answering (``/v1/chat/completions``, OpenAI-compatible) on a held-out generated
   scene, beside the scene's true answers.

Then it keeps serving until interrupted (Ctrl-C); with ``DEMO_ONESHOT=1`` it stops after the
examples (for scripts).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex

import httpx

from serving.process import running_server, wait_ready
from serving.settings import Settings

NEW_ITEM = ("demo-toy-story-4", "Toy Story 4 (2019); genres: Animation, Children's, Comedy")  # the catalog's text format
ANIMATION_FAN = ("demo-user-animation", ["1", "95", "71", "588"])  # Toy Story, Aladdin, The Lion King, Beauty and the Beast


def _curl(base: str, method: str, path: str, body: dict | None, api_key: str | None) -> str:
    parts = ["curl", "-s", "-X", method, f"{base}{path}"]
    if api_key:
        parts += ["-H", "Authorization: Bearer $MIXLLM_API_KEY"]
    if body is not None:
        parts += ["-H", "Content-Type: application/json", "-d", json.dumps(body)]
    return shlex.join(parts)


def _show(title: str, response: httpx.Response, curl: str) -> dict:
    print(f"\n=== {title}  [{response.status_code}]")
    body = response.json()
    results = body.get("results")
    if isinstance(results, list) and results and "item_id" in results[0]:
        for i, r in enumerate(results, 1):
            text = f"  {r.get('text')}" if r.get("text") else ""
            print(f"  {i:2d}. item {r['item_id']:>18}  score {r['score']:+.3f}{text}")
        print(f"  model {body['model']}, prompt tokens {body['usage']['prompt_tokens']}, history {body.get('history')}")
    else:
        print("  " + json.dumps(body)[:600])
    print(f"  $ {curl}")
    return body


def run_examples(base: str, api_key: str | None = None) -> None:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=base, headers=headers, timeout=120) as client:
        def call(title: str, method: str, path: str, body: dict | None = None) -> dict:
            response = client.request(method, path, json=body)
            return _show(title, response, _curl(base, method, path, body, api_key))

        call("Recommendations for MovieLens user 1 (FAISS top-100 over SASRec, reranked by the student)",
             "POST", "/v1/recommend", {"user": {"id": "1"}, "k": 10})
        candidates = ["50", "172", "181", "100", "127", "12", "1", "258", "286", "294"]
        titles = {}
        for item_id in candidates:
            titles[item_id] = client.get(f"/v1/items/{item_id}").json().get("text", "?")
        body = call("Rank 10 given movies for user 1 (POST /v1/rank)", "POST", "/v1/rank",
                    {"user": {"id": "1"}, "candidates": candidates, "top_n": 5})
        for r in body.get("results", []):
            print(f"      {r['item_id']:>4}: {titles.get(r['item_id'])}")
        call("Add a new movie (PUT /v1/items/...)", "PUT", f"/v1/items/{NEW_ITEM[0]}", {"text": NEW_ITEM[1]})
        user, watched = ANIMATION_FAN
        call(f"A new user watched {len(watched)} animated films (POST /v1/events)", "POST", "/v1/events",
             [{"user_id": user, "item_id": i} for i in watched])
        body = call("Recommendations for that user: the new movie competes with the catalog", "POST", "/v1/recommend",
                    {"user": {"id": user}, "k": 10})
        ids = [r["item_id"] for r in body.get("results", [])]
        where = f"at position {ids.index(NEW_ITEM[0]) + 1}" if NEW_ITEM[0] in ids else "not in the top 10"
        print(f"  -> the new movie {NEW_ITEM[0]!r} is {where}")
        call("Where the new movie ranks among the top 10 for that user (POST /v1/rank)", "POST", "/v1/rank",
             {"user": {"id": user}, "candidates": [NEW_ITEM[0], *[i for i in ids if i != NEW_ITEM[0]][:9]]})
        call("Rerank texts the catalog does not hold (POST /v1/rerank, Cohere shape)", "POST", "/v1/rerank",
             {"query": "Animated films for a family evening", "documents": ["Finding Nemo (2003), Animation|Children's",
              "Saw (2004), Horror|Thriller", "Shrek (2001), Animation|Comedy"], "return_documents": True})


def run_chat_example(base: str, api_key: str | None = None) -> None:
    """Questions about one held-out test scene (the model never saw it) to ``/v1/chat/completions``."""
    import base64
    import io

    from mixllm.data.scenes import derived_rng, generate_split, questions, render_scene

    scene = generate_split("test", 1, seed=0)[0]
    buffer = io.BytesIO()
    render_scene(scene).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    shapes = ", ".join(f"{s.colour} {s.shape} ({s.position})" for s in scene.shapes)
    print(f"\n=== Image question answering (POST /v1/chat/completions) on a held-out scene: {shapes}")
    with httpx.Client(base_url=base, headers=headers, timeout=120) as client:
        for qa in questions(scene, derived_rng(0, "demo")):
            body = {"model": "scenes-qa", "max_tokens": 8, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": qa.question}]}]}
            response = client.post("/v1/chat/completions", json=body)
            if response.status_code != 200:
                print(f"  [{response.status_code}] {json.dumps(response.json())[:300]}")
                return
            answer = response.json()["choices"][0]["message"]["content"]
            print(f"  {qa.question:<50} -> {answer!r:<10} (true: {qa.answer})")
    short = dict(body, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
                                                              {"type": "text", "text": body["messages"][0]["content"][1]["text"]}]}])
    print(f"  $ {_curl(base, 'POST', '/v1/chat/completions', short, api_key)}")


def cli_demo(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the demo prints its own lines
    settings = Settings.from_env(port=args.port)
    base = f"http://{settings.host}:{settings.port}"
    print(f"starting: mixllm serve --port {settings.port}", flush=True)
    try:
        with running_server(["--port", str(settings.port)]) as process:
            ready = wait_ready(base, process, timeout_s=900, on_state=lambda state: print(f"waiting for /ready: {state}", flush=True))
            print(f"ready: {ready}", flush=True)
            run_examples(base, settings.api_key)
            run_chat_example(base, settings.api_key)
            if os.environ.get("DEMO_ONESHOT", "") not in ("", "0"):
                return 0
            print(f"\nserving on {base} (OpenAPI docs at {base}/docs); Ctrl-C to stop", flush=True)
            process.wait()
            return process.returncode or 0
    except KeyboardInterrupt:
        return 0
