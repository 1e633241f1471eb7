"""chatmail-metrics: the relay's Prometheus endpoint (``metrics_address``)."""
