"""Cost: analytic FLOPs and architecture presets (flops), FLOPs measured by running the model
(measure), and the latency and memory benchmark (bench)."""
