"""What runs on the GPUs: catalogs, roofline demand model, vLLM launch, proxy, load generator."""
