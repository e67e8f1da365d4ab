"""crosschannel.linear_probe: frozen-encoder evaluation (per-layer linear probes, VOC07 SVM)."""
