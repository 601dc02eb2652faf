"""What runs on the GPUs: catalogs, the roofline demand model, vLLM launch, proxy, load generator."""
