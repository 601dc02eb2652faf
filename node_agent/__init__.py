"""The node agent: NVML sampler, gRPC telemetry, Prometheus exporter, inventory, device plugin."""
