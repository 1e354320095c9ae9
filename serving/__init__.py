"""mixllm serving: the FastAPI app (image QA, item reranking) built on the `mixllm` library.

Nothing here yet: the API arrives with the serving issue. The library's `mixllm.generation.answer`
is what the image QA route will call.
"""
