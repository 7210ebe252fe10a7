"""What others watch swapd through: Prometheus metrics and systemd's notify socket."""
