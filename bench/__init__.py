"""swapd's benchmark: added latency, streaming, swaps, collation, scale; run ``python -m bench``."""
