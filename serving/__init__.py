"""mixllm serving: the FastAPI app (:mod:`serving.app`) over the `mixllm` library, serving item
ranking (``/v1/rank``, ``/v1/rerank``, ``/v1/recommend``) and image question answering (``/v1/chat/completions``,
through :mod:`mixllm.qa`)."""
