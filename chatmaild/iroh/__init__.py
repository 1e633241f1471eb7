"""chatmail-iroh: an iroh relay for Delta Chat's realtime apps (webxdc).

``frames`` reads and writes the relay protocol (pure), ``hub`` forwards packets
between connected nodes (pure), ``main`` is the daemon: HTTP upgrade, limits,
timers.
"""
