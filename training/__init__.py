"""mixllm training: Lightning modules, data modules and YAML recipes built on the `mixllm` library."""
